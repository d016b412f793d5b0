"""Benchmark presets: diffusers transformer configs (random weights) and their attention shapes.

Each preset names a diffusers model class and config, the family adapter of `lib_vsf.diffusers` that
guides it, the token counts of one denoiser call (image tokens at the preset's resolution, positive and
negative text tokens) and how to build that call's inputs. Only `tiny` is meant for CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Preset:
    """One benchmark setting. `kind`: "joint" (MMDiT, one sequence) or "cross" (image queries, text keys)."""

    name: str
    model_class: str  # diffusers class name
    config: dict
    family: str  # lib_vsf.diffusers family ("sd3", "flux", "wan", "zimage", "flux2", "qwenimage")
    kind: str
    heads: int
    head_dim: int
    image_tokens: int
    positive_tokens: int
    negative_tokens: int
    negative_first: bool  # token order of the joint sequence: [N0, P, I] if True, [I, P, N0] if False
    text_first: bool
    make_inputs: Callable[["Preset", int, torch.device, torch.dtype], dict] = field(repr=False, default=None)
    note: str = ""
    video_latent: tuple[int, int, int] | None = None  # (frames, height, width) of a video latent
    # reference-image tokens R after the image tokens (Flux Kontext): [N0, P, I, R]
    reference_tokens: int = 0


def _sd3_inputs(p: Preset, batch: int, device, dtype) -> dict[str, Any]:
    side = int(round((p.image_tokens * p.config["patch_size"] ** 2) ** 0.5))
    c = p.config
    return dict(
        hidden_states=torch.randn(batch, c["in_channels"], side, side, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, p.positive_tokens, c["joint_attention_dim"], device=device,
                                          dtype=dtype),
        pooled_projections=torch.randn(batch, c["pooled_projection_dim"], device=device, dtype=dtype),
        timestep=torch.full((batch,), 500.0, device=device),
    )


def _flux_inputs(p: Preset, batch: int, device, dtype) -> dict[str, Any]:
    c = p.config
    side = int(round(p.image_tokens ** 0.5))
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3)
    if p.reference_tokens:  # Kontext: the reference latents follow the image, first id 1
        ref = int(round(p.reference_tokens ** 0.5))
        ry, rx = torch.meshgrid(torch.arange(ref), torch.arange(ref), indexing="ij")
        img_ids = torch.cat([img_ids, torch.stack([torch.ones_like(ry), ry, rx], -1).reshape(-1, 3)])
    img_ids = img_ids.to(device=device, dtype=dtype)
    out = dict(
        hidden_states=torch.randn(batch, p.image_tokens + p.reference_tokens, c["in_channels"], device=device,
                                  dtype=dtype),
        encoder_hidden_states=torch.randn(batch, p.positive_tokens, c["joint_attention_dim"], device=device,
                                          dtype=dtype),
        pooled_projections=torch.randn(batch, c["pooled_projection_dim"], device=device, dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(p.positive_tokens, 3, device=device, dtype=dtype),
    )
    if c.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return out


def _wan_inputs(p: Preset, batch: int, device, dtype) -> dict[str, Any]:
    c = p.config
    frames, h, w = p.video_latent
    return dict(
        hidden_states=torch.randn(batch, c["in_channels"], frames, h, w, device=device, dtype=dtype),
        timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, p.positive_tokens, c["text_dim"], device=device, dtype=dtype),
    )


def _zimage_inputs(p: Preset, batch: int, device, dtype) -> dict[str, Any]:
    """Z-Image's call: per-sample lists (latent [C, 1, H, W], caption [Lp, cap_feat_dim]), keywords."""
    c = p.config
    side = int(round(p.image_tokens ** 0.5)) * c["all_patch_size"][0]
    return dict(
        x=[torch.randn(c["in_channels"], 1, side, side, device=device, dtype=dtype) for _ in range(batch)],
        t=torch.full((batch,), 0.5, device=device, dtype=dtype),
        cap_feats=[torch.randn(p.positive_tokens, c["cap_feat_dim"], device=device, dtype=dtype)
                   for _ in range(batch)],
    )


