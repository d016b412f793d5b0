"""Chroma (diffusers `ChromaTransformer2DModel` in `ChromaPipeline` / `ChromaImg2ImgPipeline`): the Flux.1
transformer with a T5-only text stream and real CFG.

The attention is Flux's (`FluxVSFProcessor`, text first): the negative tokens go before the positive ones,
`[N0, P, I]`, and `txt_ids` grows with zeros. What differs from Flux:

- Text mask. The pipeline pads the positive to `max_sequence_length` and gives the transformer a mask that
  keeps the prompt's tokens, its EOS and the first padding token, hiding the rest. That mask stays for the
  positive as `TokenLayout.positive_mask`, read from the mask as it reaches attention (a masked padding
  position is a key for nobody). The negative is unpadded (T5 tokens + EOS, encoded with an all-ones mask,
  as the pipeline's masked T5 encodes those positions); its part of the model's mask is the batch's
  negative mask. diffusers up to 0.42 hands the mask over as float 0/1, which attention *adds* to the
  logits (a soft mask, diffusers issue #12116); the guided pass applies it as the boolean mask Chroma
  means, so its unguided rows equal the model's own pass bit for bit when the mask is boolean.
- CFG. Chroma is not guidance-distilled and runs real CFG (`guidance_scale` ~4, a second pass with the
  negative prompt): the single guided pass replaces it, `guidance_scale` is set to 1. There is no
  distilled guidance embedding to keep.
- No Flux lambda rule (paper eq. 10). The rule pushes Flux's T5 negative away from the null embedding
  because Flux dev is guidance-distilled and never saw negatives during training; Chroma is trained with
  real CFG on negative prompts, so its own negative embedding already acts, and its T5 encodes prompts
  *with* an attention mask, so the rule's `p0` (the unmasked padding of the empty prompt, `flux_lambda.py`)
  is not the null condition Chroma's encoder produces. A nonzero `flux_lambda` is refused.
"""
from __future__ import annotations

import torch

from .family import FamilyAdapter, GuidanceInputError
from .flux import FluxFamily, FluxVSFProcessor
from .text import is_blank, t5_hidden_states


class ChromaVSFProcessor(FluxVSFProcessor):
    """Flux's guided joint attention with Chroma's text mask as the layout's positive mask."""

    def check_mask(self, attention_mask):
        if attention_mask is not None and attention_mask.shape[-1] != attention_mask.shape[-2]:
            raise GuidanceInputError(f"Chroma attention mask of shape {tuple(attention_mask.shape)} is not the "
                                     "model's [B, 1, L, L] text-and-image mask")

    def positive_mask(self, attention_mask, length: int):
        """[B, positive_len] bool from the model's `m_i * m_j` mask (its last row is an image query, which
        the mask never hides, so that row is the key mask `m_j`); None when every position is real."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != length:
            raise GuidanceInputError(f"Chroma attention mask covers {attention_mask.shape[-1]} tokens, "
                                     f"the sequence has {length}")
        keys = attention_mask.reshape(attention_mask.shape[0], -1, length)[:, -1] > 0
        run = self.run
        positive = keys[:, run.negative_len:run.negative_len + run.positive_len]
        return None if bool(positive.all()) else positive


class ChromaFamily(FluxFamily):
    family = "chroma"
    label = "Chroma"
    pipeline_prefixes = ("ChromaPipeline", "ChromaImg2ImgPipeline")
    negative_first = True
    cfg_kwarg = "guidance_scale"  # real CFG (a second pass); 1 turns it off

    def matches(self, pipe) -> bool:
        return type(pipe).__name__ in self.pipeline_prefixes

    def processor_for(self, name, original, run):
        return ChromaVSFProcessor(original, run, self) if name.endswith(".attn.processor") else None

    def single_pass_kwargs(self, kwargs):
        kwargs = FamilyAdapter.single_pass_kwargs(self, kwargs)
        kwargs.pop("negative_prompt_attention_mask", None)
        return kwargs

    def encode_negative(self, pipe, prompt, settings):
        if settings.flux_lambda:
            raise GuidanceInputError("the Flux lambda rule (flux_lambda) does not apply to Chroma: it is trained "
                                     "with real CFG on negative prompts; use flux_lambda=0")
        dim = pipe.text_encoder.config.d_model
        if is_blank(prompt):
            return torch.zeros(0, dim)
        return t5_hidden_states(pipe.tokenizer, pipe.text_encoder, prompt, 512)

    def extend_inputs(self, kwargs, negative):
        kwargs = super().extend_inputs(kwargs, negative)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            neg = negative.mask.to(device=mask.device, dtype=mask.dtype)
            kwargs["attention_mask"] = torch.cat([neg, mask], dim=1)
        return kwargs
