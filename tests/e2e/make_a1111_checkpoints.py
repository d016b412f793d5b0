"""Build random-weight SD1.5, SDXL and SD3 checkpoints that AUTOMATIC1111 1.10 loads, for the opt-in e2e tests.

Run with the A1111 venv's python, with the offline cache from make_a1111_hf_cache.py:

    HF_HOME=<hf> HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        <venv>/bin/python tests/e2e/make_a1111_checkpoints.py --webui <a1111 checkout> --family sd15|sdxl|sd3

Writes `<webui>/models/Stable-diffusion/vsf-tiny-<family>.safetensors` (fp16; override with --out). Every
model is built from the host's own model classes, so the tensor names are exactly the ones A1111 loads:

* sd15: `configs/v1-inference.yaml` with the ldm classes from `repositories/stable-diffusion-stability-ai`,
  full size (UNet 860M, CLIP-L text 123M, VAE 84M; about 2.1 GB). A1111 detects SD1.5 from the tensors.
* sdxl: `repositories/generative-models/configs/inference/sd_xl_base.yaml` with a narrow UNet (64 channels,
  two levels, one transformer block each); CLIP-L, OpenCLIP bigG and the VAE stay full size (A1111 builds
  them from the config and needs every tensor). The modified config is written next to the checkpoint
  (`vsf-tiny-sdxl.yaml`), which is how A1111 picks a config for a checkpoint it cannot classify itself.
* sd3: A1111's own `modules/models/sd3` classes. A1111 sizes the MMDiT from the tensors (depth =
  x_embedder width / 64), so depth 2 (hidden 128); CLIP-L, CLIP-G and the SD3 VAE full size; no T5 (A1111's
  `sd3_enable_t5` option is off by default and then T5 is never built).

Weights: each library's own initialisation under a fixed seed, then two fixes so guidance reaches the pixels:
layers the ldm/sgm code zero-initialises (`zero_module`: attention and residual outputs) get their default
init again (else cross-attention, and so the negative prompt, has no effect at all), and the MMDiT, whose
reference code leaves many tensors to `torch.empty`, is drawn as N(0, 1/fan_in) with a sin-cos position table.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("sd15", "sdxl", "sd3")
SDXL_UNET = {"model_channels": 64, "channel_mult": [1, 2], "attention_resolutions": [1, 2],
             "num_res_blocks": 1, "num_head_channels": 32, "transformer_depth": [1, 1], "use_checkpoint": False}
MMDIT_DEPTH = 2
MMDIT_POS_EMBED_MAX = 16  # up to 16x16 patches: 256x256 pixels


def _paths(webui: str) -> None:
    repos = os.path.join(webui, "repositories")
    for p in (webui, os.path.join(repos, "stable-diffusion-stability-ai"), os.path.join(repos, "generative-models"),
              os.path.join(repos, "k-diffusion")):
        if p not in sys.path:
            sys.path.insert(0, p)


@contextlib.contextmanager
def _no_pretrained_downloads():
    """The encoders call `from_pretrained`/`create_model_and_transforms(pretrained=...)`: build from config."""
    import open_clip
    import transformers

    saved_clip = transformers.CLIPTextModel.from_pretrained
    saved_oc = open_clip.create_model_and_transforms

    def clip_from_config(name, *args, **kwargs):
        return transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(name))

    def open_clip_without_weights(*args, pretrained=None, **kwargs):
        return saved_oc(*args, pretrained=None, **kwargs)

    transformers.CLIPTextModel.from_pretrained = clip_from_config
    open_clip.create_model_and_transforms = open_clip_without_weights
    try:
        yield
    finally:
        transformers.CLIPTextModel.from_pretrained = saved_clip
        open_clip.create_model_and_transforms = saved_oc


def _reinit_zeroed(model) -> int:
    """Give layers that the model code zero-initialised their default init again."""
    import torch

    n = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) \
                and weight is not None and not weight.detach().any():
            module.reset_parameters()
            n += 1
    return n


def _to_fp16(state: dict, keep_fp32=lambda name: False) -> dict:
    import torch

    out = {}
    for name, t in state.items():
        t = t.detach()
        if t.is_floating_point() and not keep_fp32(name):
            t = t.to(torch.float16)
        out[name] = t.contiguous().clone()
    return out


def build_sd15(webui: str, seed: int):
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    config = OmegaConf.load(os.path.join(webui, "configs", "v1-inference.yaml"))
    torch.manual_seed(seed)
    with _no_pretrained_downloads():
        model = instantiate_from_config(config.model)
    print(f"  re-initialised {_reinit_zeroed(model)} zero-initialised layers")
    # top-level schedule buffers (betas, alphas_cumprod, ...) stay float32 as in released checkpoints
    return _to_fp16(model.state_dict(), keep_fp32=lambda name: "." not in name), None


def build_sdxl(webui: str, seed: int):
    import torch
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    base = os.path.join(webui, "repositories", "generative-models", "configs", "inference", "sd_xl_base.yaml")
    config = OmegaConf.load(base)
    for key, value in SDXL_UNET.items():
        config.model.params.network_config.params[key] = value
    torch.manual_seed(seed)
    with _no_pretrained_downloads():
        model = instantiate_from_config(config.model)
    print(f"  re-initialised {_reinit_zeroed(model)} zero-initialised layers")
    return _to_fp16(model.state_dict(), keep_fp32=lambda name: "." not in name), OmegaConf.to_yaml(config)


def _sd3_modules(webui: str):
    """A1111's sd3 code pulls in modules.shared (cmd_opts parsed from sys.argv at import) and, through
    sd_hijack, most of the WebUI, whose modules import each other in a cycle that only resolves in the order
    the WebUI itself uses: run A1111's own `initialize.imports()` first, with CPU flags."""
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = [saved_argv[0], "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full",
                "--skip-prepare-environment", "--skip-version-check", "--skip-python-version-check"]
    os.chdir(webui)
    try:
        from modules import initialize

        initialize.imports()
        from modules.models.sd3 import mmdit, other_impls, sd3_cond, sd3_impls
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return mmdit, other_impls, sd3_cond, sd3_impls


