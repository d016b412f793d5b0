"""Tiny real Qwen-Image pipelines built in code (random weights, tiny vocabulary): no downloads.

`QwenImagePipeline` (text to image), `QwenImageEditPipeline` (one input image) and
`QwenImageEditPlusPipeline` (several input images) share one tiny `QwenImageTransformer2DModel` shape and a
tiny Qwen2.5-VL text encoder (`Qwen2_5_VLForConditionalGeneration`: 2 text layers, a 1-block vision tower).
The tokenizer is the byte-level BPE of `tiny_pipelines_2026` plus the Qwen2.5-VL vision special tokens; the
Edit pipelines' `Qwen2VLProcessor` uses the PIL image processor (patch 4, merge 2) capped at 32x32 pixels,
so an input image is a handful of vision tokens.

The Edit pipelines resize every input image to about 1024x1024 pixels before the VAE (their own rule), so
their tiny VAE downsamples by 32 (five levels): the reference latents are then 16x16 tokens after packing,
and an output of 128x128 pixels is 2x2 image tokens. The text-to-image VAE downsamples by 8.
"""
from __future__ import annotations

import torch

from tiny_pipelines_2026 import SPECIAL, qwen_tokenizer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TEXT_HIDDEN = 32


def qwen_vl_tokenizer():
    tokenizer = qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL[1:] + VISION_TOKENS)})
    return tokenizer


def qwen_vl_text_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=TEXT_HIDDEN,
                           window_size=16, fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_vl_processor(tokenizer):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor, whose class needs torchvision (not installed here);
        images and text go through the library's own code."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    return ImageQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def qwen_transformer(seed: int = 0, layers: int = 2):
    """Qwen-Image MMDiT: 2 double-stream blocks, 2 heads x 16, RoPE axes (4, 6, 6), text dim 32."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6),
    ).eval()


def qwen_vae(seed: int, levels: int):
    """AutoencoderKLQwenImage, 4 latent channels, downsampling by 2 ** levels."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1] * (levels + 1), num_res_blocks=1,
        temperal_downsample=[False] * levels, latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    ).eval()


def qwen_image_pipeline(seed: int = 0):
    """QwenImagePipeline: 64x64 images are 4x4 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    tokenizer = qwen_vl_tokenizer()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=qwen_vae(seed + 2, 3),
        text_encoder=qwen_vl_text_encoder(tokenizer, seed + 1), tokenizer=tokenizer,
        transformer=qwen_transformer(seed),
    )


def _edit_pipeline(cls, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = qwen_vl_tokenizer()
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=qwen_vae(seed + 2, 5),
        text_encoder=qwen_vl_text_encoder(tokenizer, seed + 1), tokenizer=tokenizer,
        processor=qwen_vl_processor(tokenizer), transformer=qwen_transformer(seed),
    )
    _memoise_vae_encoding(pipe)
    return pipe


def _memoise_vae_encoding(pipe):
    """The Edit pipelines VAE-encode their ~1024x1024 input image on every call (seconds on CPU); the
    encoding is deterministic (argmax latents), so the same pixels reuse it. Nothing else changes."""
    original, cache = pipe._encode_vae_image, {}

    def encode(image, generator):
        key = (tuple(image.shape), image.dtype, hash(image.detach().cpu().numpy().tobytes()))
        if key not in cache:
            cache[key] = original(image=image, generator=generator)
        return cache[key].clone()

    pipe._encode_vae_image = encode


def qwen_image_edit_pipeline(seed: int = 0):
    """QwenImageEditPipeline: one input image (reference latents 16x16 tokens)."""
    from diffusers import QwenImageEditPipeline

    return _edit_pipeline(QwenImageEditPipeline, seed)


def qwen_image_edit_plus_pipeline(seed: int = 0):
    """QwenImageEditPlusPipeline: several input images, each its own reference latents."""
    from diffusers import QwenImageEditPlusPipeline

    return _edit_pipeline(QwenImageEditPlusPipeline, seed)


def input_images(count: int = 1, size: int = 32):
    """Deterministic RGB test images (PIL), different from each other."""
    from PIL import Image

    images = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(pixels, "RGB"))
    return images


BUILDERS_QWEN = {
    "qwen-image": qwen_image_pipeline,
    "qwen-image-edit": qwen_image_edit_pipeline,
    "qwen-image-edit-plus": qwen_image_edit_plus_pipeline,
}

# Call arguments that make each tiny pipeline fast and small (images: `input_images`).
CALL_ARGS_QWEN = {
    "qwen-image": dict(height=64, width=64, num_inference_steps=3, max_sequence_length=128),
    "qwen-image-edit": dict(height=128, width=128, num_inference_steps=3),
    "qwen-image-edit-plus": dict(height=128, width=128, num_inference_steps=3),
}
