"""Forge: Flux dev / schnell through `backend/nn/flux.py`.

Forge's `attention(q, k, v, pe)` applies RoPE and calls the `attention_function` that
`backend.nn.flux` bound at import, `(q, k, v, heads, skip_reshape=True)` on `[B, H, L, D]`, returning
`[B, L, H*D]`. Both block kinds put the text first (`cat(txt, img)`), and every call in the file is
joint, so the replacement guides each call whose sequence is longer than the announced text stream.
Conditioning: `{"crossattn": [B, >=256, 4096] (T5), "vector": pooled CLIP-L, "guidance"}`; the
negative is T5 tokens + EOS, extrapolated by lambda (paper eq. 10) against the null embedding of
`lib_vsf.flux_lambda` (the empty prompt's mean padding encoding, through Forge's own T5 engine).
The guided calls use PyTorch SDPA; Forge's other backends (xformers, split, sub-quadratic) cannot take
VSF's mask, so `backend_note()` says so when one of them is selected.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

from ...patching import AttributePatch, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import batch_fits, class_is, diffusion_model, guided_call
from .base import HostAdapter, SamplingContext

MODULE = "backend.nn.flux"


def check_flux_module(flux: ModuleType) -> None:
    """Raise PatchError unless `flux` is Forge's Flux file (`attention(q, k, v, pe)` calling a
    module-level `attention_function(q, k, v, heads, ..., skip_reshape)`)."""
    check_callable(flux, "attention", ("q", "k", "v", "pe"))
    # q, k, v are positional (the sub-quadratic kernel names them query, key, value)
    check_callable(flux, "attention_function", ("heads", "mask", "attn_precision", "skip_reshape"))


def patch_flux_module(flux: ModuleType, run: GuidanceRun) -> AttributePatch:
    """Checked, unapplied patch of `flux.attention_function` reading `run` on every call."""
    check_flux_module(flux)
    original = flux.attention_function

    def attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, **kwargs):
        length = q.shape[2] if skip_reshape else q.shape[1]
        if (run.negative_len == 0 or mask is not None or length <= run.text_len
                or not batch_fits(run, q.shape[0])):
            return original(q, k, v, heads, mask=mask, attn_precision=attn_precision,
                            skip_reshape=skip_reshape, **kwargs)
        layout = run.joint_layout(length, text_offset=0)  # text first in both block kinds
        return guided_call(q, k, v, heads, layout, run, joint=True, skip_reshape=skip_reshape)

    attention_function.__vsf_original__ = original
    return AttributePatch().add(flux, "attention_function", attention_function)


class ForgeFluxAdapter(HostAdapter):
    """Forge Flux dev/schnell: VSF in every double- and single-stream attention."""

    name = "forge-flux"
    host = "forge"
    family = "flux"
    label = "Forge Flux"
    priority = 50

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return (class_is(diffusion_model(sd_model), MODULE, "IntegratedFluxTransformer2DModel")
                and _forge_sampling.is_forge())

    def _module(self) -> ModuleType:
        from backend.nn import flux  # type: ignore[import-not-found]
        return flux

    def check(self) -> None:
        check_flux_module(self._module())

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        return _negative_text.encode_flux_negatives(p, self.sd_model, negative_prompts, settings)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        return patch_flux_module(self._module(), run)

    def backend_note(self) -> str | None:
        return _forge_sampling.forge_backend_note()
