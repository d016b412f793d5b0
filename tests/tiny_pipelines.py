"""Tiny real diffusers pipelines built in code (random weights, tiny vocabularies): no downloads.

Each builder returns a pipeline in eval mode on CPU, float32, deterministic for a given seed.
Tokenizers are real transformers tokenizers (CLIP BPE, T5 Unigram) over a small word list, so the
padding behaviour under test is the library's own.
"""
from __future__ import annotations

import torch

WORDS = ("a photo of cat dog red blue blurry text watermark car tree house the in with low quality "
         "green sky ugly bad hands sunny beach portrait painting bright dark").split()


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []

    def add(token):
        vocab.setdefault(token, len(vocab))

    for c in "abcdefghijklmnopqrstuvwxyz":
        add(c)
        add(c + "</w>")
    for word in WORDS:  # merges that build each word left to right: p h -> ph, ph o -> pho, ...
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merge = (left, right)
            if merge not in merges:
                merges.append(merge)
            left = left + right
            add(left)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = 32):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,."]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text_model(hidden: int = 32, projection: int | None = None, vocab_size: int = 256, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=projection or hidden, hidden_act="gelu")
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def t5_encoder(d_model: int = 32, vocab_size: int = 64, seed: int = 0, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


def _vae(latent_channels: int = 4, seed: int = 0, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, **extra).eval()


def sd3_pipeline(seed: int = 0, with_t5: bool = True, dual_attention: bool = False):
    """SD3 (or SD3.5 Medium-like with `dual_attention`) pipeline, 2 joint blocks, 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm" if dual_attention else None,
        dual_attention_layers=(0,) if dual_attention else (),
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_model(16, projection=32, seed=seed + 1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_model(16, projection=32, seed=seed + 2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(32, seed=seed + 3) if with_t5 else None,
        tokenizer_3=t5_tokenizer() if with_t5 else None,
    )


def flux_pipeline(seed: int = 0, guidance_embeds: bool = False):
    """Flux pipeline: 1 double + 1 single block, T5 + CLIP, 16x16 images (`guidance_embeds`: Flux dev's
    distilled guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_model(32, seed=seed + 1), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(32, seed=seed + 2), tokenizer_2=t5_tokenizer(),
    )


def wan_pipeline(seed: int = 0, two_experts: bool = False):
    """Wan 2.1 text-to-video (or a 2.2-style pair of experts) pipeline, 2 blocks, 9 frames of 16x16."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def transformer(s):
        torch.manual_seed(s)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    tokenizer = t5_tokenizer(32)
    return WanPipeline(
        transformer=transformer(seed), transformer_2=transformer(seed + 7) if two_experts else None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=t5_encoder(32, seed=seed + 1, umt5=True), tokenizer=tokenizer,
        boundary_ratio=0.5 if two_experts else None,
    )


def _unet(cross_dim: int, seed: int, sdxl: bool = False, time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {"time_cond_proj_dim": time_cond_proj_dim}
    if sdxl:
        extra.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=8, **extra,
    ).eval()


def sd15_pipeline(seed: int = 0):
    """SD1.5-style UNet pipeline, 16x16 images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=_unet(32, seed), scheduler=EulerDiscreteScheduler(steps_offset=1), vae=_vae(4, seed),
        text_encoder=clip_text_model(32, seed=seed + 1), tokenizer=clip_tokenizer(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_pipeline(seed: int = 0):
    """SDXL-style UNet pipeline (two CLIP encoders, text_time embedding), 16x16 images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=_unet(64, seed, sdxl=True), scheduler=EulerDiscreteScheduler(steps_offset=1), vae=_vae(4, seed),
        text_encoder=clip_text_model(32, seed=seed + 1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_model(32, projection=32, seed=seed + 2), tokenizer_2=clip_tokenizer(),
    )


def lcm_pipeline(seed: int = 0, pipeline: str = "LatentConsistencyModelPipeline"):
    """LCM-distilled SD1.5-style pipeline: the UNet embeds guidance_scale (`time_cond_proj_dim`, the
    w-embedding) and the LCMScheduler runs one pass per step. `pipeline`: LatentConsistencyModelPipeline
    or StableDiffusionPipeline (both feed the w-embedding and skip CFG for such a UNet)."""
    import diffusers

    parts = dict(unet=_unet(32, seed, time_cond_proj_dim=8), scheduler=diffusers.LCMScheduler(), vae=_vae(4, seed),
                 text_encoder=clip_text_model(32, seed=seed + 1), tokenizer=clip_tokenizer(),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return getattr(diffusers, pipeline)(**parts)


def load_tiny_ip_adapter(pipe, image_embed_dim: int = 16, seed: int = 0) -> None:
    """Load a random-weight IP-Adapter (4 image-prompt tokens) into `pipe.unet` through diffusers' own
    loader (`_load_ip_adapter_weights`, the state-dict layout of the published IP-Adapter files).
    Call the pipeline with `ip_adapter_image_embeds=[torch.randn(1, 1, image_embed_dim)]`."""
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return torch.randn(*shape, generator=gen) * 0.5

    image_proj = {"proj.weight": weight(4 * cross, image_embed_dim), "proj.bias": weight(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers, key = {}, 1
    for name in unet.attn_processors:  # the loader numbers the attn2 layers 1, 3, 5, ... in this order
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            layers[f"{key}.to_k_ip.weight"] = weight(hidden, cross)
            layers[f"{key}.to_v_ip.weight"] = weight(hidden, cross)
            key += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": layers}], low_cpu_mem_usage=False)


BUILDERS = {
    "sd3": sd3_pipeline,
    "sd35m": lambda seed=0: sd3_pipeline(seed, dual_attention=True),
    "sd3-no-t5": lambda seed=0: sd3_pipeline(seed, with_t5=False),
    "flux": flux_pipeline,
    "wan": wan_pipeline,
    "wan22": lambda seed=0: wan_pipeline(seed, two_experts=True),
    "sd15": sd15_pipeline,
    "sdxl": sdxl_pipeline,
}

# Call arguments that make each tiny pipeline fast and small.
CALL_ARGS = {
    "sd3": dict(height=16, width=16, num_inference_steps=3, max_sequence_length=16),
    "flux": dict(height=16, width=16, num_inference_steps=3, max_sequence_length=16),
    "wan": dict(height=16, width=16, num_frames=5, num_inference_steps=3, max_sequence_length=16),
    "unet": dict(height=16, width=16, num_inference_steps=3),
}


def call_args(name: str) -> dict:
    family = {"sd35m": "sd3", "sd3-no-t5": "sd3", "wan22": "wan", "wan-i2v": "wan", "sd15": "unet",
              "sdxl": "unet"}.get(name, name)
    args = dict(CALL_ARGS[family])
    if name == "wan-i2v":
        from PIL import Image

        args["image"] = Image.new("RGB", (16, 16), (200, 30, 30))
    return args


def wan_i2v_pipeline(seed: int = 0):
    """Wan 2.1 image-to-video pipeline: CLIP-vision image tokens in front of the text (`add_k_proj`)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=16, added_kv_proj_dim=24,
    ).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed + 5)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        intermediate_size=16, patch_size=4)).eval()
    processor = CLIPImageProcessor(crop_size=16, size={"shortest_edge": 16})
    return WanImageToVideoPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=t5_encoder(32, seed=seed + 1, umt5=True), tokenizer=t5_tokenizer(32),
        image_encoder=vision, image_processor=processor,
    )


BUILDERS["wan-i2v"] = wan_i2v_pipeline
