"""Build a tiny, random-weight SD3 checkpoint that Forge's loader accepts.

Run with the Forge virtual environment's python (it needs torch, transformers and diffusers, and
imports Forge's own model classes so the tensor names match exactly):

    <forge-venv>/bin/python tests/e2e/make_tiny_sd3_checkpoint.py --forge-dir <forge checkout>

Writes `<forge>/models/Stable-diffusion/vsf-tiny-sd3.safetensors` (override with --out). Nothing is
downloaded: every shape comes from the checkpoint itself or from configs bundled in Forge.

What Forge (dfdcbab6 + huggingface_guess 84826248) needs, found by reading `backend/loader.py`:
- `model.diffusion_model.*`: the MMDiT. `huggingface_guess.detection.detect_unet_config` sizes it from
  the tensors (depth = x_embedder width / 64, pos_embed length, context_embedder shape, y_embedder
  input, `ln_q` present -> RMS qk-norm). SD3 feeds context width 4096 and pooled width 2048, so the
  tiny MMDiT is depth 2 (hidden 128, 2 heads) with Linear(4096 -> 128) and a 2048 -> 128 y embedder.
  Detection does not read `x_block_self_attn_layers`, so the tiny model has none (SD3-Medium-1 style).
- `text_encoders.clip_l.*`, `text_encoders.clip_g.*`, `text_encoders.t5xxl.*`, `first_stage_model.*`:
  each component is built from Forge's bundled FULL-SIZE config
  (`backend/huggingface/stabilityai/stable-diffusion-3-medium-diffusers/*`), and the loader asserts
  its state dict has more than 16 tensors. Shapes must match the full config (torch raises on a size
  mismatch even with strict=False); missing tensors are only printed and stay uninitialised.
  So CLIP-L (123M params), CLIP-G (695M) and the VAE (84M) are stored whole (fp16, about 1.8 GB),
  initialised by their libraries' own init under a fixed seed. T5-XXL (4.7B) is stored as its
  49 layer-norm vectors only: Forge's `sd3_enable_t5` option is off by default and then T5 never
  runs (zeros are fed for its part of the context). Do not enable T5 with this checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

SD3_REPO = os.path.join("backend", "huggingface", "stabilityai", "stable-diffusion-3-medium-diffusers")
DEFAULT_NAME = "vsf-tiny-sd3.safetensors"

# MMDiT sizes: hidden = 64 * depth, heads = depth (Forge's MMDiTX "magic").
MMDIT_DEPTH = 2
MMDIT_POS_EMBED_MAX = 16  # up to 16x16 patches = 32x32 latent = 256x256 pixels
CONTEXT_WIDTH = 4096  # SD3 crossattn width in Forge (CLIP-L|G padded to 4096, T5 4096)
POOLED_WIDTH = 2048  # CLIP-L pooled 768 + CLIP-G pooled 1280


def _import_forge(forge_dir: str):
    """Put Forge on sys.path; `backend/args.py` parses sys.argv at import time."""
    forge_dir = os.path.abspath(forge_dir)
    for p in (forge_dir, os.path.join(forge_dir, "packages_3rdparty"),
              os.path.join(forge_dir, "repositories", "huggingface_guess")):
        if p not in sys.path:
            sys.path.insert(0, p)
    saved = sys.argv
    sys.argv = [saved[0], "--always-cpu"]
    try:
        from backend.nn.mmditx import MMDiTX  # noqa: F401
        from backend.nn.vae import IntegratedAutoencoderKL  # noqa: F401
    finally:
        sys.argv = saved
    return forge_dir


def _sincos_pos_embed(num_patches: int, dim: int):
    import torch

    side = int(math.isqrt(num_patches))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                            torch.arange(side, dtype=torch.float64), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    parts = []
    for grid in (ys.reshape(-1), xs.reshape(-1)):
        arg = grid[:, None] * omega[None, :]
        parts += [torch.sin(arg), torch.cos(arg)]
    return torch.cat(parts, dim=1).float()[None]


def build_mmdit(gen):
    """Random MMDiT whose activations stay O(1), so guidance changes survive to the pixels."""
    import torch
    from backend.nn.mmditx import MMDiTX

    hidden = 64 * MMDIT_DEPTH
    num_patches = MMDIT_POS_EMBED_MAX ** 2
    model = MMDiTX(
        input_size=None, patch_size=2, in_channels=16, depth=MMDIT_DEPTH,
        adm_in_channels=POOLED_WIDTH,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": CONTEXT_WIDTH, "out_features": hidden}},
        pos_embed_max_size=MMDIT_POS_EMBED_MAX, num_patches=num_patches, qk_norm="rms",
        x_block_self_attn_layers=[],
    )
    sd = {}
    for name, t in model.state_dict().items():
        if name == "pos_embed":
            v = _sincos_pos_embed(num_patches, hidden)
        elif name.endswith(("ln_q.weight", "ln_k.weight")):
            v = torch.ones(t.shape)  # RMSNorm weights come from torch.empty in Forge
        elif t.ndim >= 2:
            fan_in = t[0].numel()
            v = torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)
        else:
            v = 0.02 * torch.randn(t.shape, generator=gen)
        sd["model.diffusion_model." + name] = v.to(torch.float16).contiguous()
    return sd


def build_clip(config_dir: str, prefix: str, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig.from_pretrained(config_dir)
    model = CLIPTextModelWithProjection(config)  # keys text_model.*, text_projection.weight
    sd = {}
    for name, t in model.state_dict().items():
        if name.endswith("position_ids"):
            continue
        sd[prefix + name] = t.detach().to(torch.float16).contiguous()
    del model
    return sd


def build_t5_norms(config_path: str, prefix: str):
    """Only T5's layer norms (full shape): enough for the loader; T5 never runs with T5 off."""
    import torch

    with open(config_path) as f:
        cfg = json.load(f)
    d = cfg["d_model"]
    sd = {prefix + "encoder.final_layer_norm.weight": torch.ones(d, dtype=torch.float16)}
    for i in range(cfg["num_layers"]):
        for j in (0, 1):
            sd[f"{prefix}encoder.block.{i}.layer.{j}.layer_norm.weight"] = torch.ones(d, dtype=torch.float16)
    return sd


