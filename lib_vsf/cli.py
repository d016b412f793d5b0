"""Command line: `python -m lib_vsf generate ...` and `python -m lib_vsf presets`.

    python -m lib_vsf generate --model stabilityai/stable-diffusion-3.5-large-turbo \\
        --prompt "a cozy living room" --negative "plants" --preset "VSF Quality" --steps 8 --out room.png

Loads any supported diffusers pipeline (hub id or local directory), runs one guided conditional pass
and writes a PNG (video families: GIF or MP4) with the parameters as WebUI infotext. An empty negative
prompt gives the plain unguided image, and its infotext has no VSF keys. `--compare` writes one labelled
grid, unguided | VSF | NAG | NASA: every column shares the step window and lambda, each method keeps its
own numbers (the ones given, when it is the chosen method; else its preset / the family default), and
the infotext records every column (`compare_infotext`). `--show-map` also writes `NAME.map.png`: where
the negative acts (the per-token share of attention on the flipped negative, 1 - W, as a heatmap over
the image with its mean and max), and with `--compare` adds a "VSF map" column. VSF only: NAG and NASA
have no W. `--image PATH` (repeatable) gives an image-editing pipeline its input image(s);
`--negative-image PATH` (Flux Kontext, Qwen-Image-Edit) a picture to move away from, in the same pass,
with or without `--negative` (docs/negative-images.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .settings import (FAMILY_DEFAULTS, METHOD_LABELS, METHODS, PAPER_TUNED_FAMILIES, VSFSettings, VSFSettingsError,
                       family_default, from_preset, preset_names)
from .tiny import commands as tiny_commands

METHOD_PRESET = {"nag": "NAG", "nasa": "NASA"}
TINY_ENLARGE = 4  # the bundled model makes 32x32 images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_vsf", description="Value Sign Flip negative guidance")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image or video with guided negative prompt")
    gen.add_argument("--model", help="diffusers pipeline: hub id or local directory (default: the bundled tiny "
                     "model, lib_vsf/tiny, images enlarged 4x)")
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
    gen.add_argument("--negative-image", metavar="PATH",
                     help="negative image of an image-editing pipeline (Flux Kontext, Qwen-Image-Edit): "
                          "the output moves away from it, in the same single pass")
    gen.add_argument("--image", action="append", metavar="PATH",
                     help="input image of an image-editing pipeline (Qwen-Image-Edit, Flux Kontext); "
                          "repeat for several (Qwen-Image-Edit-Plus)")
    gen.add_argument("--device", help="cuda / cpu / mps (default: cuda if available)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bf16 on GPU, fp32 on CPU")
    gen.add_argument("--compare", action="store_true", help="write one grid: unguided | VSF | NAG | NASA")
    gen.add_argument("--show-map", action="store_true",
                     help="also write NAME.map.png: where the negative acts (VSF only); with --compare, a map column")
    gen.add_argument("--out", default="vsf.png", help="output path (.png; videos .gif or .mp4)")

    sub.add_parser("presets", help="list presets and per-family defaults")
    tiny_commands.add_subcommands(sub)
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


def _absent_components(model: str) -> dict:
    """{name: None} for the components a local pipeline directory saved as absent (`[null, null]` in its
    model_index.json, e.g. a pipeline without T5 such as the bundled tiny model or one written by
    `train-tiny`): diffusers wants them passed explicitly. A hub id or a directory without the file: {}."""
    index = Path(model) / "model_index.json"
    if not index.is_file():
        return {}
    import json

    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if not k.startswith("_") and v == [None, None]}


def _load(args):
    import torch
    from diffusers import DiffusionPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    from .tiny.model import bundled_path

    model = args.model or str(bundled_path())
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype_name), **_absent_components(model))
    return pipe.to(device), device


def input_images(args, pipe):
    """The `--image` files as RGB PIL images for `pipe` (one image, or a list when several are given);
    None without `--image`. A pipeline that takes no image is a clear error."""
    if not getattr(args, "image", None):
        return None
    import inspect

    if "image" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(f"--image: {type(pipe).__name__} takes no input image (it is not an image-editing pipeline)")
    from PIL import Image

    images = []
    for path in args.image:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images[0] if len(images) == 1 else images


def _call_kwargs(args, pipe, seed: int):
    import torch

    kwargs = dict(num_inference_steps=args.steps, output_type="pil",
                  generator=torch.Generator(device="cpu").manual_seed(seed))
    images = input_images(args, pipe)
    if images is not None:
        kwargs["image"] = images
    for name, value in (("width", args.width), ("height", args.height), ("num_frames", args.frames),
                        ("max_sequence_length", args.max_sequence_length), ("guidance_scale", args.guidance_scale)):
        if value is not None:
            kwargs[name] = value
    if args.width and args.height and _takes(pipe, "max_area"):
        kwargs["max_area"] = args.width * args.height  # Flux Kontext sizes its output from max_area
    return kwargs


def _takes(pipe, name: str) -> bool:
    import inspect

    return name in inspect.signature(pipe.__call__).parameters


def _frames(result):
    """(first image or frame list, is_video) of a pipeline output."""
    if hasattr(result, "frames"):
        return list(result.frames[0]), True
    return result.images[0], False


def compare_columns(settings: VSFSettings, family: str) -> list[tuple[str, VSFSettings | None]]:
    """(method label, settings) per grid column: unguided (None), then VSF, NAG, NASA. The chosen
    method's column is `settings` itself; the others take their own numbers (VSF: the family default,
    NAG / NASA: their presets) with the step window and lambda of `settings`."""
    own = {"vsf": family_default(family), "nag": from_preset("NAG"), "nasa": from_preset("NASA")}
    shared = dict(start=settings.start, end=settings.end, flux_lambda=settings.flux_lambda)
    columns: list[tuple[str, VSFSettings | None]] = [("unguided", None)]
    for method in METHODS:
        column = settings if method == settings.method else own[method].replace(**shared)
        columns.append((METHOD_LABELS[method], column))
    return columns


def compare_label(label: str, settings: VSFSettings | None) -> str:
    return label if settings is None else f"{label} a={settings.alpha:g} b={settings.beta:g}"


def compare_infotext(columns: list[tuple[str, VSFSettings | None]]) -> dict[str, str]:
    """Infotext entries of a comparison grid: `Compare` (the labels, left to right) and `Compare <i>`
    per column (1-based): `none` for the unguided column, else that column's full VSF infotext as one
    quoted value (`VSFSettings.from_infotext` reads it back)."""
    out = {"Compare": " | ".join(compare_label(label, s) for label, s in columns)}
    for i, (_, column) in enumerate(columns, 1):
        out[f"Compare {i}"] = "none" if column is None else column.to_infotext_string()
    return out


def negative_image(args):
    """The `--negative-image` file as an RGB PIL image, or None."""
    path = getattr(args, "negative_image", None)
    if not path:
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _run(pipe, adapter, args, settings: VSFSettings | None, negative_map: bool = False):
    """(image or frames, is_video, negative map of the first image or None)."""
    from .diffusers import VSFGuidance

    kwargs = _call_kwargs(args, pipe, args.seed)
    if settings is None:
        image, is_video = _frames(pipe(prompt=args.prompt, **adapter.single_pass_kwargs(kwargs)))
        return _enlarged(args, image), is_video, None
    with VSFGuidance(pipe, args.negative, settings, negative_map=negative_map,
                     negative_image=negative_image(args)) as vsf:
        image, is_video = _frames(vsf(prompt=args.prompt, **kwargs))
        share = vsf.negative_map()
    return _enlarged(args, image), is_video, None if share is None else share[0]


def _enlarged(args, image):
    """The bundled tiny model's 32x32 image enlarged TINY_ENLARGE times (nearest); others unchanged."""
    if args.model is not None or isinstance(image, list):
        return image
    from PIL import Image

    return image.resize((image.width * TINY_ENLARGE, image.height * TINY_ENLARGE), Image.NEAREST)