def _flux2_inputs(p: Preset, batch: int, device, dtype) -> dict[str, Any]:
    """Flux.2's call: packed latents, text padded to `positive_tokens`, 4-axis ids (t, h, w, l)."""
    c = p.config
    side = int(round(p.image_tokens ** 0.5))
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ys), ys, xs, torch.zeros_like(ys)], -1).reshape(-1, 4)
    txt_ids = torch.zeros(p.positive_tokens, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(p.positive_tokens)
    out = dict(
        hidden_states=torch.randn(batch, p.image_tokens, c["in_channels"], device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, p.positive_tokens, c["joint_attention_dim"], device=device,
                                          dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids[None].expand(batch, -1, -1).to(device),
        txt_ids=txt_ids[None].expand(batch, -1, -1).to(device),
    )
    if c.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return out


def _qwenimage_inputs(p: Preset, batch: int, device, dtype) -> dict[str, Any]:
    """Qwen-Image's call: packed latents, unpadded text (one prompt: no mask), MSRoPE from `img_shapes`."""
    c = p.config
    side = int(round(p.image_tokens ** 0.5))
    return dict(
        hidden_states=torch.randn(batch, p.image_tokens, c["in_channels"], device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, p.positive_tokens, c["joint_attention_dim"], device=device,
                                          dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_shapes=[[(1, side, side)]] * batch,
    )


SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
SD3_TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32, qk_norm="rms_norm")
# 4-layer SD3 at 512x512-equivalent shapes (1024 image tokens, 8 heads of 64): big enough on CPU for
# attention, not Python, to dominate a forward (the tiny preset's is ~3 ms), small enough to time in minutes.
SD3_CPU = dict(SD3_TINY, sample_size=64, num_layers=4, attention_head_dim=64, num_attention_heads=8,
               joint_attention_dim=256, caption_projection_dim=512, pooled_projection_dim=64, pos_embed_max_size=64)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(FLUX_DEV, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

# Z-Image Turbo (6B) and Flux.2 Klein 4B: the configs their checkpoints ship (transformer/config.json).
ZIMAGE_TURBO = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                    n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                    rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
ZIMAGE_TINY = dict(ZIMAGE_TURBO, in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                   cap_feat_dim=32, axes_dims=[8, 4, 4], axes_lens=[256, 64, 64])
FLUX2_KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                      mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                      guidance_embeds=False)
FLUX2_TINY = dict(FLUX2_KLEIN_4B, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=48, timestep_guidance_channels=32,
                  axes_dims_rope=(4, 4, 4, 4))
# Qwen-Image (20B): the config its checkpoint ships (transformer/config.json).
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN_IMAGE_TINY = dict(QWEN_IMAGE, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                       num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "SD3Transformer2DModel", SD3_TINY, "sd3", "joint", 4, 16, 64, 12, 3, False, False,
                   _sd3_inputs, note="2-layer SD3, 128x128 equivalent; CPU smoke test"),
    "sd3-cpu": Preset("sd3-cpu", "SD3Transformer2DModel", SD3_CPU, "sd3", "joint", 8, 64, 1024, 77, 12, False,
                      False, _sd3_inputs, note="4-layer SD3, 512x512 equivalent; CPU timings where attention dominates"),
    "sd35-large": Preset("sd35-large", "SD3Transformer2DModel", SD35_LARGE, "sd3", "joint", 38, 64, 4096, 333, 8,
                         False, False, _sd3_inputs, note="1024x1024; [I, P, N0]"),
    "sd35-medium": Preset("sd35-medium", "SD3Transformer2DModel", SD35_MEDIUM, "sd3", "joint", 24, 64, 4096, 333,
                          8, False, False, _sd3_inputs, note="1024x1024; [I, P, N0]"),
    "flux-dev": Preset("flux-dev", "FluxTransformer2DModel", FLUX_DEV, "flux", "joint", 24, 128, 4096, 512, 8,
                       True, True, _flux_inputs, note="1024x1024; text first, negative first: [N0, P, I]"),
    # Flux Kontext dev: the Flux.1 dev transformer with one 1024x1024 reference image after the image tokens.
    "flux-kontext": Preset("flux-kontext", "FluxTransformer2DModel", FLUX_DEV, "flux", "joint", 24, 128, 4096, 512, 8,
                           True, True, _flux_inputs, reference_tokens=4096,
                           note="1024x1024 + one 1024x1024 reference; [N0, P, I, R]"),
    "flux-kontext-tiny": Preset("flux-kontext-tiny", "FluxTransformer2DModel", FLUX_TINY, "flux", "joint", 4, 16, 64,
                                32, 12, True, True, _flux_inputs, reference_tokens=64,
                                note="1+1-block Flux Kontext, 128x128 + a 128x128 reference; CPU check"),
    "wan-1.3b": Preset("wan-1.3b", "WanTransformer3DModel", WAN_13B, "wan", "cross", 12, 128, 21 * 30 * 52, 512,
                       8, False, False, _wan_inputs, note="480x832, 81 frames; cross-attention (attn2)",
                       video_latent=(21, 60, 104)),
    # Z-Image: [I (padded to 32), P (caption padded to 32), N0]; the negative carries its chat template.
    "zimage-turbo": Preset("zimage-turbo", "ZImageTransformer2DModel", ZIMAGE_TURBO, "zimage", "joint", 30, 128,
                           4096, 128, 16, False, False, _zimage_inputs,
                           note="1024x1024, 6B; unified blocks [I, P, N0]"),
    "zimage-tiny": Preset("zimage-tiny", "ZImageTransformer2DModel", ZIMAGE_TINY, "zimage", "joint", 4, 16, 64, 32,
                          12, False, False, _zimage_inputs, note="2-layer Z-Image, 128x128 equivalent; CPU check"),
    "flux2-klein-4b": Preset("flux2-klein-4b", "Flux2Transformer2DModel", FLUX2_KLEIN_4B, "flux2", "joint", 24, 128,
                             4096, 512, 16, True, True, _flux2_inputs,
                             note="1024x1024, 4B; text first, negative first: [N0, P, I]"),
    "flux2-tiny": Preset("flux2-tiny", "Flux2Transformer2DModel", FLUX2_TINY, "flux2", "joint", 4, 16, 64, 32, 12,
                         True, True, _flux2_inputs, note="1+1-block Flux.2, 128x128 equivalent; CPU check"),
    # Qwen-Image: double-stream blocks over [N0, P, I]; a prompt of 128 tokens after the template is dropped.
    "qwen-image": Preset("qwen-image", "QwenImageTransformer2DModel", QWEN_IMAGE, "qwenimage", "joint", 24, 128,
                         4096, 128, 16, True, True, _qwenimage_inputs,
                         note="1024x1024, 20B; text first, negative first: [N0, P, I]"),
    "qwen-image-tiny": Preset("qwen-image-tiny", "QwenImageTransformer2DModel", QWEN_IMAGE_TINY, "qwenimage", "joint",
                              4, 16, 64, 32, 12, True, True, _qwenimage_inputs,
                              note="2-block Qwen-Image, 128x128 equivalent; CPU check"),
}


def build_model(preset: Preset, device, dtype) -> torch.nn.Module:
    """The preset's diffusers transformer with random weights, on `device` in `dtype`, eval mode."""
    import diffusers

    cls = getattr(diffusers, preset.model_class)
    # Build directly in the target dtype on the device: an 8-12B model never exists in float32.
    saved = torch.get_default_dtype()
    try:
        if dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**preset.config)
    finally:
        torch.set_default_dtype(saved)
    return model.to(dtype=dtype).eval().requires_grad_(False)