def build_vae(config_dir: str, seed: int):
    import torch
    from backend.nn.vae import IntegratedAutoencoderKL

    torch.manual_seed(seed)
    config = IntegratedAutoencoderKL.load_config(config_dir)
    model = IntegratedAutoencoderKL.from_config(config)  # plain torch init under the seed
    sd = {"first_stage_model." + k: v.detach().to(torch.float16).contiguous()
          for k, v in model.state_dict().items()}
    del model
    return sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forge-dir", required=True, help="Forge checkout (for its bundled configs and classes)")
    ap.add_argument("--out", help=f"output file (default <forge>/models/Stable-diffusion/{DEFAULT_NAME})")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = ap.parse_args(argv)

    forge_dir = _import_forge(args.forge_dir)
    out = args.out or os.path.join(forge_dir, "models", "Stable-diffusion", DEFAULT_NAME)
    if os.path.exists(out) and not args.force:
        print(f"exists, keeping it (use --force to rebuild): {out}")
        return 0

    import torch
    from safetensors.torch import save_file

    repo = os.path.join(forge_dir, SD3_REPO)
    t0 = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    sd = {}
    sd.update(build_mmdit(gen))
    sd.update(build_clip(os.path.join(repo, "text_encoder"), "text_encoders.clip_l.transformer.", args.seed + 1))
    sd.update(build_clip(os.path.join(repo, "text_encoder_2"), "text_encoders.clip_g.transformer.", args.seed + 2))
    sd.update(build_t5_norms(os.path.join(repo, "text_encoder_3", "config.json"), "text_encoders.t5xxl.transformer."))
    sd.update(build_vae(os.path.join(repo, "vae"), args.seed + 3))

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".part"
    save_file(sd, tmp, metadata={"format": "pt", "vsf_tiny_sd3_seed": str(args.seed)})
    os.replace(tmp, out)
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {out}: {len(sd)} tensors, {n / 1e6:.1f}M params, {os.path.getsize(out) / 2**20:.0f} MiB, "
          f"{time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
