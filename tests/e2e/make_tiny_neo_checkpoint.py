"""Random-weight single-file checkpoints that Forge Neo loads, for the opt-in e2e tests.

    python make_tiny_neo_checkpoint.py --neo-dir NEO --family {sd15,sdxl,flux,chroma,wan,zimage,flux2}
                                       [--out FILE] [--seed N]

Run it with Neo's own python (its venv): the tensor names and shapes come from Neo's own model classes,
built on the meta device, so what is written is exactly what Neo's loader expects. Values are random
(deterministic for a seed): matrices N(0, 1/fan_in), 1-D weights/scales 1, biases 0 — no zero-initialised
output layer, so cross-attention (and with it the negative prompt) changes the image.

What Neo's detection fixes, and so what each family costs on disk:
  sd15    the whole UNet at full size (detection matches SD1.5 by its exact UNet config), CLIP-L, VAE (fp16): 2.1 GB
  sdxl    detection matches SDXL on model_channels 320, transformer_depth [0, 0, 2, 2, 10, 10] (the input
          blocks), context 2048, ADM 2816 and linear proj_in only, and reads the rest from the tensors: so
          channel_mult [1, 1, 1] (every level 320 wide), one transformer per output block and in the
          middle; full CLIP-L and CLIP-bigG (open_clip names, as in SDXL checkpoints; Neo converts them)
          and the SDXL VAE (fp16): about 2 GB
  flux    transformer hidden 256 (2 heads, 1 double + 1 single block; Neo sizes it from the tensors, and
          looks for BFL names such as `key_norm.scale`), full CLIP-L, full T5-XXL stored in fp8 (its bundled
          config fixes the size), full Flux VAE: about 5.1 GB
  chroma  transformer hidden 3072 (detection fixes it through the approximator), 1 double + 1 single block,
          full T5-XXL (fp8) and VAE: about 6.4 GB
  wan     Wan 2.1 T2V transformer dim 256 (2 heads, ffn 512, 1 block), full UMT5-XXL (fp8), full Wan VAE:
          about 6.1 GB
  zimage  Z-Image (Turbo) NextDiT: detection matches dim 3840 exactly (30 heads fixed) and counts the layers,
          the 2 noise and 2 context refiners are NextDiT's default: 1 layer + refiners, 909M parameters
          (bf16, with the caption pad token that makes it Z-Image and not Lumina 2); full Qwen3-4B text
          encoder (fp8, its bundled config fixes the size), Flux VAE: about 6.0 GB
  flux2   Flux.2 Klein 4B: detection matches hidden size 3072 (24 heads; 4096 would be Klein 9B) and counts
          the blocks: 1 double + 1 single block, 563M parameters (bf16); full Qwen3-4B (fp8), the Flux.2 VAE
          (32 latent channels): about 5.3 GB
Default output: <neo>/models/Stable-diffusion/vsf-tiny-<family>.safetensors.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _neo_imports(neo_dir: str):
    """Make Neo's `backend` importable as its launcher does (its args parser reads sys.argv at import)."""
    sys.argv = [sys.argv[0], "--cpu"]
    for path in (os.path.join(neo_dir, "modules_forge", "packages"), neo_dir):
        if path not in sys.path:
            sys.path.insert(0, path)


class RandomTensors:
    """Deterministic random values for a state dict taken from a module built on the meta device."""

    def __init__(self, seed: int):
        import torch

        self.torch = torch
        self.generator = torch.Generator().manual_seed(seed)

    def value(self, name: str, shape: tuple[int, ...], dtype):
        torch = self.torch
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=self.generator) / fan_in ** 0.5
        elif name.endswith(("weight", "scale", "gamma")):
            t = torch.ones(shape)
        else:
            t = torch.zeros(shape)
        return t.to(dtype).contiguous()

    def module(self, build, prefix: str, dtype, skip=(), small_1d_dtype=None, rename=None) -> dict:
        torch = self.torch
        with torch.device("meta"):
            module = build()
        out = {}
        for name, meta in module.state_dict().items():
            if any(s in name for s in skip):
                continue
            key = rename(module, name) if rename else name
            t_dtype = small_1d_dtype if (small_1d_dtype is not None and meta.dim() < 2) else dtype
            out[prefix + key] = self.value(name, tuple(meta.shape), t_dtype)
        del module
        return out


def _bfl_norm_names(module, name: str) -> str:
    """BFL-format Flux/Chroma checkpoints name RMSNorm parameters `.scale` (Neo maps them back on load)."""
    import torch

    owner, _, leaf = name.rpartition(".")
    if leaf == "weight":
        sub = module.get_submodule(owner) if owner else module
        if isinstance(sub, torch.nn.RMSNorm) or type(sub).__name__ == "RMSNorm":
            return owner + ".scale"
    return name


