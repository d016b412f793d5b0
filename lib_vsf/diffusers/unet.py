"""SD1.5 / SDXL UNets (diffusers `UNet2DConditionModel`): cross-attention VSF in every `attn2`.

Image queries attend to `[P (77 padded CLIP tokens), N (unpadded)]` (paper eq. 9): no mask, no
duplication. Negative text: SD1.5 takes CLIP's final (layer-normed) states; SDXL the penultimate
states of CLIP-L and CLIP-G concatenated on features, as the pipelines do for the positive.
"""
from __future__ import annotations

import torch

from ..attention import cross_attention
from ..state import LatentGrid
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor, attend, heads_first, heads_merged
from .text import clip_hidden_states, is_blank


class UNetCrossVSFProcessor(GuidedProcessor):
    """Cross-attention (`attn2`) of one UNet transformer block with guidance."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        run = self.run
        if encoder_hidden_states is None or not run.active:
            return self.unguided(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise GuidanceInputError("VSF does not support an encoder attention mask in UNet cross-attention")
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise GuidanceInputError("unexpected UNet cross-attention block layout (host/diffusers version?)")
        if encoder_hidden_states.shape[1] != run.text_len:
            raise GuidanceInputError(
                f"UNet text context has {encoder_hidden_states.shape[1]} tokens, expected {run.text_len}"
            )
        residual = hidden_states
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        heads = attn.heads
        q = heads_first(attn.to_q(hidden_states), heads)
        k = heads_first(attn.to_k(context), heads)
        v = heads_first(attn.to_v(context), heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = heads_merged(attend(cross_attention, q, k, v, run.cross_layout(), run)).to(q.dtype)
        run.calls += 1
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNetFamily(FamilyAdapter):
    family = "unet"
    label = "SD 1.5 / SDXL (UNet)"
    pipeline_prefixes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                         "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")

    def processor_for(self, name, original, run):
        return UNetCrossVSFProcessor(original, run) if name.endswith(".attn2.processor") else None

    def latent_grid(self, model, args, kwargs):
        # sample [B, C, H, W]: attn2 runs at H x W and at each downsampled level (LatentGrid.shape_for)
        latents = kwargs.get("sample", args[0] if args else None)
        return LatentGrid(1, latents.shape[-2], latents.shape[-1])

    def encode_negative(self, pipe, prompt, settings):
        if getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None:
            return self._encode_sdxl(pipe, prompt)
        encoder = pipe.text_encoder
        if is_blank(prompt):
            return torch.zeros(0, encoder.config.hidden_size)
        return clip_hidden_states(pipe.tokenizer, encoder, prompt, layer=-1, final_layer_norm=True)

    @staticmethod
    def _encode_sdxl(pipe, prompt):
        pairs = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
                 if t is not None and e is not None]
        if is_blank(prompt):
            return torch.zeros(0, sum(e.config.hidden_size for _, e in pairs))
        states = [clip_hidden_states(t, e, prompt) for t, e in pairs]
        n = min(s.shape[0] for s in states)
        return torch.cat([s[:n].to(states[0].dtype) for s in states], dim=-1)
