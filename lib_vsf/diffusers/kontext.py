"""Flux Kontext (diffusers `FluxKontextPipeline`): Flux's joint attention with reference-image tokens R.

The pipeline appends the packed latents of its input image after the noisy image tokens in the image
stream (`img_ids` index 1 instead of 0) and keeps the first rows of the output; those appended tokens
are the layout's R: R rows attend I, P, R; N0 rows attend I, R, N0; only image rows see N1. Everything
else is Flux (`flux.py`): text ids are zero, the negative T5 embedding is extrapolated (paper eq. 10).

Negative images (docs/negative-images.md): `encode_negative_image` encodes a picture as the pipeline
encodes its input image (Kontext's preferred-resolution resize unless the call sets
`_auto_resize=False`, `image_processor.preprocess`, the VAE's argmax latent with shift and scale, 2x2
packing); `extend_image_inputs` puts its tokens first in the image stream with the ids of the next
reference (`(2, row, col)` next to the input image's index 1), so the joint sequence is
`[P, N_txt | N_img, I, R]`.
"""
from __future__ import annotations

import torch

from ..state import NegativeImage
from .family import GuidanceInputError
from .flux import FluxFamily, FluxVSFProcessor


class FluxKontextVSFProcessor(FluxVSFProcessor):
    """Flux joint attention whose image stream is `[N_img, I, R]` (N_img only with a negative image)."""

    def __init__(self, original, run, adapter: "FluxKontextFamily"):
        super().__init__(original, run)
        self.adapter = adapter

    def reference_span(self, length: int) -> slice | None:
        image_tokens = self.adapter.image_tokens
        if image_tokens is None:
            return None
        start = self.run.text_len + self.run.negative_image_len + image_tokens
        if start > length:
            raise GuidanceInputError(f"Flux Kontext sequence has {length} tokens, fewer than its {start} "
                                     "text, negative-image and image tokens")
        return slice(start, length) if start < length else None


class FluxKontextFamily(FluxFamily):
    family = "flux"
    label = "Flux Kontext"
    pipeline_prefixes = ("FluxKontextPipeline",)

    def __init__(self):
        super().__init__()
        self.image_tokens: int | None = None  # noisy-image tokens of the running denoiser call

    def processor_for(self, name, original, run):
        return FluxKontextVSFProcessor(original, run, self) if name.endswith(".attn.processor") else None

    def register_step_hook(self, model, hook):
        def before_forward(module, args, kwargs):
            img_ids = kwargs.get("img_ids")
            # index 0: the noisy image; 1, 2, ...: references (appended after it by the pipeline)
            self.image_tokens = None if img_ids is None else int((img_ids.reshape(-1, 3)[:, 0] == 0).sum())
            return hook(module, args, kwargs)

        return model.register_forward_pre_hook(before_forward, with_kwargs=True)

    def latent_grid(self, model, args, kwargs):
        img_ids = kwargs.get("img_ids")
        if img_ids is None or self.image_tokens is None:
            return None
        kwargs = dict(kwargs, img_ids=img_ids.reshape(-1, 3)[: self.image_tokens],
                      hidden_states=kwargs["hidden_states"][:, : self.image_tokens])
        return super().latent_grid(model, args, kwargs)

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
