"""AUTOMATIC1111 1.10: SD3 Medium through `modules/models/sd3/`.

Detection: `p.sd_model` is `modules.models.sd3.sd3_model.SD3Inferencer` with an
`modules.models.sd3.mmdit.MMDiT`. Patch: `modules.models.sd3.mmdit.attention` and `block_mixing` (see
`_sai_mmdit.py`). A1111 has no model-function wrapper, so the negative enters the text stream through
an instance-level replacement of `sd_model.apply_model(x, t, cond)` (undone after sampling), which
appends the negative rows to `cond["crossattn"]` for conditional rows. Uncond rows (single pass off)
are the rows equal to the step's `text_uncond`, which the runner's step callback records. One
conditional pass: the `skip_early_cond` option set to 1.0 for the sampling, restored afterwards
(written to `opts.data` directly: `opts.__setattr__` refuses under `--freeze-settings`), and the
"Skip Early CFG" infotext entry it causes set back to what it was before the pass (in the dict `p`
holds after sampling, which is not the one it held before: the infotext write replaces it).

Conditioning: `{"crossattn": [B, 77k + 77k, 4096], "vector": [B, 2048]}` (T5 part as long as the
CLIP part, zeros when T5 is off); the negative is cut like Forge's (CLIP BOS + tokens + EOS per chunk,
T5 tokens + EOS when T5 is on).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import torch

from ...patching import AttributePatch, PatchError, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _negative_text
from ._guided import class_is, warn_once
from ._sai_mmdit import check_mmdit_module, patch_mmdit_module
from .base import HostAdapter, SamplingContext, append_negative

MODEL_MODULE = "modules.models.sd3.sd3_model"
MMDIT_MODULE = "modules.models.sd3.mmdit"
SKIP_EARLY_COND = "skip_early_cond"
SKIP_EARLY_CFG_KEY = "Skip Early CFG"  # the infotext entry A1111 writes while the option skips uncond
_MISSING = object()


def _opts():
    from modules import shared  # type: ignore[import-not-found]
    return shared.opts


def uncond_rows(context: torch.Tensor, uncond: Any) -> torch.Tensor:
    """[B] bool: rows of `context` equal to some row of the step's uncond crossattn."""
    rows = torch.zeros(context.shape[0], dtype=torch.bool)
    if isinstance(uncond, dict):
        uncond = uncond.get("crossattn")
    if not isinstance(uncond, torch.Tensor) or uncond.shape[1:] != context.shape[1:]:
        return rows
    uncond = uncond.to(device=context.device, dtype=context.dtype)
    for i in range(context.shape[0]):
        rows[i] = bool((uncond == context[i]).flatten(1).all(dim=1).any())
    return rows


def negative_for_rows(ctx: SamplingContext, is_uncond: torch.Tensor) -> NegativeText | None:
    """Negative rows for a model call: conditional rows take the images' negatives in order (A1111
    repeats an image's row for AND sub-prompts, image-major), uncond rows get none. None when the
    conditional rows do not map onto the batch's images (a split sub-batch)."""
    cond_count = int((~is_uncond).sum())
    images = ctx.negative.embeds.shape[0]
    if cond_count == 0 or cond_count % images:
        return None
    guided = ctx.negative.for_batch(cond_count)
    embeds = guided.embeds.new_zeros(is_uncond.shape[0], *guided.embeds.shape[1:])
    mask = torch.zeros(is_uncond.shape[0], guided.length, dtype=torch.bool, device=guided.mask.device)
    embeds[~is_uncond] = guided.embeds
    mask[~is_uncond] = guided.mask
    return NegativeText(embeds, mask)


