"""Tiny real Z-Image and Flux.2 Klein pipelines built in code (random weights, tiny vocabulary): no downloads.

Both families encode text with Qwen3 through a chat template. The tokenizer here is a real transformers
byte-level BPE tokenizer (`Qwen2Tokenizer`, as the real checkpoints ship) over the 256 byte symbols plus
the chat special tokens, with a chat template of the same shape as Qwen3's (user turn, assistant header,
optional empty think block). Padding side and padding behaviour are the library's own.
"""
from __future__ import annotations

import torch

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# A few merges so that prompt words are short token runs (and token counts are not just byte counts).
MERGED_WORDS = ("photo", "cat", "dog", "red", "blue", "blurry", "text", "watermark", "user", "assistant")


def qwen_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = []
    for word in MERGED_WORDS:
        word = "\u0120" + word  # byte-level BPE marks a leading space with U+0120
        left = word[0]
        for right in word[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            vocab.setdefault(left, len(vocab))
    for token in SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen3_config(hidden: int, layers: int, vocab_size: int = 320):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=1024, tie_word_embeddings=False)


def _vae(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, shift_factor=0.1, scaling_factor=1.2).eval()


def _randomise(module, names, seed):
    """Parameters the library initialises to zeros (learned pad tokens) get random values, so that tests
    see them: a zero pad token would hide a pad-handling bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            p = module.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def zimage_transformer(seed: int = 0, cap_feat_dim: int = 32, n_layers: int = 2, n_refiner_layers: int = 1):
    """Z-Image DiT: 1 noise refiner, 1 context refiner, 2 unified blocks, dim 32 (2 heads x 16)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=2, n_kv_heads=2, cap_feat_dim=cap_feat_dim,
        axes_dims=[8, 4, 4], axes_lens=[512, 32, 32],
    )
    _randomise(model, ("x_pad_token", "cap_pad_token"), seed + 11)
    return model.eval()


def zimage_pipeline(seed: int = 0):
    """Z-Image pipeline (Qwen3 text encoder, 2 layers), 32x32 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Model

    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(qwen3_config(32, 2)).eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=_vae(4, seed),
        text_encoder=text_encoder, tokenizer=qwen_tokenizer(), transformer=zimage_transformer(seed),
    )


def flux2_transformer(seed: int = 0, joint_attention_dim: int = 48, guidance_embeds: bool = False):
    """Flux.2 transformer: 1 double + 1 single block, 2 heads x 16, RoPE axes (4, 4, 4, 4)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32,
        mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def flux2_klein_pipeline(seed: int = 0, distilled: bool = True):
    """Flux.2 Klein pipeline (Qwen3 text encoder with 27 layers, so that the pipeline's default
    hidden-state layers 9/18/27 exist; hidden 16, stacked to 48), 32x32 images."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(qwen3_config(16, 27)).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                             mid_block_add_attention=False).eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=text_encoder,
        tokenizer=qwen_tokenizer(), transformer=flux2_transformer(seed, joint_attention_dim=48),
        is_distilled=distilled,
    )


# Flux.2 dev's messages: a system turn and a user turn, each a list of {"type": "text", "text": ...} parts.
MISTRAL_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/{{ m['role'] }}]"
    "{% endfor %}"
)


def flux2_dev_pipeline(seed: int = 0):
    """Flux.2 dev pipeline: a tiny Mistral 3 text encoder (30 layers, so that the pipeline's layers 10/20/30
    exist; hidden 16, stacked to 48) and the guidance-embedding transformer, 32x32 images. The real pipeline's
    tokenizer is a PixtralProcessor, whose text-only chat template path is its tokenizer's; that processor
    needs torchvision, so the tokenizer stands in for it here."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed + 1)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=320, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16, head_dim=8),
        image_token_index=300, spatial_merge_size=1)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                             mid_block_add_attention=False).eval()
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, transformer=flux2_transformer(seed, joint_attention_dim=48, guidance_embeds=True),
    )


BUILDERS_2026 = {
    "zimage": zimage_pipeline,
    "flux2-klein": flux2_klein_pipeline,
    "flux2-dev": flux2_dev_pipeline,
}

# Call arguments that make each tiny pipeline fast and small.
CALL_ARGS_2026 = {
    "zimage": dict(height=32, width=32, num_inference_steps=3, max_sequence_length=128),
    "flux2-klein": dict(height=32, width=32, num_inference_steps=3, max_sequence_length=64),
    "flux2-dev": dict(height=32, width=32, num_inference_steps=3, max_sequence_length=64),
}
