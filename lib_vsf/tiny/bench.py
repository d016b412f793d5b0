"""A mini NegGenBench on the bundled tiny model: `python -m lib_vsf bench-neg`.

Fixed prompt / negative pairs in the spirit of NegGenBench: the negative names what the positive
implies in training (a companion object the captions seldom name, a background the prompt's object
usually stands on) or an attribute the prompt leaves open. Each pair runs over the same seeds for
unguided, VSF Quality, VSF Strong, VSF at alpha 20 / beta 0, NAG, NAG Strong, NASA (one pass
each) and CFG with the negative
prompt (two passes). The analytic judge (`judge.py`) scores every image:

- positive: the share of the prompt's named objects present (a colourless "a circle": any circle);
- negative: 1 when what the negative names is absent (higher is better, as in NegGenBench);
- quality: the share of pixels on the scene palette (`judge.quality`);
- time: seconds per image (batched over the seeds, CPU unless a device is given).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data
from .judge import judge

CFG_SCALE = 3.0
METHODS = ("unguided", "VSF Quality", "VSF Strong", "VSF a=20 b=0", "NAG", "NAG Strong", "NASA", "CFG")
# Beyond the paper's presets: VSF at the largest alpha the settings allow and no logit bias, because the
# tiny model gives the negative tokens little attention (see the README's bench-neg notes).
EXTRA_SETTINGS = {"VSF a=20 b=0": dict(method="vsf", alpha=20.0, beta=0.0)}


@dataclass(frozen=True)
class Pair:
    prompt: str
    negative: str
    kind: str  # companion / background / attribute


PAIRS = (
    Pair("a red circle", "blue square", "companion"),
    Pair("a green triangle", "yellow circle", "companion"),
    Pair("a yellow square", "red triangle", "companion"),
    Pair("a blue triangle", "green circle", "companion"),
    Pair("a blue circle", "stripes", "background"),
    Pair("a circle", "red", "attribute"),
    Pair("a square", "blue", "attribute"),
)
SEEDS = tuple(range(4))


def _named(text: str):
    """[(colour or None, shape)] of 'a red circle and a square'."""
    out = []
    for part in text.split(" and "):
        words = part.split()
        shape = next(w for w in words if w in data.SHAPES)
        colour = next((w for w in words if w in data.COLOURS), None)
        out.append((colour, shape))
    return out


def positive_score(verdict, prompt: str) -> float:
    named = _named(prompt)
    return sum(verdict.has(c, s) for c, s in named) / len(named)


def negative_score(verdict, negative: str) -> float:
    """1.0 when what `negative` names is absent from the image."""
    if negative in data.BACKGROUNDS:
        return float(verdict.background != negative)
    if negative in data.COLOURS:
        return float(not verdict.has(negative))
    return float(not any(verdict.has(c, s) for c, s in _named(negative)))


def generate(pipe, method: str, prompt: str, negative: str, seeds, steps: int = 8):
    """Images of one method for one pair, batched over seeds; (images, seconds per image)."""
    from ..diffusers import VSFGuidance, family_for
    from ..settings import VSFSettings, from_preset

    kwargs = dict(prompt=[prompt] * len(seeds), num_inference_steps=steps, output_type="pil",
                  generator=[torch.Generator().manual_seed(s) for s in seeds])
    start = time.perf_counter()
    if method == "unguided":
        images = pipe(**family_for(pipe).single_pass_kwargs(kwargs)).images
    elif method == "CFG":
        images = pipe(negative_prompt=[negative] * len(seeds), guidance_scale=CFG_SCALE, **kwargs).images
    else:
        settings = VSFSettings(**EXTRA_SETTINGS[method]) if method in EXTRA_SETTINGS else from_preset(method)
        with VSFGuidance(pipe, negative, settings) as vsf:
            images = vsf(**kwargs).images
    return images, (time.perf_counter() - start) / len(seeds)


def run(pipe=None, pairs=PAIRS, seeds=SEEDS, methods=METHODS, steps: int = 8, log=None):
    """{"rows": [per method: positive, negative, quality, seconds], "pairs": per pair and method,
    "images": {(pair index, method): [PIL images]}}."""
    from .model import load_pipeline

    pipe = pipe or load_pipeline()
    per_pair, images = [], {}
    totals = {m: {"positive": 0.0, "negative": 0.0, "quality": 0.0, "seconds": 0.0} for m in methods}
    for i, pair in enumerate(pairs):
        scores = {}
        for method in methods:
            if log:
                log(f"{pair.prompt} / -{pair.negative}: {method}")
            imgs, seconds = generate(pipe, method, pair.prompt, pair.negative, seeds, steps)
            images[(i, method)] = imgs
            verdicts = [judge(im) for im in imgs]
            row = {"positive": sum(positive_score(v, pair.prompt) for v in verdicts) / len(imgs),
                   "negative": sum(negative_score(v, pair.negative) for v in verdicts) / len(imgs),
                   "quality": sum(v.quality for v in verdicts) / len(imgs), "seconds": seconds}
            scores[method] = row
            for key, value in row.items():
                totals[method][key] += value / len(pairs)
        per_pair.append({"prompt": pair.prompt, "negative": pair.negative, "kind": pair.kind, "scores": scores})
    return {"rows": totals, "pairs": per_pair, "images": images, "seeds": list(seeds), "steps": steps,
            "cfg_scale": CFG_SCALE}


def markdown(result) -> str:
    lines = ["| method | passes | positive | negative | quality | s / image |", "|---|---|---|---|---|---|"]
    for method, row in result["rows"].items():
        passes = 2 if method == "CFG" else 1
        lines.append(f"| {method} | {passes} | {row['positive']:.3f} | {row['negative']:.3f} | {row['quality']:.3f} "
                     f"| {row['seconds']:.3f} |")
    lines += ["", "Negative score per pair (share of images without what the negative names):", "",
              "| prompt | negative | kind | " + " | ".join(result["rows"]) + " |",
              "|---|---|---|" + "---|" * len(result["rows"])]
    for p in result["pairs"]:
        lines.append(f"| {p['prompt']} | {p['negative']} | {p['kind']} | "
                     + " | ".join(f"{p['scores'][m]['negative']:.2f}" for m in result["rows"]) + " |")
    return "\n".join(lines) + "\n"


def grid(result, seed_index: int = 0, scale: int = 3):
    """One labelled row per pair (first seed), methods left to right, stacked."""
    from PIL import Image

    from ..output import caption_below, labelled_grid

    rows = []
    for i, p in enumerate(result["pairs"]):
        ims = [result["images"][(i, m)][seed_index] for m in result["rows"]]
        ims = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in ims]
        caption = f"{p['prompt']} | negative: {p['negative']}"
        rows.append(caption_below(labelled_grid(ims, list(result["rows"])), caption))
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def write(result, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "bench-neg.md", "json": out_dir / "bench-neg.json",
             "grid": out_dir / "bench-neg.png"}
    paths["markdown"].write_text(markdown(result))
    paths["json"].write_text(json.dumps({k: v for k, v in result.items() if k != "images"}, indent=1))
    grid(result).save(paths["grid"])
    return paths
