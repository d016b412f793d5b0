"""SD3 / SD3.5 (diffusers `SD3Transformer2DModel`): joint attention, image tokens first `[I, P, N0]`.

Processors go on every joint block's `attn`; SD3.5 Medium's extra image-only `attn2` is left alone.
The negative text is CLIP-L and CLIP-G penultimate states (unpadded, concatenated on features and
zero-padded to the T5 width, as the pipeline does for the positive) followed by unpadded T5 tokens.
Without T5 (`text_encoder_3=None`) the pipeline feeds zeros for T5; those are not negative tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import joint_attention
from ..state import LatentGrid
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor, attend, heads_first, heads_merged
from .text import clip_hidden_states, is_blank, t5_hidden_states


class SD3VSFProcessor(GuidedProcessor):
    """Joint attention of one SD3 block with guidance; image-first sequence `[I, text]`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        run = self.run
        if encoder_hidden_states is None or not run.active:
            return self.unguided(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise GuidanceInputError("VSF does not support an attention mask in SD3 joint attention")
        if encoder_hidden_states.shape[1] != run.text_len:
            raise GuidanceInputError(
                f"SD3 text stream has {encoder_hidden_states.shape[1]} tokens, expected {run.text_len}"
            )
        heads = attn.heads
        q, k, v = (heads_first(proj(hidden_states), heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = (heads_first(proj(encoder_hidden_states), heads)
                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        image_len = hidden_states.shape[1]
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        layout = run.joint_layout(q.shape[2], text_offset=image_len)
        out = heads_merged(attend(joint_attention, q, k, v, layout, run)).to(q.dtype)
        run.calls += 1
        image_out, text_out = out[:, :image_len], out[:, image_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if attn.context_pre_only:
            return image_out, None
        return image_out, attn.to_add_out(text_out)


class SD3Family(FamilyAdapter):
    family = "sd3"
    label = "Stable Diffusion 3 / 3.5"
    pipeline_prefixes = ("StableDiffusion3",)
    negative_first = False  # image first: [I, P, N0] keeps I and P contiguous

    def processor_for(self, name, original, run):
        # "transformer_blocks.3.attn.processor"; leave "attn2" (SD3.5 Medium image-only attention).
        return SD3VSFProcessor(original, run) if name.endswith(".attn.processor") else None

    def latent_grid(self, model, args, kwargs):
        # hidden_states [B, C, H, W] latents; image tokens are patch x patch squares, row-major
        latents = kwargs.get("hidden_states", args[0] if args else None)
        patch = model.config.patch_size
        return LatentGrid(1, latents.shape[-2] // patch, latents.shape[-1] // patch)

    def encode_negative(self, pipe, prompt, settings):
        joint_dim = pipe.transformer.config.joint_attention_dim
        if is_blank(prompt):
            return torch.zeros(0, joint_dim)
        clip_l = clip_hidden_states(pipe.tokenizer, pipe.text_encoder, prompt)
        clip_g = clip_hidden_states(pipe.tokenizer_2, pipe.text_encoder_2, prompt)
        n = min(clip_l.shape[0], clip_g.shape[0])  # same BPE vocabulary: equal unless truncated differently
        clip = torch.cat([clip_l[:n], clip_g[:n].to(clip_l.dtype)], dim=-1)
        clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
        parts = [clip]
        if getattr(pipe, "text_encoder_3", None) is not None:
            t5 = t5_hidden_states(pipe.tokenizer_3, pipe.text_encoder_3, prompt,
                                  getattr(pipe.tokenizer_3, "model_max_length", 256) or 256)
            parts.append(t5.to(clip.dtype))
        return torch.cat(parts, dim=0)