def build_sd15(neo: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    hf = os.path.join(neo, "backend", "huggingface", "runwayml", "stable-diffusion-v1-5")
    unet = dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                use_linear_in_transformer=False, adm_in_channels=None)
    sd = rnd.module(lambda: IntegratedUNet2DConditionModel(**unet), "model.diffusion_model.", torch.float16)
    vae_cfg = IntegratedAutoencoderKL.load_config(os.path.join(hf, "vae"))
    sd.update(rnd.module(lambda: IntegratedAutoencoderKL.from_config(vae_cfg), "first_stage_model.", torch.float16))
    clip_cfg = CLIPTextConfig.from_pretrained(os.path.join(hf, "text_encoder"))
    sd.update(rnd.module(lambda: CLIPTextModel(clip_cfg), "cond_stage_model.transformer.", torch.float16,
                         skip=("position_ids",)))
    return sd


def _open_clip_names(hf: dict, layers: int) -> dict:
    """A transformers CLIPTextModelWithProjection state dict under open_clip's names, the layout SDXL
    checkpoints store CLIP-bigG in (`conditioner.embedders.1.model.`): the inverse of Neo's
    `clip_text_transformers_convert` (q/k/v joined into in_proj, text_projection transposed)."""
    import torch

    t = "text_model."
    out = {"token_embedding.weight": hf[t + "embeddings.token_embedding.weight"],
           "positional_embedding": hf[t + "embeddings.position_embedding.weight"],
           "ln_final.weight": hf[t + "final_layer_norm.weight"], "ln_final.bias": hf[t + "final_layer_norm.bias"],
           "text_projection": hf["text_projection.weight"].t().contiguous()}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers):
        src, dst = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{b}.{leaf}"] = hf[f"{src}{a}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [hf[f"{src}self_attn.{q}_proj.{leaf}"] for q in ("q", "k", "v")]).contiguous()
    return out


def build_sdxl(neo: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hf = os.path.join(neo, "backend", "huggingface", "stabilityai", "stable-diffusion-xl-base-1.0")
    # transformer_depth (input blocks), model_channels, context_dim, adm_in_channels and
    # use_linear_in_transformer are what detection compares with SDXL's; channel widths, the output
    # blocks' and the middle block's depth are read from the tensors, so they stay small.
    unet = dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                context_dim=2048, num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
                use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816)
    sd = rnd.module(lambda: IntegratedUNet2DConditionModel(**unet), "model.diffusion_model.", torch.float16)
    vae_cfg = IntegratedAutoencoderKL.load_config(os.path.join(hf, "vae"))
    sd.update(rnd.module(lambda: IntegratedAutoencoderKL.from_config(vae_cfg), "first_stage_model.", torch.float16))
    clip_l = CLIPTextConfig.from_pretrained(os.path.join(hf, "text_encoder"))
    sd.update(rnd.module(lambda: CLIPTextModel(clip_l), "conditioner.embedders.0.transformer.", torch.float16,
                         skip=("position_ids",)))
    clip_g = CLIPTextConfig.from_pretrained(os.path.join(hf, "text_encoder_2"))
    g = rnd.module(lambda: CLIPTextModelWithProjection(clip_g), "", torch.float16, skip=("position_ids",))
    sd.update({"conditioner.embedders.1.model." + k: v
               for k, v in _open_clip_names(g, clip_g.num_hidden_layers).items()})
    return sd