def build_sd3(webui: str, seed: int):
    import torch

    sys.path.insert(0, HERE)
    from make_tiny_sd3_checkpoint import _sincos_pos_embed  # the project's SD3 position table

    mmdit, other_impls, sd3_cond, sd3_impls = _sd3_modules(webui)
    hidden = 64 * MMDIT_DEPTH
    num_patches = MMDIT_POS_EMBED_MAX ** 2
    # SD3 context: CLIP-L|G padded to 4096 (T5's width); pooled: 768 + 1280
    net = mmdit.MMDiT(input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None,
                      pos_embed_max_size=MMDIT_POS_EMBED_MAX, patch_size=2, in_channels=16, depth=MMDIT_DEPTH,
                      num_patches=num_patches, adm_in_channels=2048,
                      context_embedder_config={"target": "torch.nn.Linear",
                                               "params": {"in_features": 4096, "out_features": hidden}},
                      device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in net.state_dict().items():
        if name == "pos_embed":
            v = _sincos_pos_embed(num_patches, hidden)
        elif t.ndim >= 2:
            v = torch.randn(t.shape, generator=gen) / math.sqrt(t[0].numel())
        else:
            v = 0.02 * torch.randn(t.shape, generator=gen)
        sd["model.diffusion_model." + name] = v
    del net
    torch.manual_seed(seed + 1)
    clip_l = other_impls.SDClipModel(layer="hidden", layer_idx=-2, device="cpu", dtype=torch.float32,
                                     layer_norm_hidden_state=False, return_projected_pooled=False,
                                     textmodel_json_config=sd3_cond.CLIPL_CONFIG)
    sd.update({"text_encoders.clip_l." + k: v for k, v in clip_l.state_dict().items()})
    del clip_l
    torch.manual_seed(seed + 2)
    clip_g = other_impls.SDXLClipG(sd3_cond.CLIPG_CONFIG, device="cpu", dtype=torch.float32)
    sd.update({"text_encoders.clip_g." + k: v for k, v in clip_g.state_dict().items()})
    del clip_g
    torch.manual_seed(seed + 3)
    vae = sd3_impls.SDVAE(device="cpu", dtype=torch.float32)
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"uninitialised tensors: {bad[:5]}"
    return _to_fp16(sd), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--webui", required=True, help="A1111 checkout (with repositories/)")
    ap.add_argument("--family", required=True, choices=FAMILIES)
    ap.add_argument("--out", help="output file (default <webui>/models/Stable-diffusion/vsf-tiny-<family>.safetensors)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = ap.parse_args(argv)

    webui = os.path.abspath(args.webui)
    out = args.out or os.path.join(webui, "models", "Stable-diffusion", f"vsf-tiny-{args.family}.safetensors")
    if os.path.exists(out) and not args.force:
        print(f"exists, keeping it (use --force to rebuild): {out}")
        return 0
    _paths(webui)
    import torch
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    t0 = time.time()
    state, yaml_text = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3}[args.family](webui, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if yaml_text is not None:
        with open(os.path.splitext(out)[0] + ".yaml", "w") as f:
            f.write(yaml_text)
    tmp = out + ".part"
    save_file(state, tmp, metadata={"format": "pt", "vsf_tiny_seed": str(args.seed), "vsf_family": args.family})
    os.replace(tmp, out)
    n = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {len(state)} tensors, {n / 1e6:.1f}M params, {os.path.getsize(out) / 2**20:.0f} MiB, "
          f"{time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
