"""Wan 2.1 / 2.2 (diffusers `WanTransformer3DModel`): cross-attention VSF, no mask, no duplication.

Video tokens query the UMT5 text `[P, N]` in each block's `attn2` (paper eq. 9). Wan 2.1 image-to-video
puts the image-conditioning tokens in front of the text; they keep their own, unguided attention and
only the text call is guided. Wan 2.2 A14B runs two transformers (high-noise and low-noise experts):
both get processors and share one step counter.
"""
from __future__ import annotations

import torch

from ..attention import cross_attention
from ..state import LatentGrid
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor, attend, heads_first, heads_merged
from .text import is_blank, t5_hidden_states


class WanVSFProcessor(GuidedProcessor):
    """Text cross-attention of one Wan block with guidance."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        run = self.run
        if encoder_hidden_states is None or not run.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 rotary_emb=rotary_emb, **kwargs)
        if attention_mask is not None:
            raise GuidanceInputError("VSF does not support an attention mask in Wan cross-attention")
        if getattr(attn, "fused_projections", False):
            raise GuidanceInputError("VSF does not support fused projections; call unfuse_qkv_projections()")
        image_ctx_len = encoder_hidden_states.shape[1] - run.text_len
        if image_ctx_len < 0 or (image_ctx_len > 0 and attn.add_k_proj is None):
            raise GuidanceInputError(
                f"Wan text context has {encoder_hidden_states.shape[1]} tokens, expected {run.text_len}"
            )
        image_ctx, text = encoder_hidden_states[:, :image_ctx_len], encoder_hidden_states[:, image_ctx_len:]
        heads = attn.heads
        q = heads_first(attn.norm_q(attn.to_q(hidden_states)), heads)
        k = heads_first(attn.norm_k(attn.to_k(text)), heads)
        v = heads_first(attn.to_v(text), heads)
        out = attend(cross_attention, q, k, v, run.cross_layout(), run)
        out = heads_merged(out).type_as(q)
        if image_ctx_len:  # I2V: image-conditioning tokens, unguided, added as the model does
            k_img = heads_first(attn.norm_added_k(attn.add_k_proj(image_ctx)), heads)
            v_img = heads_first(attn.add_v_proj(image_ctx), heads)
            out = out + heads_merged(torch.nn.functional.scaled_dot_product_attention(q, k_img, v_img)).type_as(q)
        run.calls += 1
        return attn.to_out[1](attn.to_out[0](out))


class WanFamily(FamilyAdapter):
    family = "wan"
    label = "Wan 2.1 / 2.2 (T2V, I2V)"
    pipeline_prefixes = ("WanPipeline", "WanImageToVideoPipeline")

    def processor_for(self, name, original, run):
        return WanVSFProcessor(original, run) if name.endswith(".attn2.processor") else None

    def latent_grid(self, model, args, kwargs):
        # hidden_states [B, C, F, H, W]; 3D patches (pt, ph, pw), tokens frame-major then row-major
        latents = kwargs.get("hidden_states", args[0] if args else None)
        pt, ph, pw = model.config.patch_size
        frames, height, width = latents.shape[-3:]
        return LatentGrid(frames // pt, height // ph, width // pw, video=True)

    def encode_negative(self, pipe, prompt, settings):
        dim = pipe.text_encoder.config.d_model
        if is_blank(prompt):
            return torch.zeros(0, dim)
        return t5_hidden_states(pipe.tokenizer, pipe.text_encoder, prompt, 512)

    def single_pass_kwargs(self, kwargs):
        kwargs = super().single_pass_kwargs(kwargs)
        if "guidance_scale_2" in kwargs:
            kwargs["guidance_scale_2"] = 1.0
        return kwargs
