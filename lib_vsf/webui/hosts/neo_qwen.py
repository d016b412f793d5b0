"""Forge Neo: Qwen-Image and Qwen-Image-Edit (`backend/nn/qwen.py` `QwenImageTransformer2DModel`).

Neo's Qwen-Image is double-stream: every block projects text and image separately, concatenates them
text first, applies MSRoPE and calls the module-level

    backend.nn.qwen.attention_function(q, k, v, heads, mask)     # [B, L, H*D], mask None

so the name to replace is `backend.nn.qwen.attention_function` (after RoPE; nothing of the host's math
is redone). Everything else in a block is per token. VSF (VSF-SPEC "Families beyond the paper"):

- The negative is Neo's own Qwen2.5-VL text engine output for it, exactly its negative pass's
  conditioning (`QwenImage.get_learned_conditioning` for a negative prompt: the text engine on the prompt
  alone, chat template stripped, emphasis as set). That engine pads nothing (`min_length` 1), so the rows
  are unpadded as they come. The Forge-family glue appends them to the text context, as for every family.
- Positive mask: Neo's model takes an `attention_mask` but hands it to no attention call (the text
  attends to every position it is given), so there is no positive mask to keep
  (`TokenLayout.positive_mask` stays None). An attention call that does carry a mask runs unguided, with
  one warning.
- MSRoPE: Neo puts the text after the image on all three axes, ids `s + j` with `s` from the image size
  alone, so a negative pass gives its token `j` the ids `s + j`. Appended after the positive, the negative
  would get `s + Lp + j`: the adapter wraps the model's `pe_embedder` and gives the negative rows `s + j`.
- Qwen-Image-Edit: the model's `forward` appends the reference latents (`dynamic_args["ref_latents"]`,
  set by Neo's engine from the input images) after the image tokens. The adapter wraps `forward`
  (`_reference_tokens.ImageStream`) to know where the image ends; the rest are `R` tokens: R rows attend
  to I, P, R, N0 rows to I, R, N0, only image rows see N1. The negative pass of Neo's Edit encodes the
  negative prompt without the input images (text template), and so does the adapter.
- Negative images (Edit only: `dynamic_args["edit"]`, docs/negative-images.md "Forge Neo"): encoded by the
  engine's own `encode_vision`, appended by the wrapped `forward` as the next reference (Neo gives it the
  next frame index), moved to `[P, N_txt | N_img, I, R]` for the guided attention
  (`_reference_tokens.guided_joint_call`); the text negative's MSRoPE fix above touches text rows only.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from ...patching import AttributePatch, PatchError, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import (batch_fits, check_attention_function, class_is, diffusion_model, is_forge_neo, split_mask_arg,
                      warn_once)
from ._reference_tokens import ImageStream, ReferenceLatent, guided_joint_call, latent_tokens, reference_pixels
from .base import HostAdapter, SamplingContext

QWEN_MODULE = "backend.nn.qwen"


def is_qwen_image(model: Any) -> bool:
    """Neo's Qwen-Image transformer (Qwen-Image and Qwen-Image-Edit share the class)."""
    return class_is(model, QWEN_MODULE, "QwenImageTransformer2DModel")


