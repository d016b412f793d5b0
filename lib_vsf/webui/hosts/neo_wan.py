"""Forge Neo: Wan 2.1 / 2.2 video models (T2V, I2V), VSF in the text cross-attention (paper eq. 9).

In Neo's `backend/nn/wan.py` every attention goes through the module-level name
`backend.nn.wan.attention_function(q, k, v, heads=...)` with `[B, L, H*D]` tensors and no mask:
self-attention (via the file's `attention` wrapper), the text cross-attention
(`WanT2VCrossAttention.forward`), and Wan 2.1 I2V's cross-attention (`WanI2VCrossAttention.forward`),
which splits `context = [257 CLIP image tokens, text]` and calls attention twice, image first, then
text, and adds the results.

The patch replaces `attention_function` and wraps the two cross-attention `forward` methods so that
they open a call scope (see `_guided.py`): only calls inside a cross-attention scope whose key count is
the announced text length are guided; for I2V the first call (the image tokens) passes through
untouched. Self-attention can never be guided, whatever the video's token count. Wan 2.2's low-noise
expert ("Refiner") is swapped in mid-sampling, sometimes as a new model instance: the module- and
class-level patch survives the swap, and `follow_refiner` puts the per-pass hook that appends the
negative on a newly loaded expert, so both experts are guided.
"""
from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any, Sequence

from ...patching import AttributePatch, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import (CallScope, ScopeState, check_attention_function, class_is, diffusion_model, is_forge_neo,
                      make_scoped_cross_attention, warn_once)
from .base import HostAdapter, SamplingContext, real_length

WAN_MODULE = "backend.nn.wan"

CROSS_SCOPE = CallScope("vsf_neo_wan_cross_attention")


def umt5_length(engine: Any, prompt: str) -> int:
    """Real positions (tokens + EOS) of the first chunk Neo's UMT5 engine makes of `prompt`; the
    engine pads with zeros after the EOS (`end_token`; a T5 engine names it `id_end`)."""
    chunks, _ = engine.tokenize_line(prompt)
    if not chunks:
        return 0
    end = getattr(engine, "end_token", None)
    if end is None:
        end = engine.id_end
    return real_length(list(chunks[0].tokens), end, has_start=False)


def check_wan_module(wan: ModuleType) -> None:
    """Raise PatchError unless `wan` has the attention name and the cross-attention classes we wrap."""
    check_attention_function(wan, "attention_function", ("heads",))
    for class_name, params in (("WanT2VCrossAttention", ("x", "context")),
                               ("WanI2VCrossAttention", ("x", "context", "context_img_len"))):
        check_callable(check_callable(wan, class_name), "forward", params)


def _t2v_scope(*args, **kwargs) -> ScopeState:
    return ScopeState(once=True)


def _i2v_scope(*args, **kwargs) -> ScopeState:
    # Host order (seen in Neo's wan.py): attention over the image tokens first, then over the text.
    return ScopeState(skip_calls=1, once=True)


def make_wan_attention(original, run: GuidanceRun):
    """Replacement for `backend.nn.wan.attention_function`: guided inside a cross-attention scope
    when the keys are exactly the text stream `[P, N]`."""
    return make_scoped_cross_attention(original, run, CROSS_SCOPE)


def patch_wan(wan: ModuleType, run: GuidanceRun) -> AttributePatch:
    """Checked, unapplied patch of Neo's Wan file (PatchError if the host differs)."""
    check_wan_module(wan)
    t2v, i2v = wan.WanT2VCrossAttention, wan.WanI2VCrossAttention
    return (AttributePatch()
            .add(wan, "attention_function", make_wan_attention(wan.attention_function, run))
            .add(t2v, "forward", CROSS_SCOPE.wrap(t2v.forward, _t2v_scope))
            .add(i2v, "forward", CROSS_SCOPE.wrap(i2v.forward, _i2v_scope)))


