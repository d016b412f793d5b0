"""SD1.5 / SDXL UNets (diffusers `UNet2DConditionModel`): cross-attention VSF in every `attn2`.

Image queries attend to `[P (77 padded CLIP tokens), N (unpadded)]` (paper eq. 9): no mask, no
duplication. Negative text: the CLIP layer the pipeline takes for the positive in this call (its
`clip_skip`): SD1.5 the final (layer-normed) states, or with `clip_skip` k the states k layers
earlier through the final layer norm; SDXL the penultimate states (k more layers back with
`clip_skip`) of CLIP-L and CLIP-G concatenated on features.

IP-Adapter: diffusers hands `attn2` a `(text, image_tokens)` pair. The text part is guided; the
image-prompt tokens keep the adapter's own attention, added with the adapter's scale, as its
processor does (its scale is read at every call; set it with `pipe.set_ip_adapter_scale` before
entering VSFGuidance: inside the context diffusers finds our processors, not the adapter's, and
changes nothing). IP-Adapter masks are refused.

LCM-distilled UNets (`time_cond_proj_dim`) embed `guidance_scale` as a condition (w-embedding) and
run no CFG batch: their `guidance_scale` is left as the caller gave it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
        image_prompt = None
        if isinstance(encoder_hidden_states, tuple):  # IP-Adapter: (text, [image-prompt tokens per adapter])
            encoder_hidden_states, image_prompt = encoder_hidden_states
            self._check_image_prompt(kwargs)
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
        if image_prompt is not None:
            out = out + self._image_prompt_attention(q, image_prompt)
        run.calls += 1
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _check_image_prompt(self, kwargs) -> None:
        adapter = self.original
        if not all(hasattr(adapter, a) for a in ("to_k_ip", "to_v_ip", "scale")):
            raise GuidanceInputError(
                f"UNet cross-attention got image-prompt tokens but its processor {type(adapter).__name__} "
                "is not a diffusers IP-Adapter processor"
            )
        if kwargs.get("ip_adapter_masks") is not None:
            raise GuidanceInputError("VSF does not support IP-Adapter masks (ip_adapter_masks)")
        if any(isinstance(scale, (list, tuple)) for scale in adapter.scale):
            raise GuidanceInputError("VSF supports one IP-Adapter scale per adapter (per-image scales need masks)")

    def _image_prompt_attention(self, q: torch.Tensor, image_prompt) -> torch.Tensor:
        """The IP-Adapter term: each adapter's scale times image queries attending to its image tokens
        through its own key/value projections (unguided: the negative never reaches these keys)."""
        adapter = self.original
        batch, heads, _, head_dim = q.shape
        total = 0
        for tokens, scale, to_k, to_v in zip(image_prompt, adapter.scale, adapter.to_k_ip, adapter.to_v_ip):
            if scale == 0:
                continue
            # [B, images, tokens, E] or [B, tokens, E]: every image's tokens are keys of one attention
            k, v = (proj(tokens).reshape(batch, -1, heads, head_dim).transpose(1, 2) for proj in (to_k, to_v))
            total = total + scale * heads_merged(F.scaled_dot_product_attention(q, k, v)).to(q.dtype)
        return total


class UNetFamily(FamilyAdapter):
    family = "unet"
    label = "SD 1.5 / SDXL (UNet)"
    pipeline_prefixes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                         "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")

    def for_pipeline(self, pipe):
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            self.cfg_kwarg = None  # guidance_scale feeds the w-embedding; the pipeline runs no CFG batch
        return self

    def processor_for(self, name, original, run):
        return UNetCrossVSFProcessor(original, run) if name.endswith(".attn2.processor") else None

    def latent_grid(self, model, args, kwargs):
        # sample [B, C, H, W]: attn2 runs at H x W and at each downsampled level (LatentGrid.shape_for)
        latents = kwargs.get("sample", args[0] if args else None)
        return LatentGrid(1, latents.shape[-2], latents.shape[-1])

    def text_encoding(self, pipe):
        clip_skip = getattr(pipe, "_clip_skip", None)  # set by the pipeline call before its loop
        return {} if clip_skip is None else {"clip_skip": int(clip_skip)}

    def encode_negative(self, pipe, prompt, settings, clip_skip: int | None = None):
        if getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None:
            return self._encode_sdxl(pipe, prompt, clip_skip)
        encoder = pipe.text_encoder
        if is_blank(prompt):
            return torch.zeros(0, encoder.config.hidden_size)
        # StableDiffusionPipeline.encode_prompt: last_hidden_state, or hidden_states[-(clip_skip + 1)]
        # through the final layer norm
        return clip_hidden_states(pipe.tokenizer, encoder, prompt, layer=-1 - (clip_skip or 0), final_layer_norm=True)

    @staticmethod
    def _encode_sdxl(pipe, prompt, clip_skip=None):
        pairs = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
                 if t is not None and e is not None]
        if is_blank(prompt):
            return torch.zeros(0, sum(e.config.hidden_size for _, e in pairs))
        # StableDiffusionXLPipeline.encode_prompt: hidden_states[-(clip_skip + 2)], no final norm
        states = [clip_hidden_states(t, e, prompt, layer=-2 - (clip_skip or 0)) for t, e in pairs]
        n = min(s.shape[0] for s in states)
        return torch.cat([s[:n].to(states[0].dtype) for s in states], dim=-1)