class A1111SD3Adapter(HostAdapter):
    """AUTOMATIC1111 SD3 Medium: VSF in every joint attention of the MMDiT, text first."""

    name = "a1111-sd3"
    host = "a1111"
    family = "sd3"
    label = "AUTOMATIC1111 SD3"
    priority = 50

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        inner = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        return class_is(sd_model, MODEL_MODULE, "SD3Inferencer") and class_is(inner, MMDIT_MODULE, "MMDiT")

    def _module(self) -> ModuleType:
        from modules.models.sd3 import mmdit  # type: ignore[import-not-found]
        return mmdit

    def check(self) -> None:
        check_mmdit_module(self._module())
        check_callable(self.sd_model, "apply_model", ("x", "t", "cond"))
        if not hasattr(_opts(), "data"):
            raise PatchError("shared.opts has no data dict (host version not supported)")

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        model = self.sd_model
        encoders = model.cond_stage_model
        opts = _opts()
        use_t5 = bool(getattr(opts, "sd3_enable_t5", False)) and getattr(encoders.model_t5, "t5xxl", None) is not None

        def encode(prompt: str):
            cond = _negative_text.host_encode(p, model, prompt)
            clip = _negative_text.clip_chunk_lengths(encoders.model_lg, prompt)
            t5 = 0
            if use_t5:
                tokens, _ = encoders.model_t5.tokenize_line(prompt)
                t5 = min(len(tokens), cond["crossattn"].shape[1] - len(clip) * _negative_text.CLIP_CHUNK)
            return _negative_text.unpad_clip_t5(cond["crossattn"], clip, t5)

        return _negative_text.encode_each(negative_prompts, encode)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        if ctx.single_pass:
            self._force_single_pass(p, ctx)
        original = self.sd_model.apply_model
        run = ctx.run

        def apply_model(x, t, cond):
            context = cond.get("crossattn") if isinstance(cond, dict) else None
            negative = None
            if isinstance(context, torch.Tensor) and ctx.guided_now():
                is_uncond = (torch.zeros(context.shape[0], dtype=torch.bool) if ctx.single_pass
                             else uncond_rows(context, ctx.host_state.get("text_uncond")))
                negative = negative_for_rows(ctx, is_uncond)
                if negative is None:
                    warn_once("a1111-rows", "batch rows do not map onto the images' negative prompts; "
                                            "this model call runs without VSF (enable 'batch cond/uncond').")
            if negative is None:
                run.set_text(0, None)
                return original(x, t, cond)
            run.set_text(context.shape[1], negative)
            try:
                return original(x, t, {**cond, "crossattn": append_negative(context, negative)})
            finally:
                run.set_text(0, None)

        patch = AttributePatch().add(self.sd_model, "apply_model", apply_model).apply()
        ctx.add_undo(patch.restore)

    def _force_single_pass(self, p: Any, ctx: SamplingContext) -> None:
        data = _opts().data
        before = data.get(SKIP_EARLY_COND, _MISSING)
        params = getattr(p, "extra_generation_params", None)
        infotext_before = params.get(SKIP_EARLY_CFG_KEY, _MISSING) if isinstance(params, dict) else _MISSING
        data[SKIP_EARLY_COND] = 1.0

        def restore():
            if before is _MISSING:
                data.pop(SKIP_EARLY_COND, None)
            else:
                data[SKIP_EARLY_COND] = before
            # A1111's CFG denoiser writes the key into whatever dict `p` holds while sampling, and the
            # infotext is written into a fresh dict during the pass: clean the dict `p` holds now. A fresh
            # dict again, never in place (X/Y/Z cells share one).
            current = getattr(p, "extra_generation_params", None)
            if not isinstance(current, dict) or current.get(SKIP_EARLY_CFG_KEY, _MISSING) is infotext_before:
                return
            cleaned = dict(current)
            if infotext_before is _MISSING:
                cleaned.pop(SKIP_EARLY_CFG_KEY, None)
            else:
                cleaned[SKIP_EARLY_CFG_KEY] = infotext_before
            p.extra_generation_params = cleaned

        ctx.add_undo(restore)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        return patch_mmdit_module(self._module(), run)