def _has_vsf_hook(sd_model: Any) -> bool:
    """The model's current UnetPatcher already carries the per-pass hook of `_forge_sampling.attach_forge`."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    wrapper = getattr(unet, "model_options", {}).get("model_function_wrapper")
    return getattr(wrapper, "__name__", "") == "vsf_model_function_wrapper"


def _loaded_model(fallback: Any) -> Any:
    try:
        from modules import sd_models  # type: ignore[import-not-found]
        return sd_models.model_data.get_sd_model()
    except Exception:  # noqa: BLE001
        return fallback


def follow_refiner(sd_samplers_common: ModuleType, sd_model: Any, ctx: SamplingContext,
                   loaded_model=_loaded_model) -> None:
    """Wrap Neo's `sd_samplers_common.apply_refiner(cfg_denoiser, x, sigma)` for this sampling pass
    (undone by the runner): when it switched to a refiner that is a new model object (Wan 2.2's
    low-noise expert loaded by checkpoint reload), install the same per-pass hook on that model's
    UnetPatcher, so the negative keeps reaching the text stream. The fast state-dict swap keeps the
    model object (and the hook): nothing to do. A refiner of another family is left alone."""
    original = getattr(sd_samplers_common, "apply_refiner", None)
    if not callable(original):
        return

    def apply_refiner(cfg_denoiser, x, sigma, *args, **kwargs):
        switched = original(cfg_denoiser, x, sigma, *args, **kwargs)
        if switched:
            refiner = loaded_model(sd_model)
            if refiner is not None and not _has_vsf_hook(refiner) and NeoWanAdapter.matches(refiner):
                try:
                    _forge_sampling.attach_forge(SimpleNamespace(sd_model=refiner), ctx)
                except Exception as exc:  # noqa: BLE001 - never break the generation over guidance
                    warn_once("neo-wan-refiner", f"could not guide the refiner model ({exc}); it runs without VSF.")
        return switched

    apply_refiner.__vsf_original__ = original
    patch = AttributePatch().add(sd_samplers_common, "apply_refiner", apply_refiner).apply()
    ctx.add_undo(patch.restore)


class NeoWanAdapter(HostAdapter):
    """Forge Neo Wan 2.1/2.2 (T2V, I2V, both Wan 2.2 experts): VSF in the text cross-attention."""

    name = "neo-wan"
    host = "neo"
    family = "wan"
    label = "Forge Neo Wan 2.1/2.2"
    priority = 20

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return class_is(diffusion_model(sd_model), WAN_MODULE, "WanModel") and is_forge_neo()

    def _module(self) -> ModuleType:
        from backend.nn import wan  # type: ignore[import-not-found]
        return wan

    def check(self) -> None:
        check_wan_module(self._module())

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        """UMT5 tokens + EOS of each negative; Wan's zeroed padding is cut (no lambda: Flux only)."""
        model = self.sd_model

        def encode(prompt: str):
            cond = _negative_text.host_encode(p, model, prompt)  # runs the engine first: it sets its emphasis mode
            return cond["crossattn"][0, : umt5_length(model.text_processing_engine_t5, prompt)]

        return _negative_text.encode_each(negative_prompts, encode)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        """Neo keeps Forge's sampling hooks; the negative joins `c_crossattn` after the 512 positive
        UMT5 positions (I2V image tokens travel separately as `clip_fea`). Also follows a Wan 2.2
        low-noise expert that Neo loads as a new model mid-sampling (`follow_refiner`)."""
        _forge_sampling.attach_forge(p, ctx)
        try:
            from modules import sd_samplers_common  # type: ignore[import-not-found]
        except Exception:  # noqa: BLE001 - no WebUI (tests, other hosts): nothing to follow
            return
        follow_refiner(sd_samplers_common, self.sd_model, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        return patch_wan(self._module(), run)

    def backend_note(self) -> str | None:
        return _forge_sampling.forge_backend_note()
