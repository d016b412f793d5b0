"""Flux (diffusers `FluxTransformer2DModel`): joint attention, text first, in double- and single-stream blocks.

The negative tokens go *before* the positive ones in the text stream (`[N0, P, I]`), so image and
positive tokens stay one contiguous span for the fast attention path. Text tokens all sit at RoPE
position 0 in Flux, so their order inside the text stream changes nothing; `txt_ids` grows with
them. The negative T5 embedding is extrapolated away from the null embedding `p0` (paper eq. 10,
`flux_lambda`; `p0` as `lib_vsf.flux_lambda` defines it for every path: the mean padding embedding of
the empty prompt, padded like the pipeline's prompts); the pooled CLIP vector stays positive-only.

Flux Kontext (`FluxKontextPipeline`) is the same Flux.1 transformer: the pipeline appends the reference
image's latents after the image tokens (their `img_ids` have first id 1, the image's 0) and slices them
off the output, so the sequence is `[N0, P, I, R]`. The reference tokens are `TokenLayout.reference`
(R rows attend I, P, R; N0 rows attend I, R, N0; only image rows see N1), counted per call from
`img_ids`. Kontext's CFG is `true_cfg_scale` (with `negative_prompt`), turned off; its `guidance_scale`
is the distilled guidance embedding and stays the user's. The lambda rule applies as for Flux dev.

Kontext negative images (docs/negative-images.md): `encode_negative_image` encodes a picture as the
pipeline encodes its input image (Kontext's preferred-resolution resize unless the call sets
`_auto_resize=False`, `image_processor.preprocess`, the VAE's argmax latent with shift and scale, 2x2
packing); `extend_image_inputs` puts its tokens first in the image stream with the ids of the next
reference (`(2, row, col)` next to the input image's index 1), so the sequence is
`[P, N_txt | N_img, I, R]` (the text negative last in the text stream; R stays at the end).
"""
from __future__ import annotations

import torch

from ..attention import joint_attention
from ..flux_lambda import extrapolate_negative, null_embedding
from ..state import LatentGrid, NegativeImage
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor, attend, heads_merged
from .text import is_blank, t5_hidden_states


def _rope(x: torch.Tensor, rotary_emb) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary_emb, sequence_dim=1)


class FluxVSFProcessor(GuidedProcessor):
    """Joint attention of one Flux block. Double-stream calls get `encoder_hidden_states`; single-stream
    calls get one sequence `[text, image]` whose text length the run knows. `adapter.reference_tokens`:
    how many tokens at the end of the sequence are reference-image tokens (Kontext; 0 for plain Flux)."""

    def __init__(self, original, run, adapter=None):
        super().__init__(original, run)
        self.adapter = adapter

    def check_mask(self, attention_mask):
        if attention_mask is not None:
            raise GuidanceInputError("VSF does not support an attention mask in Flux attention")

    def positive_mask(self, attention_mask, length: int):
        """The model's own mask of its positive text for the layout (Flux has none)."""
        return None

    def reference(self, length: int) -> slice | None:
        tokens = getattr(self.adapter, "reference_tokens", 0)
        return slice(length - tokens, length) if tokens else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        run = self.run
        if not run.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 image_rotary_emb=image_rotary_emb, **kwargs)
        self.check_mask(attention_mask)
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
        length = q.shape[2]
        layout = run.joint_layout(length, text_offset=0, reference=self.reference(length),
                                  positive_mask=self.positive_mask(attention_mask, length))
        out = heads_merged(attend(joint_attention, q, k, v, layout, run)).to(q.dtype)
        run.calls += 1
        if not double:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class FluxFamily(FamilyAdapter):
    family = "flux"
    label = "Flux (dev / schnell)"
    pipeline_prefixes = ("FluxPipeline", "FluxImg2ImgPipeline")
    negative_first = True
    cfg_kwarg = None  # Flux's guidance_scale is the distilled guidance embedding, not CFG

    def __init__(self):
        self._null_cache: dict[int, torch.Tensor] = {}
        self.reference_tokens = 0  # reference-image tokens at the end of the current call's image stream

    def processor_for(self, name, original, run):
        return FluxVSFProcessor(original, run, self) if name.endswith(".attn.processor") else None

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
        ids = ids[ids[:, 0] == 0]  # the image itself (Kontext's reference tokens have first id 1)
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
        self.reference_tokens = self.count_reference_tokens(kwargs)
        return kwargs

    @staticmethod
    def count_reference_tokens(kwargs) -> int:
        """Reference-image tokens of this call: the trailing image-stream tokens whose `img_ids` have a
        nonzero first id (Kontext gives its reference latents id 1, the image 0)."""
        img_ids = kwargs.get("img_ids")
        if img_ids is None:
            return 0
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # the model reads the first sample's (3-D: deprecated)
        if ids.shape[0] != kwargs["hidden_states"].shape[1]:
            raise GuidanceInputError(f"Flux img_ids cover {ids.shape[0]} tokens, the image stream has "
                                     f"{kwargs['hidden_states'].shape[1]}")
        is_reference = ids[:, 0] != 0
        count = int(is_reference.sum())
        if count and not bool(is_reference[ids.shape[0] - count:].all()):
            raise GuidanceInputError("VSF needs Flux reference-image tokens after the image tokens (img_ids)")
        return count


