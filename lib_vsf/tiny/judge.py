"""An exact analytic judge for the synthetic scenes: which objects and which background an image shows.

No training and no download. Each pixel takes the nearest colour of the scene palette (the four object
colours and the two background greys, `data.COLOURS`, `data._background`) when it is within
`PALETTE_DISTANCE` of it. Pixels of one object colour form 4-connected components; a component of at
least `MIN_AREA` pixels is an object, and its shape comes from how much of its bounding box it fills
(square about 1, circle about pi / 4, upward triangle about 1 / 2). The background is read from the grey
pixels: plain when few are light, else stripes when light / dark changes run along rows only, checks
when they change along both axes.

`judge(image)` returns a `Verdict`; `quality(image)` is the share of pixels within `PALETTE_DISTANCE`
of the palette (1 for a clean render; off-palette smears and noise lower it). Images are HWC arrays
in [-1, 1] or PIL images.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from . import data

GREYS = {"dark": 0.12, "light": 0.42}
PALETTE = np.array([*data.COLOURS.values(), *([g] * 3 for g in GREYS.values())], np.float32)
PALETTE_DISTANCE = 0.25  # RGB distance in [0, 1] units
MIN_AREA = 10
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.64  # fill >= 0.9 square, >= 0.64 circle, else triangle
PLAIN_LIGHT_SHARE = 0.15
CHECKS_ROW_CHANGES = 0.08  # share of horizontal neighbour pairs that differ: stripes ~0, checks ~0.25


@dataclass
class Verdict:
    objects: set  # {(colour, shape)}
    background: str
    quality: float

    def has(self, colour: str | None = None, shape: str | None = None) -> bool:
        return any((colour is None or c == colour) and (shape is None or s == shape) for c, s in self.objects)


def as_array(image) -> np.ndarray:
    """HWC float32 in [0, 1] from a PIL image or an HWC array in [-1, 1]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), np.float32) / 255.0
    return (np.asarray(image, np.float32) + 1.0) / 2.0


def _palette_index(rgb: np.ndarray) -> np.ndarray:
    """Per pixel: index into PALETTE, or -1 when no palette colour is within PALETTE_DISTANCE."""
    dist = np.linalg.norm(rgb[:, :, None, :] - PALETTE[None, None], axis=-1)
    index = dist.argmin(-1)
    return np.where(dist.min(-1) <= PALETTE_DISTANCE, index, -1)


def _components(mask: np.ndarray):
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        todo, part = deque([(y0, x0)]), []
        while todo:
            y, x = todo.popleft()
            part.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        yield part


def shape_of(part) -> str:
    ys, xs = np.array(part).T
    fill = len(part) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"


def background_of(index: np.ndarray) -> str:
    n_colours = len(data.COLOURS)
    grey = index >= n_colours
    if grey.sum() < 16:
        return "plain"
    light = index == n_colours + 1
    if light[grey].mean() < PLAIN_LIGHT_SHARE:
        return "plain"
    pairs = grey[:, 1:] & grey[:, :-1]
    changes = (light[:, 1:] != light[:, :-1])[pairs].mean() if pairs.any() else 0.0
    return "checks" if changes >= CHECKS_ROW_CHANGES else "stripes"


def judge(image) -> Verdict:
    rgb = as_array(image)
    index = _palette_index(rgb)
    objects = set()
    for i, colour in enumerate(data.COLOURS):
        for part in _components(index == i):
            if len(part) >= MIN_AREA:
                objects.add((colour, shape_of(part)))
    return Verdict(objects, background_of(index), float((index >= 0).mean()))


def quality(image) -> float:
    return float((_palette_index(as_array(image)) >= 0).mean())


def accuracy(seed: int = 12345, n: int = 500) -> dict[str, float]:
    """Accuracy on n fresh scenes drawn with `seed`: per object class (present / absent), per
    background, and the share of scenes judged entirely right."""
    rng = np.random.default_rng(seed)
    object_hits = background_hits = exact = 0
    for _ in range(n):
        s = data.scene(rng)
        v = judge(data.render(s))
        truth = {(o.colour, o.shape) for o in s.objects}
        object_hits += sum((c in truth) == (c in v.objects) for c in data.CLASSES)
        background_hits += v.background == s.background
        exact += v.objects == truth and v.background == s.background
    return {"objects": object_hits / (n * len(data.CLASSES)), "background": background_hits / n, "scene": exact / n}