def _t5(neo_hf_dir: str, prefix: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.t5 import IntegratedT5
    from backend.utils import read_arbitrary_config

    cfg = read_arbitrary_config(neo_hf_dir)
    # fp8 for the matrices (Neo casts on use); the few 1-D tensors in fp16
    return rnd.module(lambda: IntegratedT5(cfg), prefix, torch.float8_e4m3fn, skip=("logit_scale",),
                      small_1d_dtype=torch.float16)


def build_flux(neo: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    hf = os.path.join(neo, "backend", "huggingface", "black-forest-labs", "FLUX.1-dev")
    cfg = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=256,
               mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
               patch_size=2, qkv_bias=True, guidance_embed=True)
    sd = rnd.module(lambda: IntegratedFluxTransformer2DModel(**cfg), "model.diffusion_model.", torch.bfloat16,
                    rename=_bfl_norm_names)
    clip_cfg = CLIPTextConfig.from_pretrained(os.path.join(hf, "text_encoder"))
    sd.update(rnd.module(lambda: CLIPTextModel(clip_cfg), "text_encoders.clip_l.transformer.", torch.float16,
                         skip=("position_ids",)))
    vae_cfg = IntegratedAutoencoderKL.load_config(os.path.join(hf, "vae"))
    sd.update(rnd.module(lambda: IntegratedAutoencoderKL.from_config(vae_cfg), "vae.", torch.float16))
    sd.update(_t5(os.path.join(hf, "text_encoder_2"), "text_encoders.t5xxl.", rnd))
    return sd


def _neo_unet_config(skeleton: dict, prefix: str) -> dict:
    """The config Neo's loader builds the diffusion model with, for a checkpoint with these keys and
    shapes: what its detection fixes (`huggingface_guess`), the rest counted from the names."""
    from huggingface_guess.detection import model_config_from_unet

    cfg = dict(model_config_from_unet(skeleton, prefix).unet_config)
    cfg.pop("image_model", None)  # as huggingface_guess.guess() does
    return cfg


def build_chroma(neo: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.nn.vae import IntegratedAutoencoderKL

    # Let Neo's own detection say which config a Chroma checkpoint of this shape gets (hidden 3072 is
    # fixed by the approximator; depth 1 + 1 from the block names).
    p = "model.diffusion_model."
    skeleton = {p + "img_in.weight": torch.empty(3072, 64), p + "txt_in.weight": torch.empty(3072, 4096),
                p + "double_blocks.0.img_attn.norm.key_norm.scale": torch.empty(128),
                p + "single_blocks.0.linear1.weight": torch.empty(1, 1),
                p + "distilled_guidance_layer.norms.0.scale": torch.empty(5120)}
    cfg = _neo_unet_config(skeleton, p)
    sd = rnd.module(lambda: IntegratedChromaTransformer2DModel(**cfg), p, torch.bfloat16, rename=_bfl_norm_names)
    hf = os.path.join(neo, "backend", "huggingface", "Chroma")
    vae_cfg = IntegratedAutoencoderKL.load_config(os.path.join(hf, "vae"))
    sd.update(rnd.module(lambda: IntegratedAutoencoderKL.from_config(vae_cfg), "vae.", torch.float16))
    sd.update(_t5(os.path.join(hf, "text_encoder"), "text_encoders.t5xxl.", rnd))
    return sd


def build_wan(neo: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.wan import WanModel
    from backend.nn.wan_vae import WanVAE

    hf = os.path.join(neo, "backend", "huggingface", "Wan-AI", "Wan2.1-T2V-14B")
    sd = rnd.module(lambda: WanModel(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=1,
                                     in_dim=16, out_dim=16), "model.diffusion_model.", torch.bfloat16)
    # the (1, 6, dim) modulation tables are added to the time embedding, not multiplied by an input:
    # small values keep the tiny model's activations in range
    for key in [k for k in sd if k.endswith("modulation")]:
        sd[key] = (torch.randn(sd[key].shape, generator=rnd.generator) * 0.02).to(torch.bfloat16)
    vae_cfg = WanVAE.load_config(os.path.join(hf, "vae"))
    sd.update(rnd.module(lambda: WanVAE.from_config(vae_cfg), "vae.", torch.float16))
    sd.update(_t5(os.path.join(hf, "text_encoder"), "text_encoders.umt5xxl.", rnd))
    return sd


def _qwen3_4b(neo_hf_dir: str, prefix: str, rnd: RandomTensors) -> dict:
    """Qwen3-4B (Z-Image's and Klein 4B's text encoder) at the size its bundled config fixes; fp8 matrices
    and fp16 1-D tensors as `_t5`. Neo's Llama layers pass `add=` to RMSNorm, which only Neo's own RMSNorm
    takes: it stands in for torch's while the model is built (not the rest of Neo's operations, whose Linear
    has no weight until one is loaded)."""
    import torch
    from backend.nn.llm.llama import Qwen3_4B
    from backend.operations import ForgeOperations
    from backend.utils import read_arbitrary_config

    cfg = read_arbitrary_config(neo_hf_dir)

    def build():
        plain, torch.nn.RMSNorm = torch.nn.RMSNorm, ForgeOperations.RMSNorm
        try:
            return Qwen3_4B(cfg)
        finally:
            torch.nn.RMSNorm = plain

    return rnd.module(build, prefix, torch.float8_e4m3fn, small_1d_dtype=torch.float16)


def build_zimage(neo: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.lumina import NextDiT
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.utils import read_arbitrary_config

    hf = os.path.join(neo, "backend", "huggingface", "Tongyi-MAI", "Z-Image-Turbo")
    dit = read_arbitrary_config(os.path.join(hf, "transformer"))
    p = "model.diffusion_model."
    # dim and caption width fixed; one unified layer; the caption pad token makes it Z-Image
    skeleton = {p + "cap_embedder.1.weight": torch.empty(dit["dim"], dit["cap_feat_dim"]),
                p + "layers.0.attention_norm1.weight": torch.empty(dit["dim"]),
                p + "cap_pad_token": torch.empty(1, dit["dim"])}
    cfg = _neo_unet_config(skeleton, p)
    sd = rnd.module(lambda: NextDiT(**cfg), p, torch.bfloat16)
    vae_cfg = IntegratedAutoencoderKL.load_config(os.path.join(hf, "vae"))
    sd.update(rnd.module(lambda: IntegratedAutoencoderKL.from_config(vae_cfg), "vae.", torch.float16))
    sd.update(_qwen3_4b(os.path.join(hf, "text_encoder"), "text_encoders.qwen3_4b.transformer.", rnd))
    return sd


def build_flux2(neo: str, rnd: RandomTensors) -> dict:
    import torch
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.vae import AutoencoderKLFlux2
    from backend.utils import read_arbitrary_config

    hf = os.path.join(neo, "backend", "huggingface", "black-forest-labs", "FLUX.2-klein-4B")
    dit = read_arbitrary_config(os.path.join(hf, "transformer"))
    p = "model.diffusion_model."
    # BFL names; the global modulation makes it Flux.2; hidden 3072 (Klein 4B), 1 double + 1 single block
    hidden = dit["num_attention_heads"] * dit["attention_head_dim"]
    skeleton = {p + "img_in.weight": torch.empty(hidden, dit["in_channels"]),
                p + "txt_in.weight": torch.empty(hidden, dit["joint_attention_dim"]),
                p + "double_blocks.0.img_attn.norm.key_norm.scale": torch.empty(dit["attention_head_dim"]),
                p + "double_stream_modulation_img.lin.weight": torch.empty(6 * hidden, hidden),
                p + "single_blocks.0.linear1.weight": torch.empty(1, 1)}
    cfg = _neo_unet_config(skeleton, p)
    sd = rnd.module(lambda: IntegratedFluxTransformer2DModel(**cfg), p, torch.bfloat16, rename=_bfl_norm_names)
    vae_cfg = AutoencoderKLFlux2.load_config(os.path.join(hf, "vae"))
    sd.update(rnd.module(lambda: AutoencoderKLFlux2.from_config(vae_cfg), "vae.", torch.float16))
    # the latent batch norm's statistics: unit variance, and its step counter an integer as torch keeps it
    sd["vae.bn.running_var"] = torch.ones_like(sd["vae.bn.running_var"])
    sd["vae.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    sd.update(_qwen3_4b(os.path.join(hf, "text_encoder"), "text_encoders.qwen3_4b.transformer.", rnd))
    return sd


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "flux": build_flux, "chroma": build_chroma, "wan": build_wan,
            "zimage": build_zimage, "flux2": build_flux2}
# the class Neo's detection (huggingface_guess.model_list) must pick for each family's checkpoint
DETECTED = {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux", "chroma": "Chroma", "wan": "WAN21_T2V",
            "zimage": "ZImage", "flux2": "Flux2K4B"}
SEEDS = {"sd15": 1234, "sdxl": 2468, "flux": 4321, "chroma": 99, "wan": 777, "zimage": 3840, "flux2": 3072}


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float8_e4m3fn": "F8_E4M3",
                       "int64": "I64"}


def save_safetensors(sd: dict, path: str) -> None:
    """What `safetensors.torch.save_file` writes, without its in-memory copy of every tensor (it builds the
    bytes of the whole file first, doubling the peak): the header, then each tensor from its own storage."""
    import json

    import torch

    header, offset = {}, 0
    for name, t in sd.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in sd.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neo-dir", required=True)
    ap.add_argument("--family", required=True, choices=sorted(BUILDERS))
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int)
    args = ap.parse_args()
    neo = os.path.abspath(args.neo_dir)
    out = args.out or os.path.join(neo, "models", "Stable-diffusion", f"vsf-tiny-{args.family}.safetensors")
    _neo_imports(neo)

    import huggingface_guess

    t0 = time.time()
    rnd = RandomTensors(args.seed if args.seed is not None else SEEDS[args.family])
    sd = BUILDERS[args.family](neo, rnd)
    try:
        detected = type(huggingface_guess.guess(dict(sd))).__name__
    except AttributeError:  # guess() dereferences the None that "no match" gives
        detected = "no model (no match)"
    print(f"{args.family}: {len(sd)} tensors; Neo detects {detected}", flush=True)
    if detected != DETECTED[args.family]:
        print(f"Neo's detection picks {detected}, not {DETECTED[args.family]}: nothing written", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".partial"
    save_safetensors(sd, tmp)
    os.replace(tmp, out)
    print(f"saved {out} ({os.path.getsize(out) / 1e9:.2f} GB, {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
