"""Command line: `python -m lib_vsf generate ...` and `python -m lib_vsf presets`.

    python -m lib_vsf generate --model stabilityai/stable-diffusion-3.5-large-turbo \\
        --prompt "a cozy living room" --negative "plants" --preset "VSF Quality" --steps 8 --out room.png

Loads any supported diffusers pipeline (hub id or local directory), runs one guided conditional pass
and writes a PNG (video families: GIF or MP4) with the parameters as WebUI infotext. `--compare` writes
one labelled grid: unguided | VSF | NAG | NASA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .settings import VSFSettings, VSFSettingsError, family_default, from_preset, preset_names

METHOD_PRESET = {"nag": "NAG", "nasa": "NASA"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_vsf", description="Value Sign Flip negative guidance")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image or video with guided negative prompt")
    gen.add_argument("--model", required=True, help="diffusers pipeline: hub id or local directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default="", help="negative prompt (no padding, applied inside attention)")
    gen.add_argument("--preset", choices=[p for p in preset_names() if p != "Custom"],
                     help="named settings; explicit numbers below override it")
    gen.add_argument("--method", choices=["vsf", "nag", "nasa"])
    gen.add_argument("--alpha", type=float, help="VSF value scale / NAG phi / NASA a")
    gen.add_argument("--beta", type=float, help="VSF logit bias / NAG blend")
    gen.add_argument("--tau", type=float, help="NAG norm ratio cap")
    gen.add_argument("--lambda", dest="flux_lambda", type=float, help="Flux negative extrapolation (paper: 8)")
    gen.add_argument("--start", type=float, help="first step fraction with guidance (default 0)")
    gen.add_argument("--end", type=float, help="step fraction where guidance stops (default 1)")
    gen.add_argument("--alpha-schedule", help="per-step alpha list stretched over the run, e.g. '4 3 2'")
    gen.add_argument("--steps", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--frames", type=int, help="video families: number of frames")
    gen.add_argument("--guidance-scale", type=float,
                     help="Flux only: the distilled guidance value (CFG itself is always off)")
    gen.add_argument("--max-sequence-length", type=int, help="T5 length of the positive prompt")
    gen.add_argument("--device", help="cuda / cpu / mps (default: cuda if available)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bf16 on GPU, fp32 on CPU")
    gen.add_argument("--compare", action="store_true", help="write one grid: unguided | VSF | NAG | NASA")
    gen.add_argument("--out", default="vsf.png", help="output path (.png; videos .gif or .mp4)")

    sub.add_parser("presets", help="list presets and per-family defaults")
    return parser


def resolve_settings(args, family: str) -> VSFSettings:
    """Preset (or the family's / method's default) with explicit numbers applied on top."""
    if args.preset:
        base = from_preset(args.preset)
    elif args.method in METHOD_PRESET:
        base = from_preset(METHOD_PRESET[args.method])
    else:
        base = family_default(family)
    overrides = {k: getattr(args, k) for k in ("method", "alpha", "beta", "tau", "flux_lambda", "start", "end")
                 if getattr(args, k) is not None}
    if args.alpha_schedule:
        overrides["alpha_schedule"] = args.alpha_schedule
    return VSFSettings.from_dict({("lambda" if k == "flux_lambda" else k): v for k, v in overrides.items()}, base=base)


def _load(args):
    import torch
    from diffusers import DiffusionPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, dtype_name))
    return pipe.to(device), device


def _call_kwargs(args, pipe, seed: int):
    import torch

    kwargs = dict(num_inference_steps=args.steps, output_type="pil",
                  generator=torch.Generator(device="cpu").manual_seed(seed))
    for name, value in (("width", args.width), ("height", args.height), ("num_frames", args.frames),
                        ("max_sequence_length", args.max_sequence_length), ("guidance_scale", args.guidance_scale)):
        if value is not None:
            kwargs[name] = value
    return kwargs


def _frames(result):
    """(first image or frame list, is_video) of a pipeline output."""
    if hasattr(result, "frames"):
        return list(result.frames[0]), True
    return result.images[0], False


def _run(pipe, adapter, args, settings: VSFSettings | None):
    from .diffusers import VSFGuidance

    kwargs = _call_kwargs(args, pipe, args.seed)
    if settings is None or not args.negative.strip():
        return _frames(pipe(prompt=args.prompt, **adapter.single_pass_kwargs(kwargs)))
    with VSFGuidance(pipe, args.negative, settings) as vsf:
        return _frames(vsf(prompt=args.prompt, **kwargs))


def _params(args, settings: VSFSettings | None, size) -> dict[str, object]:
    params: dict[str, object] = {"Steps": args.steps, "Seed": args.seed, "Size": f"{size[0]}x{size[1]}",
                                 "Model": Path(args.model.rstrip("/")).name or args.model}
    if args.frames:
        params["Frames"] = args.frames
    if settings is not None:
        params.update(settings.to_infotext())
    return params


def generate(args) -> Path:
    """Run `generate`; returns the written path."""
    from .diffusers import family_for
    from .output import infotext, labelled_grid, save_png, save_video

    pipe, _ = _load(args)
    adapter = family_for(pipe)
    settings = resolve_settings(args, adapter.family)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        variants = [("unguided", None), ("VSF", settings if settings.method == "vsf" else family_default(adapter.family)),
                    ("NAG", settings if settings.method == "nag" else from_preset("NAG")),
                    ("NASA", settings if settings.method == "nasa" else from_preset("NASA"))]
        images, labels = [], []
        for label, variant in variants:
            print(f"[{len(images) + 1}/{len(variants)}] {label}", file=sys.stderr, flush=True)
            image, is_video = _run(pipe, adapter, args, variant)
            images.append(image[0] if is_video else image)  # videos: compare first frames
            labels.append(label if variant is None else f"{label} a={variant.alpha:g} b={variant.beta:g}")
        grid = labelled_grid(images, labels)
        params = _params(args, settings, images[0].size)
        params["Compare"] = " | ".join(labels)
        return save_png(grid, out.with_suffix(".png"), infotext(args.prompt, args.negative, params))
    image, is_video = _run(pipe, adapter, args, settings)
    text = infotext(args.prompt, args.negative, _params(args, settings, (image[0] if is_video else image).size))
    if is_video:
        return save_video(image, out if out.suffix.lower() in (".gif", ".mp4") else out.with_suffix(".gif"), text)
    return save_png(image, out.with_suffix(".png") if out.suffix.lower() != ".png" else out, text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        for name in preset_names()[:-1]:
            print(f"{name:12s} {from_preset(name).to_infotext_string()}")
        for family in ("sd3", "flux", "wan", "unet"):
            print(f"default {family:5s}{family_default(family).to_infotext_string()}")
        return 0
    try:
        path = generate(args)
    except (VSFSettingsError, TypeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