class FluxKontextFamily(FluxFamily):
    """Flux Kontext: Flux.1 with reference-image tokens after the image; see the module docstring."""

    label = "Flux Kontext"
    pipeline_prefixes = ("FluxKontextPipeline",)
    cfg_kwarg = "true_cfg_scale"  # Kontext's CFG (guidance_scale is the distilled guidance embedding)

    def matches(self, pipe) -> bool:
        return type(pipe).__name__ in self.pipeline_prefixes

    # -- negative images (docs/negative-images.md) ---------------------------------------------------------
    def negative_image_options(self, kwargs) -> dict:
        """The call's options that change how the pipeline encodes its input image."""
        return {"auto_resize": bool(kwargs.get("_auto_resize", True))}

    def encode_negative_image(self, pipe, image, auto_resize: bool = True) -> NegativeImage:
        """`image` as `FluxKontextPipeline` encodes its input image: packed latents [1, n, 4C] and their
        (row, col) ids [n, 3] (the reference index is set per call, `extend_image_inputs`)."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == pipe.latent_channels:
            latents = image  # already latents, as the pipeline accepts them
        else:
            first = image[0] if isinstance(image, list) else image
            height, width = pipe.image_processor.get_default_height_width(first)
            if auto_resize:
                _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
            multiple_of = pipe.vae_scale_factor * 2
            width, height = width // multiple_of * multiple_of, height // multiple_of * multiple_of
            pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, height, width), height, width)
            if pixels.shape[0] != 1:
                raise GuidanceInputError("give one negative image (it applies to every sample)")
            vae = pipe.vae
            pixels = pixels.to(device=next(vae.parameters()).device, dtype=vae.dtype)
            latents = pipe._encode_vae_image(image=pixels, generator=None)
        channels, lat_h, lat_w = latents.shape[1:]
        tokens = pipe._pack_latents(latents, 1, channels, lat_h, lat_w)
        ids = pipe._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, tokens.device, tokens.dtype)
        return NegativeImage(tokens, ids)

    def extend_image_inputs(self, kwargs, negative_image: NegativeImage):
        """The image stream `[N_img, I, R]` and its ids: the negative image as the next reference."""
        kwargs = dict(kwargs)
        hidden, img_ids = kwargs["hidden_states"], kwargs.get("img_ids")
        if img_ids is None:
            raise GuidanceInputError("VSF needs Flux Kontext called with img_ids=... for a negative image")
        self.reference_tokens = self.count_reference_tokens(kwargs)  # R stays at the end of the stream
        tokens = negative_image.tokens.to(device=hidden.device, dtype=hidden.dtype)
        if tokens.shape[-1] != hidden.shape[-1]:
            raise GuidanceInputError(f"the negative image has {tokens.shape[-1]} latent channels, "
                                     f"the model's image stream {hidden.shape[-1]}")
        kwargs["hidden_states"] = torch.cat([tokens.expand(hidden.shape[0], -1, -1), hidden], dim=1)
        ids = negative_image.positions.to(device=img_ids.device, dtype=img_ids.dtype).clone()
        ids[:, 0] = img_ids.reshape(-1, 3)[:, 0].max() + 1  # the next reference index
        kwargs["img_ids"] = torch.cat([ids, img_ids.reshape(-1, 3)], dim=0) if img_ids.ndim == 2 else \
            torch.cat([ids.expand(img_ids.shape[0], -1, -1), img_ids], dim=1)
        return kwargs
