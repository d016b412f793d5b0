"""Forge Neo: Flux.2 Klein (4B / 9B) joint attention.

Neo runs Flux.2 through the same `backend/nn/flux.py` classes as Flux.1 (`IntegratedFluxTransformer2DModel`
built with `global_modulation=True` and text ids on axis 3), so every attention goes through
`backend.nn.flux.attention_function` after RoPE, text first: the Flux patch of `neo_flux.py` carries the
mask table as is (`[P, N0, I]`, one sequence in double and single blocks). What differs from Flux.1:

- The negative is encoded by Neo's own Klein text engine (`KleinTextProcessingEngine`: Qwen3 chat
  template, hidden layers 9 / 18 / 27, emphasis) exactly as for a negative pass, then its padding rows
  (the engine pads to 512 with its pad id; the DiT attends to every position it is given) are dropped.
- Text ids: Neo gives the whole text stream ids `(0, 0, 0, l)` with `l = 0..L-1`, so appended negative
  tokens would sit at `l = Lp..Lp+n-1`. In a negative pass they sit at `0..n-1` (the image does not move
  with the text), so the adapter wraps this model's `forward_orig` and gives the negative rows those ids.
- No lambda extrapolation (that is Flux.1's T5 null, paper eq. 10).
- Reference images (Klein editing, `ref_latents`) would need their own rows of the mask table: refused.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch

from ...patching import AttributePatch, PatchError, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import class_is, diffusion_model, is_forge_neo
from .base import HostAdapter, SamplingContext
from .neo_flux import FLUX_MODULE, check_flux_module, make_flux_attention


def is_flux2(model: Any) -> bool:
    """Neo's Flux class configured as Flux.2 (global modulation, text ids on an axis)."""
    return (class_is(model, FLUX_MODULE, "IntegratedFluxTransformer2DModel")
            and bool(getattr(model, "global_modulation", False)))


def klein_engine(sd_model: Any) -> Any:
    """Neo's Klein text engine of the loaded model (the attribute name is Neo's)."""
    return getattr(sd_model, "text_processing_engine_gemma", None)


def check_klein_engine(engine: Any) -> None:
    if engine is None:
        raise PatchError("the Flux.2 model has no Klein text engine (host version not supported)")
    for name in ("tokenize_line", "process_tokens"):
        check_callable(engine, name)
    if not isinstance(getattr(engine, "id_pad", None), int):
        raise PatchError("the Klein text engine has no integer id_pad (host version not supported)")


def encode_klein_negative(engine: Any, prompt: str) -> torch.Tensor:
    """`[n, E]` states of `prompt`'s real tokens (chat template included, padding excluded) from Neo's
    Klein engine. The engine encodes as in a negative pass (padded to 512 with its pad id, masked in the
    text encoder; its emphasis normalisation spans that whole chunk), and the padding rows are dropped:
    the DiT would attend to them (and VSF would flip them)."""
    states = engine([prompt])[0]  # runs the engine as the host does; it also sets its emphasis mode
    tokens = list(engine.tokenize_line(prompt)[0].tokens)
    real = tokens.index(engine.id_pad) if engine.id_pad in tokens else len(tokens)
    return states[:real]


def make_forward_orig(original, run: GuidanceRun):
    """`forward_orig` giving the negative rows of the text stream the ids of a negative pass."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward_orig(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        txt, txt_ids = bound.arguments.get("txt"), bound.arguments.get("txt_ids")
        model = getattr(original, "__self__", None)
        if run.negative_len and txt is not None and txt_ids is not None and txt.shape[1] == run.text_len:
            txt_ids = txt_ids.clone()
            negative = slice(run.positive_len, run.text_len)
            for axis in getattr(model, "txt_ids_dims", ()):
                txt_ids[:, negative, axis] = torch.arange(run.negative_len, device=txt_ids.device, dtype=txt_ids.dtype)
            bound.arguments["txt_ids"] = txt_ids
        return original(*bound.args, **bound.kwargs)

    forward_orig.__vsf_original__ = original
    return forward_orig


class NeoFlux2Adapter(HostAdapter):
    """Forge Neo Flux.2 Klein: VSF in every joint attention, text first, negative at its own text ids."""

    name = "neo-flux2"
    host = "neo"
    family = "flux2"
    label = "Forge Neo Flux.2 Klein"
    priority = 15  # before neo-flux: the same model class serves Flux.1 and Flux.2

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return is_flux2(diffusion_model(sd_model)) and is_forge_neo()

    def _module(self):
        from backend.nn import flux  # type: ignore[import-not-found]
        return flux

    def check(self) -> None:
        check_flux_module(self._module())
        model = diffusion_model(self.sd_model)
        check_callable(model, "forward_orig", ("txt", "txt_ids"))
        if not isinstance(getattr(model, "txt_ids_dims", None), (list, tuple)):
            raise PatchError("Neo's Flux.2 model has no txt_ids_dims (host version not supported)")
        check_klein_engine(klein_engine(self.sd_model))
        try:
            from backend.args import dynamic_args  # type: ignore[import-not-found]
        except Exception:  # noqa: BLE001
            dynamic_args = {}
        if dynamic_args.get("ref_latents"):
            raise PatchError("VSF does not support Flux.2 reference images yet")

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        engine = klein_engine(self.sd_model)
        try:
            from backend import memory_management  # type: ignore[import-not-found]

            memory_management.load_model_gpu(self.sd_model.forge_objects.clip.patcher)
        except (ImportError, AttributeError):
            pass

        def encode(prompt: str) -> torch.Tensor:
            if not str(prompt or "").strip():
                return torch.zeros(0, self._text_width())
            with torch.inference_mode():
                return encode_klein_negative(engine, str(prompt)).clone()

        return _negative_text.encode_each(list(negative_prompts), encode)

    def _text_width(self) -> int:
        return int(diffusion_model(self.sd_model).txt_in.in_features)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        flux = self._module()
        check_flux_module(flux)
        model = diffusion_model(self.sd_model)
        return (AttributePatch()
                .add(flux, "attention_function", make_flux_attention(flux.attention_function, run))
                .add(model, "forward_orig", make_forward_orig(model.forward_orig, run)))

    def backend_note(self) -> str | None:
        return _forge_sampling.forge_backend_note()
