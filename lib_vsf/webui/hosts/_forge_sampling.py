"""Forge-family sampling glue (Forge, Forge Neo, reForge): the per-pass model wrapper that carries
the negative into the model, one conditional pass, and the attention-backend note.

Host-free at import (Forge modules are imported inside functions); the adapter registry skips this module.

How the negative reaches the model in Forge (`backend/sampling/sampling_function.py`): every model call
goes through `model_options["model_function_wrapper"](apply_model, {"input", "timestep", "c",
"cond_or_uncond"})` when one is set. `attach_forge()` clones the pass's `UnetPatcher` (Forge rebuilds
`forge_objects` from `forge_objects_after_applying_lora` before every pass, so the clone dies with the
pass and LoRA patches carry over), installs a wrapper that appends the negative tokens to
`c["c_crossattn"]` for COND chunks of guided steps (UNCOND chunks get masked-out rows) and records the
text stream in the `GuidanceRun` (with the run's negative image, if any, marked for the COND rows only), chaining any wrapper another extension set before. One conditional
pass: a conditioning modifier returns `cond_scale = 1` and no uncond (Forge itself drops uncond at
`cond_scale == 1`; `p.uc` is None at CFG 1, which is why the negative is encoded by the extension,
`_negative_text.py`, not taken from the host's uncond).
"""
from __future__ import annotations

from typing import Any

import torch

from ._guided import warn_once
from .base import COND, SamplingContext, append_negative


def is_forge() -> bool:
    """The running host has Forge's backend (Forge, or a Forge fork)."""
    try:
        import backend.sampling.sampling_function  # type: ignore[import-not-found] # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def attach_forge(p: Any, ctx: SamplingContext) -> None:
    """Install the per-pass model wrapper (negative into `c_crossattn`) and, if asked, one
    conditional pass, on a clone of the pass's UnetPatcher (see the module docstring)."""
    unet = p.sd_model.forge_objects.unet.clone()
    previous = unet.model_options.get("model_function_wrapper")
    run = ctx.run

    def vsf_model_function_wrapper(apply_model, args):
        c = dict(args["c"])
        kinds = list(args.get("cond_or_uncond") or [])
        context = c.get("c_crossattn")
        negative = rows = None
        if isinstance(context, torch.Tensor) and ctx.guided_now() and (not kinds or COND in kinds):
            try:
                negative = ctx.negative_for_chunks(kinds, context.shape[0])
                rows = ctx.cond_rows(kinds, context.shape[0])
            except ValueError as exc:  # rows that do not map onto the batch's images: run this call plain
                warn_once("forge-rows", f"model call without VSF: {exc}")
                negative = None
        image = run.negative_image
        if negative is not None and image is not None:  # Neo's edit models: the text negative may be empty
            text = None if negative.is_empty else negative
            if text is not None:
                c["c_crossattn"] = append_negative(context, text)
            run.set_text(context.shape[1], text, negative_image_len=image.length, negative_image_rows=rows)
        elif negative is not None:
            c["c_crossattn"] = append_negative(context, negative)
            run.set_text(context.shape[1], negative)
        else:
            run.set_text(0, None)
        try:
            if previous is not None:
                return previous(apply_model, {**args, "c": c})
            return apply_model(args["input"], args["timestep"], **c)
        finally:
            run.set_text(0, None)

    unet.set_model_unet_function_wrapper(vsf_model_function_wrapper)
    if ctx.single_pass:
        def vsf_single_pass(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            return model, x, timestep, None, cond, 1.0, model_options, seed

        unet.add_conditioning_modifier(vsf_single_pass)
    p.sd_model.forge_objects.unet = unet


def forge_backend_note() -> str | None:
    """Forge's attention setting: split / sub-quadratic / basic attention cannot carry VSF's mask or
    return a log-sum-exp, so guided calls use PyTorch SDPA. flash-attn, xformers and SageAttention are
    used by the fast path itself (`lib_vsf/webui/attention_backend.py`)."""
    try:
        from backend import attention  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    if getattr(attention, "attention_function", None) is getattr(attention, "attention_pytorch", object()):
        return None
    name = getattr(getattr(attention, "attention_function", None), "__name__", "unknown")
    if name in ("attention_sage", "attention_flash", "attention_xformers"):
        return None  # VSF's fast path runs on that library (or says after the pass why it could not)
    return (f"VSF computes its guided attention calls with PyTorch SDPA: your attention backend ({name}) "
            "cannot take the mask VSF needs; it still runs every unguided call.")
