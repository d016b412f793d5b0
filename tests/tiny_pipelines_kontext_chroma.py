"""Tiny real Flux Kontext and Chroma pipelines built in code (random weights, tiny vocabularies): no downloads.

Kontext is Flux.1 (`FluxTransformer2DModel` with the distilled guidance embedding) behind
`FluxKontextPipeline`, which appends the reference image's latents after the image tokens; it reuses the
Flux parts of `tiny_pipelines`. Chroma is `ChromaTransformer2DModel` with a T5 encoder and a T5 tokenizer
(the pipeline builds its own text padding mask). Each builder returns a pipeline in eval mode on CPU,
float32, deterministic for a given seed.
"""
from __future__ import annotations

import torch

from tiny_pipelines import _vae, clip_text_model, clip_tokenizer, t5_encoder, t5_tokenizer


def kontext_pipeline(seed: int = 0):
    """Flux Kontext: 1 double + 1 single block, T5 + CLIP, guidance embedding; images and reference 16x16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
    return FluxKontextPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_model(32, seed=seed + 1), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(32, seed=seed + 2), tokenizer_2=t5_tokenizer(),
    )


def chroma_transformer(seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1,
    ).eval()


def chroma_pipeline(seed: int = 0, img2img: bool = False):
    """Chroma (or Chroma img2img): 1 double + 1 single block, T5 only, 16x16 images."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = diffusers.ChromaImg2ImgPipeline if img2img else diffusers.ChromaPipeline
    return cls(
        transformer=chroma_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=t5_encoder(32, seed=seed + 2), tokenizer=t5_tokenizer(),
    )


def reference_image(size: int = 16, seed: int = 0):
    """A deterministic RGB noise image (PIL) for Kontext's `image=` / img2img's `image=`."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


BUILDERS_KC = {
    "kontext": kontext_pipeline,
    "chroma": chroma_pipeline,
    "chroma-img2img": lambda seed=0: chroma_pipeline(seed, img2img=True),
}


def call_args_kc(name: str) -> dict:
    """Call arguments that make each tiny pipeline fast and small (Kontext: `max_area` 16x16, no
    resizing of the reference to Kontext's preferred resolutions)."""
    args = dict(height=16, width=16, num_inference_steps=3, max_sequence_length=16)
    if name == "kontext":
        args.update(image=reference_image(), max_area=16 * 16, _auto_resize=False)
    if name == "chroma-img2img":
        args.update(image=reference_image(), strength=0.9)
    return args
