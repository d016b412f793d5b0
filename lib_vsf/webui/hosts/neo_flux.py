"""Forge Neo: Flux (dev/schnell/Kontext/Krea) and Chroma joint attention.

Neo's `backend/nn/flux.py` (a ComfyUI port) concatenates text first, `cat(txt, img)`, in both the
double- and single-stream blocks and computes every attention as

    backend.nn.flux.attention(q, k, v, pe, mask=None, transformer_options={})
      -> RoPE -> backend.nn.flux.attention_function(q, k, v, heads, skip_reshape=True, mask=mask, ...)

with `[B, H, L, D]` tensors. Neo binds `attention_function` into each model file at import, so the
name to replace is `backend.nn.flux.attention_function` (after RoPE, nothing of the host's math is
redone here); `backend.attention.attention_function` reaches none of the models. Chroma builds its
blocks from the same classes, so the same name covers it. Every call in that file is a joint call over
`[text, image(, Kontext references)]`: the call is guided when the sequence is longer than the text
stream the runner announced (`run.text_len`). Calls with an attention mask (Chroma with a T5 mask)
run unguided, with one warning: the mask would have to be merged with VSF's own.

Flux Kontext: `IntegratedFluxTransformer2DModel.forward` appends the tokens of every reference latent
(`backend.args.dynamic_args["ref_latents"]`, filled by Neo's Flux engine when Kontext is on) after the
image tokens, so both block kinds see `[P, N0, I, R]`. The adapter wraps the model's `forward`
(`_reference_tokens.ImageStream`) to know how many of the tokens after the text are the generated image;
the rest are `R` (`TokenLayout.reference`): R rows attend to I, P, R, N0 rows to I, R, N0, and only image
rows see N1 (VSF-SPEC "Families beyond the paper").

Negative images (Kontext only: `dynamic_args["kontext"]`, docs/negative-images.md "Forge Neo"): encoded as
the engine encodes a reference, appended by the wrapped `forward` as the next reference for guided calls,
and moved to `[P, N_txt | N_img, I, R]` for the guided attention (`_reference_tokens.guided_joint_call`).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import torch

from ...patching import AttributePatch, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._reference_tokens import ImageStream, ReferenceLatent, guided_joint_call, latent_tokens, reference_pixels
from ._guided import (batch_fits, check_attention_function, class_is, diffusion_model, guided_call, is_forge_neo,
                      split_mask_arg, warn_once)
from .base import HostAdapter, SamplingContext

FLUX_MODULE = "backend.nn.flux"
CHROMA_MODULE = "backend.nn.chroma"
MODEL_CLASSES = ((FLUX_MODULE, "IntegratedFluxTransformer2DModel"),
                 (CHROMA_MODULE, "IntegratedChromaTransformer2DModel"))


def check_flux_module(flux: ModuleType) -> None:
    """Raise PatchError unless `flux` is Neo's Flux file: `attention(q, k, v, pe, mask,
    transformer_options)` calling a module-level `attention_function(q, k, v, heads, ...)`."""
    check_callable(flux, "attention", ("q", "k", "v", "pe", "mask", "transformer_options"))
    check_attention_function(flux, "attention_function", ("mask", "skip_reshape"))


def make_flux_attention(original, run: GuidanceRun, stream: ImageStream | None = None):
    """Replacement for `backend.nn.flux.attention_function` reading `run` on every call; `stream` (the
    model's wrapped `forward`) tells where reference tokens sit, without it every non-text token is an
    image token."""

    def flux_attention_function(q, k, v, heads, *args, **kwargs):
        skip_reshape = kwargs.get("skip_reshape", False)
        length = q.shape[2] if skip_reshape else q.shape[1]
        mask = split_mask_arg(args, kwargs)
        if run.negative_len == 0 or length <= run.text_len or not batch_fits(run, q.shape[0]):
            return original(q, k, v, heads, *args, **kwargs)
        if mask is not None:
            warn_once("neo-flux-mask", "Flux/Chroma attention mask present: this call runs without VSF.")
            return original(q, k, v, heads, *args, **kwargs)
        if stream is None:
            layout = run.joint_layout(length, text_offset=0)  # Neo Flux: text first
            return guided_call(q, k, v, heads, layout, run, joint=True, skip_reshape=skip_reshape,
                               skip_output_reshape=kwargs.get("skip_output_reshape", False))
        return guided_joint_call(stream, run, q, k, v, heads, skip_reshape=skip_reshape,
                                 skip_output_reshape=kwargs.get("skip_output_reshape", False))

    flux_attention_function.__vsf_original__ = original
    return flux_attention_function


def patch_flux(flux: ModuleType, run: GuidanceRun, model: Any = None) -> AttributePatch:
    """Checked, unapplied patch of `flux.attention_function` (PatchError if the host differs); with
    `model`, also of that model's `forward`, so that Kontext reference tokens are told from the image."""
    check_flux_module(flux)
    if model is None:
        return AttributePatch().add(flux, "attention_function", make_flux_attention(flux.attention_function, run))
    check_callable(model, "forward", ("x", "timestep", "context"))
    stream = ImageStream(getattr(model, "patch_size", 2), run, getattr(flux, "dynamic_args", None))
    return (AttributePatch()
            .add(flux, "attention_function", make_flux_attention(flux.attention_function, run, stream))
            .add(model, "forward", stream.wrap_forward(model.forward)))


class NeoFluxAdapter(HostAdapter):
    """Forge Neo Flux / Chroma: VSF in every joint attention, text first."""

    name = "neo-flux"
    host = "neo"
    family = "flux"
    label = "Forge Neo Flux/Chroma"
    priority = 20  # before Forge's Flux adapter: both see backend.nn.flux models

    def __init__(self, sd_model: Any):
        super().__init__(sd_model)
        # Chroma takes its own family default (no lambda rule: it is trained with real CFG on negatives;
        # see lib_vsf/diffusers/chroma.py), the same as in the diffusers path. A lambda the user sets is used.
        if class_is(diffusion_model(sd_model), CHROMA_MODULE, "IntegratedChromaTransformer2DModel"):
            self.family = "chroma"

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        model = diffusion_model(sd_model)
        # Neo builds Flux.2 from the same class with global modulation: that is `neo_flux2`'s model.
        return (any(class_is(model, m, n) for m, n in MODEL_CLASSES) and not getattr(model, "global_modulation", False)
                and is_forge_neo())

    def _module(self) -> ModuleType:
        from backend.nn import flux  # type: ignore[import-not-found]
        return flux

    def check(self) -> None:
        check_flux_module(self._module())

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        """T5 tokens + EOS of each negative (Flux and Chroma both encode with Neo's T5 engine), with
        the lambda extrapolation (paper eq. 10) against the null embedding of `lib_vsf.flux_lambda`:
        the empty prompt's mean padding encoding through Neo's T5 engine (Chroma's engine pads nothing,
        so its null is the empty prompt padded to Flux's 256)."""
        return _negative_text.encode_flux_negatives(p, self.sd_model, negative_prompts, settings)

    def takes_negative_image(self) -> bool:
        """Flux Kontext: Neo's loader sets `dynamic_args["kontext"]` for a Kontext checkpoint, and only then
        does its Flux engine hand reference latents to the model (Chroma's model reads none)."""
        return self.family == "flux" and bool(getattr(self._module(), "dynamic_args", {}).get("kontext"))

    def encode_negative_image(self, p: Any, image: Any) -> ReferenceLatent:
        """The picture as Neo's Flux engine encodes a Kontext reference (`encode_first_stage` without its
        side effects on the engine's references): at the generation's size, the VAE, `process_in`."""
        vae = self.sd_model.forge_objects.vae
        pixels = reference_pixels(image, p.width, p.height)
        with torch.no_grad():
            latent = vae.first_stage_model.process_in(vae.encode(pixels))
        return ReferenceLatent(latent.cpu(), latent_tokens(latent, getattr(diffusion_model(self.sd_model), "patch_size", 2)))

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        """Neo keeps Forge's sampling hooks (`model_function_wrapper`, conditioning modifiers)."""
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        return patch_flux(self._module(), run, diffusion_model(self.sd_model))

    def backend_note(self) -> str | None:
        return _forge_sampling.forge_backend_note()
