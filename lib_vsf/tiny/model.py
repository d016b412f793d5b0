"""The bundled tiny text-to-image model: a real diffusers `StableDiffusion3Pipeline`.

- transformer: `SD3Transformer2DModel`, 32x32 input, patch 2 (256 image tokens), 4 joint blocks of
  4 heads x 32, about 2.3M parameters;
- text: two tiny `CLIPTextModelWithProjection` (hidden 64, 3 layers; the pipeline takes the
  penultimate layer) over one small whole-word CLIP BPE vocabulary (`data.WORDS` plus letters), 16
  tokens; no T5 (`text_encoder_3=None`: the pipeline then appends 256 zero T5 tokens);
- VAE: pixel space. The latent is the RGB image itself in [-1, 1] (3 channels, no down-sampling,
  scaling 1, shift 0), through an `AutoencoderKL` whose weights are set so that encode (mode) and decode
  are the identity up to a relative error below 1e-6 (`identity_vae`, exact construction documented
  there). The diffusion model therefore works on pixels and the VAE is a pass-through the pipeline needs.

`build_pipeline(seed)` makes the untrained pipeline (deterministic for a seed); `load_pipeline()` loads
the trained one committed under `weights/`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import data

WEIGHTS_DIR = Path(__file__).parent / "weights"
MAX_TOKENS = 16
T5_ZERO_TOKENS = 256  # what StableDiffusion3Pipeline appends without T5 (its max_sequence_length default)
VAE_CONST = 1000.0


def tokenizer():
    """CLIP BPE tokenizer over `data.WORDS` (each word one token) and single letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in sorted(data.WORDS, key=lambda w: (w != "stripes", -len(w))):  # merge order that keeps each word whole
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, projection_dim=64, hidden_act="gelu")
    return CLIPTextModelWithProjection(config)


def transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=data.SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                 caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=16)


@torch.no_grad()
def identity_vae():
    """`AutoencoderKL` (one block of 12 channels, 3 GroupNorm groups, no attention, no resampling) set to
    the identity on images in [-1, 1]:

    - every ResNet block's last conv is zero, so each block passes its input through;
    - conv_in (3x3, centre tap only) sends pixel channel c to the group of 4 channels [p, -p, K, -K]
      (K = 1000 from the bias); the group's mean is then exactly 0 and its variance (mean(p^2) + K^2) / 2;
    - the output GroupNorm scales the p channels by K / sqrt(2) (the constants by 0), giving
      p / sqrt(1 + mean(p^2) / K^2), within 5e-7 of p;
    - after SiLU, conv_out takes SiLU(p) - SiLU(-p) = p. The encoder's conv_out writes p as the mean
      and -30 as the log-variance (std 3e-7) of the latent distribution."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(12,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=3, sample_size=data.SIZE, scaling_factor=1.0,
                        shift_factor=0.0, mid_block_add_attention=False, use_quant_conv=False,
                        use_post_quant_conv=False)
    for p in vae.parameters():
        p.zero_()
    for coder, out_rows in ((vae.encoder, 6), (vae.decoder, 3)):
        for c in range(3):
            coder.conv_in.weight[4 * c, c, 1, 1] = 1.0
            coder.conv_in.weight[4 * c + 1, c, 1, 1] = -1.0
            coder.conv_in.bias[4 * c + 2] = VAE_CONST
            coder.conv_in.bias[4 * c + 3] = -VAE_CONST
            coder.conv_norm_out.weight[4 * c] = VAE_CONST / math.sqrt(2.0)
            coder.conv_norm_out.weight[4 * c + 1] = VAE_CONST / math.sqrt(2.0)
            coder.conv_out.weight[c, 4 * c, 1, 1] = 1.0
            coder.conv_out.weight[c, 4 * c + 1, 1, 1] = -1.0
        if out_rows == 6:
            coder.conv_out.bias[3:] = -30.0
    return vae.eval()


def build_pipeline(seed: int = 0):
    """Untrained pipeline, float32 on CPU, the same weights for the same seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=identity_vae(),
        text_encoder=text_encoder(len(tok)), tokenizer=tok, text_encoder_2=text_encoder(len(tok)),
        tokenizer_2=tokenizer(), text_encoder_3=None, tokenizer_3=None)
    # No pooled text embedding: both encoders' projections are zero and stay so (not trained), so the
    # pooled input of every block's modulation carries no caption and the caption reaches the image
    # only through joint attention over the text tokens, where VSF acts. With a pooled caption a model
    # this small reads its prompt mostly from the modulation, and a negative in attention has little to act on.
    with torch.no_grad():
        for enc in (pipe.text_encoder, pipe.text_encoder_2):
            enc.text_projection.weight.zero_()
            enc.text_projection.requires_grad_(False)
    return pipe


def bundled_path() -> Path:
    return WEIGHTS_DIR


# What `from_pretrained` needs besides the directory: the pipeline runs without T5, and diffusers
# requires the absent components to be passed as None.
LOAD_KWARGS = {"text_encoder_3": None, "tokenizer_3": None}


def load_pipeline(path: str | Path | None = None, dtype=torch.float32):
    """The trained pipeline (default: the bundled weights), eval mode."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path or WEIGHTS_DIR), torch_dtype=dtype, **LOAD_KWARGS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CollapsedZerosProcessor:
    """Joint attention for training where the pipeline's 256 identical zero T5 tokens are one token.

    Identical tokens stay identical through every block (same input, same query), so n copies of a
    key / value equal one copy whose attention logit gets + log(n). Training with one zero token and
    this bias computes exactly what the pipeline computes with 256 (checked in the tests)."""

    def __init__(self, copies: int = T5_ZERO_TOKENS):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch.nn.functional as F

        b, n_img, _ = hidden_states.shape
        h = attn.heads

        def heads(x):
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq, ck, cv = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                      heads(attn.add_v_proj(encoder_hidden_states)))
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        image, text = out[:, :n_img], out[:, n_img:]
        image = attn.to_out[1](attn.to_out[0](image))
        if attn.context_pre_only:
            return image, None
        return image, attn.to_add_out(text)