class GuidedQwen:
    """The three replacements of one patch: the model's `forward` (where the image ends), its
    `pe_embedder.forward` (the negative's MSRoPE ids) and the module's `attention_function`."""

    def __init__(self, model, run: GuidanceRun, dynamic_args=None):
        self.model = model
        self.run = run
        self.stream = ImageStream(getattr(model, "patch_size", 2), run, dynamic_args)

    def _guided_text(self) -> bool:
        """The running model call carries the text stream the runner announced, with a negative."""
        call = self.stream.current()
        return self.run.negative_len > 0 and call is not None and call.text_len == self.run.text_len

    def pe_embedder_forward(self, original):
        run = self.run

        @functools.wraps(original)
        def forward(ids, *args, **kwargs):
            text_negative = run.text_len - run.positive_len  # a negative image's ids are Neo's own
            if self._guided_text() and text_negative and ids.shape[1] > run.text_len:
                ids = ids.clone()
                steps = torch.arange(text_negative, device=ids.device, dtype=ids.dtype)
                ids[:, run.positive_len:run.text_len] = ids[:, :1] + steps[None, :, None]  # s + j, as alone
            return original(ids, *args, **kwargs)

        forward.__vsf_original__ = original
        return forward

    def attention_function(self, original):
        run = self.run

        def qwen_attention_function(q, k, v, heads, *args, **kwargs):
            skip_reshape = kwargs.get("skip_reshape", False)
            length = q.shape[2] if skip_reshape else q.shape[1]
            if not self._guided_text() or length <= run.text_len or not batch_fits(run, q.shape[0]):
                return original(q, k, v, heads, *args, **kwargs)
            if split_mask_arg(args, kwargs) is not None:
                warn_once("neo-qwen-mask", "Qwen-Image attention mask present: this call runs without VSF.")
                return original(q, k, v, heads, *args, **kwargs)
            return guided_joint_call(self.stream, run, q, k, v, heads, skip_reshape=skip_reshape,
                                     skip_output_reshape=kwargs.get("skip_output_reshape", False))

        qwen_attention_function.__vsf_original__ = original
        return qwen_attention_function


class NeoQwenImageAdapter(HostAdapter):
    """Forge Neo Qwen-Image / Qwen-Image-Edit: VSF in every joint attention, text first, edit references R."""

    name = "neo-qwen-image"
    host = "neo"
    family = "qwenimage"
    label = "Forge Neo Qwen-Image"
    priority = 20

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return is_qwen_image(diffusion_model(sd_model)) and is_forge_neo()

    def _module(self):
        from backend.nn import qwen  # type: ignore[import-not-found]
        return qwen

    def _engine(self):
        return getattr(self.sd_model, "text_processing_engine_qwen", None)

    def check(self) -> None:
        self._check_model()
        engine = self._engine()
        if engine is None or not callable(engine):
            raise PatchError("the Qwen-Image model has no Qwen text engine (host version not supported)")

    def _check_model(self) -> None:
        check_attention_function(self._module(), "attention_function", ("mask",))
        model = diffusion_model(self.sd_model)
        check_callable(model, "forward", ("x", "timesteps", "context"))
        embedder = getattr(model, "pe_embedder", None)
        if embedder is None:
            raise PatchError("Neo's Qwen-Image model has no pe_embedder (host version not supported)")
        check_callable(embedder, "forward", ("ids",))

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        """Neo's Qwen text engine on each negative alone (it pads nothing): the negative pass's rows."""
        engine = self._engine()
        return _negative_text.encode_with_engine(self.sd_model, engine, negative_prompts)

    def takes_negative_image(self) -> bool:
        """Qwen-Image-Edit: Neo's loader sets `dynamic_args["edit"]` for an Edit checkpoint, and only then
        does its engine turn input images into reference latents."""
        return bool(getattr(self._module(), "dynamic_args", {}).get("edit"))

    def encode_negative_image(self, p: Any, image: Any) -> ReferenceLatent:
        """The picture as Neo's Qwen engine encodes a reference image: at the generation's size (as its
        input image), then the engine's own `encode_vision` (its `qwen_vae_resize` option, the VAE,
        `process_in`), which touches none of the engine's state; its vision-encoder part is not used."""
        if not callable(getattr(self.sd_model, "encode_vision", None)):
            raise PatchError("the Qwen-Image-Edit model has no encode_vision (host version not supported)")
        pixels = reference_pixels(image, p.width, p.height)
        with torch.no_grad():
            latent = self.sd_model.encode_vision(pixels, 0)[1]
        return ReferenceLatent(latent.cpu(), latent_tokens(latent, getattr(diffusion_model(self.sd_model), "patch_size", 2)))

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        self._check_model()
        qwen, model = self._module(), diffusion_model(self.sd_model)
        guided = GuidedQwen(model, run, getattr(qwen, "dynamic_args", None))
        return (AttributePatch()
                .add(qwen, "attention_function", guided.attention_function(qwen.attention_function))
                .add(model, "forward", guided.stream.wrap_forward(model.forward))
                .add(model.pe_embedder, "forward", guided.pe_embedder_forward(model.pe_embedder.forward)))

    def backend_note(self) -> str | None:
        return _forge_sampling.forge_backend_note()
