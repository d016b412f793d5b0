"""Forge: SD3 and SD3.5 (Medium, Large, Large Turbo) through `backend/nn/mmditx.py`.

Detection: Forge's `StableDiffusion3` engine sets `is_sd3`, and its diffusion model is
`backend.nn.mmditx.MMDiTX`. Patch: `backend.nn.mmditx.attention` and `block_mixing` (see
`_sai_mmdit.py`). Conditioning: `{"crossattn": [B, 77k + T5, 4096], "vector": [B, 2048]}`; the
negative is cut to CLIP BOS + tokens + EOS per chunk plus T5 tokens + EOS, or CLIP only when T5 is off
(`sd3_enable_t5`), where Forge fills the T5 slot with zeros that must not count as tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

from ...patching import AttributePatch
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import class_is, diffusion_model
from ._sai_mmdit import check_mmdit_module, patch_mmdit_module
from .base import HostAdapter, SamplingContext

MODULE = "backend.nn.mmditx"


def t5_enabled() -> bool:
    """Forge's `sd3_enable_t5` option (off by default)."""
    try:
        from modules.shared import opts  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return False
    return bool(getattr(opts, "sd3_enable_t5", False))


class ForgeMMDiTAdapter(HostAdapter):
    """Forge SD3 / SD3.5: VSF in every joint attention of the MMDiT, text first."""

    name = "forge-sd3"
    host = "forge"
    family = "sd3"
    label = "Forge SD3/SD3.5"
    priority = 50

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return class_is(diffusion_model(sd_model), MODULE, "MMDiTX") and _forge_sampling.is_forge()

    def _module(self):
        from backend.nn import mmditx  # type: ignore[import-not-found]
        return mmditx

    def check(self) -> None:
        check_mmdit_module(self._module())

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        model = self.sd_model
        use_t5 = t5_enabled()

        def encode(prompt: str):
            cond = _negative_text.host_encode(p, model, prompt)
            clip = _negative_text.clip_chunk_lengths(model.text_processing_engine_l, prompt)
            t5 = _negative_text.t5_length(model.text_processing_engine_t5, prompt) if use_t5 else 0
            return _negative_text.unpad_clip_t5(cond["crossattn"], clip, t5)

        return _negative_text.encode_each(negative_prompts, encode)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        return patch_mmdit_module(self._module(), run)

    def backend_note(self) -> str | None:
        # The SAI file calls SDPA itself, whatever Forge's attention setting says.
        return None