def map_unavailable(settings: VSFSettings | None) -> str | None:
    """Why `--show-map` cannot draw a map for this run, or None when it can."""
    if settings is None:
        return "the negative prompt is empty: there is no negative to map"
    if settings.method != "vsf":
        return (f"the negative-attention map is defined for VSF only ({settings.method.upper()} has no "
                "attention weight W on the negative); no map written")
    return None


def _write_map(image, share, path: Path, text: str) -> Path:
    from .output import negative_map_image, negative_share_figure, save_png
    from .settings import _quote

    figure = negative_share_figure(share)
    written = save_png(negative_map_image(image, share), path, f"{text}, VSF map: {_quote(figure)}")
    print(f"map: {written} ({figure})", file=sys.stderr)
    return written


def _params(args, settings: VSFSettings | None, size) -> dict[str, object]:
    if args.model is None:  # generated size, not the enlarged one
        size = (size[0] // TINY_ENLARGE, size[1] // TINY_ENLARGE)
    model = "lib_vsf-tiny" if args.model is None else Path(args.model.rstrip("/")).name or args.model
    params: dict[str, object] = {"Steps": args.steps, "Seed": args.seed, "Size": f"{size[0]}x{size[1]}",
                                 "Model": model}
    if args.frames:
        params["Frames"] = args.frames
    if getattr(args, "negative_image", None):
        params["Negative image"] = Path(args.negative_image).name
    if settings is not None:
        params.update(settings.to_infotext())
    return params


def generate(args) -> Path:
    """Run `generate`; returns the written path."""
    from .diffusers import family_for
    from .output import infotext, labelled_grid, save_png, save_video

    guided = bool(args.negative.strip()) or bool(getattr(args, "negative_image", None))
    if args.compare and not guided:
        raise ValueError("--compare needs a negative prompt: without one every column is the unguided image")
    pipe, _ = _load(args)
    adapter = family_for(pipe)
    settings = resolve_settings(args, adapter.family)  # validated even when the image will be plain
    input_images(args, pipe)  # --image checked (and readable) before any run
    negative_image(args)  # and --negative-image
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        from .output import negative_map_image, negative_share_figure

        columns = compare_columns(settings, adapter.family)
        images, labels, vsf_map = [], [compare_label(label, column) for label, column in columns], None
        for label, column in columns:
            print(f"[{len(images) + 1}/{len(columns)}] {label}", file=sys.stderr, flush=True)
            wants_map = args.show_map and column is not None and column.method == "vsf"
            image, is_video, share = _run(pipe, adapter, args, column, negative_map=wants_map)
            images.append(image[0] if is_video else image)  # videos: compare first frames
            if share is not None:
                vsf_map = (images[-1], share)
        if vsf_map is not None:  # one more column: where the VSF column's negative acted
            images.append(negative_map_image(*vsf_map, caption=False))
            figure = negative_share_figure(vsf_map[1])
            numbers = figure.split(": ", 1)[1].split(" (", 1)[0].replace(",", "")
            labels.append(f"VSF map {numbers}" + (" (tiny)" if "tiny" in figure else ""))
        elif args.show_map:
            print("note: no map column: the VSF column recorded no map", file=sys.stderr)
        grid = labelled_grid(images, labels)
        params = {**_params(args, settings, images[0].size), **compare_infotext(columns)}
        return save_png(grid, out.with_suffix(".png"), infotext(args.prompt, args.negative, params))
    if not guided:
        print("note: the negative prompt is empty: writing the plain unguided image (no VSF parameters)",
              file=sys.stderr)
        settings = None
    unavailable = map_unavailable(settings) if args.show_map else None
    if unavailable:
        print(f"note: {unavailable}", file=sys.stderr)
    image, is_video, share = _run(pipe, adapter, args, settings, negative_map=args.show_map and not unavailable)
    text = infotext(args.prompt, args.negative, _params(args, settings, (image[0] if is_video else image).size))
    if share is not None:
        _write_map(image[0] if is_video else image, share, out.with_suffix(".map.png"), text)
    elif args.show_map and not unavailable:
        print("note: no map: no attention call was guided (step window?)", file=sys.stderr)
    if is_video:
        return save_video(image, out if out.suffix.lower() in (".gif", ".mp4") else out.with_suffix(".gif"), text)
    return save_png(image, out.with_suffix(".png") if out.suffix.lower() != ".png" else out, text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handled = tiny_commands.run(args)
    if handled is not None:
        return handled
    if args.command == "presets":
        for name in preset_names()[:-1]:
            print(f"{name:12s} {from_preset(name).to_infotext_string()}")
        width = max(map(len, FAMILY_DEFAULTS))
        for family in FAMILY_DEFAULTS:
            untuned = "" if family in PAPER_TUNED_FAMILIES else "  (untuned starting point)"
            print(f"default {family:{width}s} {family_default(family).to_infotext_string()}{untuned}")
        return 0
    try:
        path = generate(args)
    except (VSFSettingsError, TypeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
