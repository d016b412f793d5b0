"""Flux (diffusers `FluxTransformer2DModel`): joint attention, text first, in double- and single-stream blocks.

The negative tokens go *before* the positive ones in the text stream (`[N0, P, I]`), so image and
positive tokens stay one contiguous span for the fast attention path. Text tokens all sit at RoPE
position 0 in Flux, so their order inside the text stream changes nothing; `txt_ids` grows with
them. The negative T5 embedding is extrapolated away from the null embedding `p0` (paper eq. 10,
`flux_lambda`; `p0` as `lib_vsf.flux_lambda` defines it for every path: the mean padding embedding of
the empty prompt, padded like the pipeline's prompts); the pooled CLIP vector stays positive-only.
"""
from __future__ import annotations

import torch

from ..attention import joint_attention
from ..flux_lambda import extrapolate_negative, null_embedding
from ..state import LatentGrid
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor, attend, heads_merged
from .text import is_blank, t5_hidden_states


def _rope(x: torch.Tensor, rotary_emb) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary_emb, sequence_dim=1)


class FluxVSFProcessor(GuidedProcessor):
    """Joint attention of one Flux block. Double-stream calls get `encoder_hidden_states`; single-stream
    calls get one sequence `[text, image]` whose text length the run knows."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        run = self.run
        if not run.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 image_rotary_emb=image_rotary_emb, **kwargs)
        if attention_mask is not None:
            raise GuidanceInputError("VSF does not support an attention mask in Flux attention")
        if getattr(attn, "fused_projections", False):
            raise GuidanceInputError("VSF does not support fused QKV projections; call unfuse_qkv_projections()")
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        text_len = encoder_hidden_states.shape[1] if double else run.text_len
        if text_len != run.text_len:
            raise GuidanceInputError(f"Flux text stream has {text_len} tokens, expected {run.text_len}")

        def split_heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))  # [B, L, H, D]

        q, k, v = (split_heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if double:
            cq, ck, cv = (split_heads(proj(encoder_hidden_states))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        if image_rotary_emb is not None:
            q, k = _rope(q, image_rotary_emb), _rope(k, image_rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        layout = run.joint_layout(q.shape[2], text_offset=0, reference=self.reference_span(q.shape[2]))
        out = heads_merged(attend(joint_attention, q, k, v, layout, run)).to(q.dtype)
        run.calls += 1
        if not double:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


    def reference_span(self, length: int) -> slice | None:
        """Where reference-image tokens sit in a joint sequence of `length` (Flux has none)."""
        return None


class FluxFamily(FamilyAdapter):
    family = "flux"
    label = "Flux (dev / schnell)"
    pipeline_prefixes = ("FluxPipeline", "FluxImg2ImgPipeline")
    negative_first = True
    cfg_kwarg = None  # Flux's guidance_scale is the distilled guidance embedding, not CFG

    def __init__(self):
        self._null_cache: dict[int, torch.Tensor] = {}

    def processor_for(self, name, original, run):
        return FluxVSFProcessor(original, run) if name.endswith(".attn.processor") else None

    def single_pass_kwargs(self, kwargs):
        kwargs = super().single_pass_kwargs(kwargs)
        kwargs["true_cfg_scale"] = 1.0  # no second (true CFG) pass
        return kwargs

    def latent_grid(self, model, args, kwargs):
        # Packed latents [B, h*w, C] carry no shape; img_ids [h*w, 3] hold (0, row, col) per token.
        img_ids = kwargs.get("img_ids")
        if img_ids is None:
            return None
        ids = img_ids.reshape(-1, img_ids.shape[-1])[: kwargs["hidden_states"].shape[1]]
        height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return LatentGrid(1, height, width) if height * width == ids.shape[0] else None

    def encode_negative(self, pipe, prompt, settings):
        dim = pipe.text_encoder_2.config.d_model
        if is_blank(prompt):
            return torch.zeros(0, dim)
        max_length = getattr(pipe.tokenizer_2, "model_max_length", 512) or 512
        max_length = min(max_length, 512)
        negative = t5_hidden_states(pipe.tokenizer_2, pipe.text_encoder_2, prompt, max_length)
        if settings.flux_lambda:
            key = id(pipe.text_encoder_2)
            if key not in self._null_cache:
                self._null_cache[key] = self.null_embedding(pipe, max_length)
            negative = extrapolate_negative(negative, self._null_cache[key], settings.flux_lambda)
        return negative

    @staticmethod
    def null_embedding(pipe, max_length: int) -> torch.Tensor:
        """`p0` of paper eq. 10 through the pipeline's T5: the empty prompt padded to `max_length`,
        encoded as `FluxPipeline` encodes prompts (no attention mask)."""
        encoder, tokenizer = pipe.text_encoder_2, pipe.tokenizer_2
        device = next(encoder.parameters()).device
        return null_embedding(lambda ids: encoder(ids.to(device))[0], tokenizer.eos_token_id,
                              tokenizer.pad_token_id, max_length)

    def extend_inputs(self, kwargs, negative):
        kwargs = super().extend_inputs(kwargs, negative)
        txt_ids = kwargs.get("txt_ids")
        if txt_ids is not None:
            extra = txt_ids.new_zeros(*txt_ids.shape[:-2], negative.length, txt_ids.shape[-1])
            kwargs["txt_ids"] = torch.cat([extra, txt_ids], dim=-2)
        return kwargs
