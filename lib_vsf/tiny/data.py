"""Synthetic coloured-shape scenes with captions, generated on the fly from a seed (no files).

A scene is a 32x32 RGB image in [-1, 1] with 1-3 objects (circle / square / triangle in red / green /
blue / yellow, each class at most once) on a plain, striped or checked background. The generator is
built so that a negative prompt has something to remove:

- companions: four "anchor" objects usually come with a companion object (`COMPANIONS`) that the
  caption seldom names, so "a red circle" alone often draws a blue square too;
- background: a blue circle usually stands on stripes, and the caption seldom says so;
- attributes: a caption sometimes leaves out an object's colour ("a circle"), so a colour word as the
  negative ("red") has colours to choose among.

`scene(rng)` draws one scene description; `render(scene)` draws it; `caption(scene, rng)` names it;
`batch(rng, n)` does all three for n scenes. Every draw comes from the numpy Generator passed in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.88, 0.1)}
COLOUR_NAMES = tuple(COLOURS)
CLASSES = tuple((c, s) for s in SHAPES for c in COLOUR_NAMES)  # 12 object classes, judge label order
BACKGROUNDS = ("plain", "stripes", "checks")
BACKGROUND_WORDS = {"stripes": "on stripes", "checks": "on checks"}
COMPANIONS = {("red", "circle"): ("blue", "square"), ("green", "triangle"): ("yellow", "circle"),
              ("yellow", "square"): ("red", "triangle"), ("blue", "triangle"): ("green", "circle")}
STRIPED = ("blue", "circle")  # usually drawn on stripes
P_COMPANION, P_NAME_COMPANION = 0.8, 0.25
P_EXTRA, P_NO_COLOUR = 0.35, 0.15
P_STRIPED_ON_STRIPES = 0.8
BACKGROUND_P = (0.6, 0.25, 0.15)
P_NAME_BACKGROUND = 0.4
WORDS = ("a and on circle square triangle red green blue yellow stripes checks").split()


@dataclass
class Obj:
    colour: str
    shape: str
    x: float
    y: float
    r: float
    named: bool = True


@dataclass
class Scene:
    objects: list = field(default_factory=list)
    background: str = "plain"
    background_named: bool = False


def _place(rng, objects, r):
    """Centre for a new object of half-size r, away from the others when possible (20 tries)."""
    for _ in range(20):
        x, y = rng.uniform(r + 1, SIZE - r - 1, size=2)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.r + 1) ** 2 for o in objects):
            break
    return float(x), float(y)


def scene(rng: np.random.Generator) -> Scene:
    s = Scene()
    classes = [CLASSES[rng.integers(len(CLASSES))]]
    named = [True]
    if classes[0] in COMPANIONS and rng.random() < P_COMPANION:
        classes.append(COMPANIONS[classes[0]])
        named.append(bool(rng.random() < P_NAME_COMPANION))
    if len(classes) < 3 and rng.random() < P_EXTRA:
        extra = CLASSES[rng.integers(len(CLASSES))]
        if extra not in classes:
            classes.append(extra)
            named.append(True)
    for (colour, shape), is_named in zip(classes, named):
        r = float(rng.uniform(4.0, 7.0))
        x, y = _place(rng, s.objects, r)
        s.objects.append(Obj(colour, shape, x, y, r, is_named))
    if classes[0] == STRIPED and rng.random() < P_STRIPED_ON_STRIPES:
        s.background = "stripes"
    else:
        s.background = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=BACKGROUND_P)]
    s.background_named = s.background != "plain" and bool(rng.random() < P_NAME_BACKGROUND)
    return s


def _background(kind: str) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if kind == "stripes":
        light = (yy // 3) % 2 == 0
    elif kind == "checks":
        light = ((yy // 4) + (xx // 4)) % 2 == 0
    else:
        light = np.zeros((SIZE, SIZE), bool)
    grey = np.where(light, 0.42, 0.12).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=2)


def shape_mask(shape: str, x: float, y: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - x) <= r * 0.85) & (np.abs(yy - y) <= r * 0.85)
    # upward triangle: apex at top, base at the bottom
    top, bottom = y - r, y + r
    t = np.clip((yy - top) / (bottom - top), 0, 1)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - x) <= t * r)


def render(s: Scene) -> np.ndarray:
    """HWC float32 image in [-1, 1]."""
    img = _background(s.background)
    for o in s.objects:
        img[shape_mask(o.shape, o.x, o.y, o.r)] = COLOURS[o.colour]
    return img * 2.0 - 1.0


def labels(s: Scene) -> tuple[np.ndarray, int]:
    """(presence of each of CLASSES as 0/1 float32, background index)."""
    present = np.zeros(len(CLASSES), np.float32)
    for o in s.objects:
        present[CLASSES.index((o.colour, o.shape))] = 1.0
    return present, BACKGROUNDS.index(s.background)


def caption(s: Scene, rng: np.random.Generator) -> str:
    parts = []
    for o in s.objects:
        if o.named:
            colour = "" if rng.random() < P_NO_COLOUR else o.colour + " "
            parts.append(f"a {colour}{o.shape}")
    text = " and ".join(parts)
    if s.background_named:
        text += " " + BACKGROUND_WORDS[s.background]
    return text


def batch(rng: np.random.Generator, n: int):
    """(images [n, 3, 32, 32] float32 in [-1, 1], captions, presence [n, 12], background [n])."""
    scenes = [scene(rng) for _ in range(n)]
    images = np.stack([render(s).transpose(2, 0, 1) for s in scenes])
    caps = [caption(s, rng) for s in scenes]
    lab = [labels(s) for s in scenes]
    return images, caps, np.stack([p for p, _ in lab]), np.array([b for _, b in lab], np.int64)
