"""Import a WebUI host's model code from a local checkout, for the real-host tests.

The tests skip unless `VSF_NEO_DIR` (Forge Neo, `neo` branch), `VSF_REFORGE_DIR` (reForge),
`VSF_FORGE_DIR` (Forge), `VSF_A1111_DIR` (AUTOMATIC1111) or `VSF_A1111_REPOS_DIR` (A1111's
`repositories/`) point at a checkout. Forge and Forge Neo both own a top-level `backend`
package, so `host_modules()` swaps the host's modules in and out of `sys.modules`: every test file runs
alone or together with the others in one pytest process. Nothing here is host code.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

# Top-level packages that belong to a host (and clash between Forge and Forge Neo).
HOST_PACKAGES = ("backend", "modules", "modules_forge", "ldm_patched", "huggingface_guess", "gguf", "packages_3rdparty",
                 "ldm", "sgm")

HOSTS = {
    # env var, extra sys.path entries (relative to the root), argv the host's arg parser needs on CPU
    "neo": ("VSF_NEO_DIR", ("modules_forge/packages",), ["--cpu", "--use-pytorch-cross-attention"]),
    "forge": ("VSF_FORGE_DIR", ("packages_3rdparty",), ["--always-cpu"]),
    "reforge": ("VSF_REFORGE_DIR", (), ["--always-cpu", "--attention-pytorch"]),
    # AUTOMATIC1111's own model files (`modules/models/sd3/`); argv is what `modules.devices` needs on CPU
    "a1111": ("VSF_A1111_DIR", (), ["--use-cpu", "all", "--no-half", "--precision", "full", "--skip-torch-cuda-test"]),
    # A1111's `repositories/` folder: Stability-AI/stablediffusion (ldm) and generative-models (sgm) at the
    # commits A1111 pins; only their model code is imported (no WebUI).
    "a1111-repos": ("VSF_A1111_REPOS_DIR", ("stable-diffusion-stability-ai", "generative-models"), []),
}


def host_root(host: str) -> str:
    """The checkout of `host` named by its environment variable, or skip the calling test."""
    env, _, _ = HOSTS[host]
    root = os.environ.get(env)
    if not root or not os.path.isdir(root):
        pytest.skip(f"{env} does not point at a {host} checkout")
    return os.path.abspath(root)


def _sgm_namespace(root: str) -> None:
    """`sgm/__init__.py` and two sub-package inits import training code (pytorch_lightning, omegaconf);
    A1111 only uses the model files. Register those packages without running their `__init__`."""
    import types

    for name in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, *name.split("."))]
        sys.modules[name] = package


def _omegaconf_stand_in() -> None:
    """ldm's and sgm's UNet constructors only test `isinstance(x, omegaconf.ListConfig)`; without
    omegaconf installed, a stand-in class (never matched) is enough. Removed on exit."""
    import importlib.util
    import types

    if importlib.util.find_spec("omegaconf") is not None:
        return
    root, listconfig = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.listconfig")
    listconfig.ListConfig = root.ListConfig = type("ListConfig", (), {})
    root.__path__, root.listconfig = [], listconfig
    for module in (root, listconfig):
        module.__vsf_stub__ = True
        sys.modules[module.__name__] = module


class _A1111SdHijackStandIn(__import__("types").ModuleType):
    """Stands in for A1111's `modules.sd_hijack`, which imports the whole WebUI (gradio, fastapi,
    torchvision, open_clip, the model loader). `modules/models/sd3/other_impls.py` imports it only for
    `sd_hijack.TextualInversionEmbeddings` inside its CLIP text-model classes, which the real-host tests
    never build: any attribute access says so instead of failing somewhere deeper."""

    __vsf_stub__ = True

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"modules.sd_hijack is a test stand-in (the real one needs the whole WebUI): no {name!r}")


def _a1111_stand_ins(argv) -> None:
    """The two A1111 modules the SD3 model files reach that cannot load without the WebUI, replaced by
    the least that the code under test reads. Both are marked `__vsf_stub__` and removed on exit.
    - `modules.shared` (imports gradio and builds every option at import): `cmd_opts` parsed by
      A1111's own parser (`modules/cmd_args.py`) from the CPU `argv` above, which `modules.devices`
      reads at import (`use_ipex`, `use_cpu`, `device_id`, ...); `opts` with the two fields the adapter
      reads, `data` (it writes `skip_early_cond` there) and `sd3_enable_t5`.
    - `modules.sd_hijack`: see `_A1111SdHijackStandIn`."""
    import types

    import modules  # type: ignore[import-not-found]  # A1111's namespace package
    from modules import cmd_args  # type: ignore[import-not-found]

    shared = types.ModuleType("modules.shared")
    shared.__vsf_stub__ = True
    shared.cmd_opts = cmd_args.parser.parse_args(argv)
    shared.opts = types.SimpleNamespace(data={"skip_early_cond": 0.0}, sd3_enable_t5=False)
    sd_hijack = _A1111SdHijackStandIn("modules.sd_hijack")
    modules.shared, modules.sd_hijack = shared, sd_hijack
    sys.modules["modules.shared"], sys.modules["modules.sd_hijack"] = shared, sd_hijack


def _is_host_module(name: str) -> bool:
    return name.split(".", 1)[0] in HOST_PACKAGES


@contextlib.contextmanager
def host_modules(host: str):
    """Make `host`'s packages importable for the duration: other hosts' modules are set aside and put
    back afterwards, together with `sys.path` and `sys.argv`."""
    root = host_root(host)
    _, extra, argv = HOSTS[host]
    saved_modules = {n: m for n, m in sys.modules.items() if _is_host_module(n)}
    for name in saved_modules:
        del sys.modules[name]
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    sys.path[:0] = [root] + [os.path.join(root, e) for e in extra]
    if host == "a1111-repos":
        _sgm_namespace(os.path.join(root, "generative-models"))
        _omegaconf_stand_in()
    sys.argv = [saved_argv[0] if saved_argv else "pytest", *argv]
    try:
        if host == "reforge":
            from ldm_patched.modules import args_parser  # type: ignore[import-not-found]
            args_parser.args, _ = args_parser.parser.parse_known_args()
        if host == "a1111":
            _a1111_stand_ins(argv)
        yield root
    finally:
        for name in [n for n in sys.modules if _is_host_module(n) or _is_stub(n)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        sys.argv = saved_argv


def import_host(name: str):
    """`importlib.import_module`, turning a missing optional dependency into a skip."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        pytest.skip(f"host module {name} needs {exc.name} (pip install it to run this test)")


def _is_stub(name: str) -> bool:
    return getattr(sys.modules.get(name), "__vsf_stub__", False)


def stub_webui_shared() -> None:
    """Neo's `backend/sampling/condition.py` imports `modules.shared` (the WebUI settings, which pull in
    gradio) without using it: give it an empty stand-in when the real one cannot load. `host_modules()`
    removes it again on exit."""
    import types

    try:
        importlib.import_module("modules.shared")
    except Exception:  # noqa: BLE001 - gradio missing: not needed by the model code under test
        for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
            del sys.modules[name]
        package = types.ModuleType("modules")
        package.__path__ = []
        package.shared = types.ModuleType("modules.shared")
        sys.modules["modules"], sys.modules["modules.shared"] = package, package.shared


@contextlib.contextmanager
def shared_opts(**opts):
    """A stand-in `modules.shared` whose only content is `opts` with the given fields (the host's
    text engines read e.g. `opts.emphasis`; the real module needs the whole WebUI and gradio). The
    host's own `modules` package stays importable when there is one (Neo's `backend/stream.py` imports
    `modules.devices`). The previous `modules` / `modules.shared` entries are put back on exit."""
    import types

    saved = {n: sys.modules.get(n) for n in ("modules", "modules.shared")}
    try:
        modules = importlib.import_module("modules")
    except ImportError:
        modules = types.ModuleType("modules")
        modules.__path__ = []
    saved_attribute = modules.__dict__.get("shared")
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace(**opts)
    shared.__vsf_stub__ = True
    modules.shared = shared
    sys.modules.update({"modules": modules, "modules.shared": shared})
    try:
        yield shared.opts
    finally:
        if saved_attribute is None:
            modules.__dict__.pop("shared", None)
        else:
            modules.shared = saved_attribute
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def init_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Deterministic weights for a tiny host model. Hosts leave some parameters uninitialised
    (`torch.empty` modulation tensors, `disable_weight_init` ops): norm scales get 1 + noise, the rest
    small noise, so activations stay O(1) and no NaN/garbage memory is ever read."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            is_norm_scale = param.ndim == 1 and any(s in name for s in ("norm", "scale", "ln_")) and "bias" not in name
            param.copy_((1.0 + noise) if is_norm_scale else noise)
        for name, buf in model.named_buffers():  # e.g. a position table allocated with torch.empty
            if buf.is_floating_point() and not (torch.isfinite(buf).all() and buf.abs().max() < 1e3):
                buf.copy_(torch.randn(buf.shape, generator=gen) * std)
    return model.eval()


def git_commit(root: str) -> str:
    """The checkout's HEAD commit (for test reports), or "unknown"."""
    head = os.path.join(root, ".git", "HEAD")
    try:
        ref = open(head).read().strip()
        if ref.startswith("ref: "):
            path = os.path.join(root, ".git", ref[5:])
            if os.path.exists(path):
                return open(path).read().strip()
            packed = os.path.join(root, ".git", "packed-refs")
            for line in open(packed):
                if line.strip().endswith(ref[5:]):
                    return line.split()[0]
        return ref
    except OSError:
        return "unknown"


# -- guidance state as the runner sets it up -------------------------------------------------------------

def negative_rows(lengths, width: int, seed: int = 1):
    """`NegativeText` with one row per sample of the given token counts (0 = empty prompt)."""
    from lib_vsf.state import NegativeText

    gen = torch.Generator().manual_seed(seed)
    return NegativeText.from_sequences([torch.randn(n, width, generator=gen) for n in lengths])


def make_run(positive_len: int, negative, alpha: float = 3.3, beta: float = 0.2, guidance=None):
    """A `GuidanceRun` at step 0 of 4 holding the text stream `[P (positive_len), negative]`.
    `guidance` overrides the settings at attention level (e.g. beta = inf, which settings refuse)."""
    from lib_vsf.settings import VSFSettings
    from lib_vsf.state import GuidanceRun

    run = GuidanceRun(VSFSettings(alpha=alpha, beta=beta))
    run.set_step(0, 4)
    run.set_text(positive_len, negative)
    if guidance is not None:
        run.guidance = lambda: guidance  # instance attribute shadows the method
    return run


def heads_first(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """`[B, L, H*D]` -> `[B, H, L, D]` (identity when the host already passes `[B, H, L, D]`)."""
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # also takes [B, L, H, D]


def heads_last(t: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, D]` -> `[B, L, H*D]`."""
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b, length, h * d)


class Recorder:
    """Wraps an attention function and keeps every call's q/k/v and output (`calls`)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, q, k, v, *args, **kwargs):
        out = self.fn(q, k, v, *args, **kwargs)
        self.calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), args, dict(kwargs), out.detach().clone()))
        return out


def call_sampling_function(sampling, sd_model, x, text_cond, text_uncond, cond_scale):
    """One denoiser evaluation through a Forge-family host's real `sampling_function` module, as its
    CFGDenoiser calls it (conditioning modifiers, CFG-1 shortcut, cond/uncond batching, model-function
    wrapper). Returns (denoised, sigma)."""
    batch = x.shape[0]
    denoiser = type("CFGDenoiser", (), {})()
    denoiser.inner_model = type("Wrap", (), {})()
    denoiser.inner_model.inner_model = sd_model
    denoiser.p = type("P", (), {"seeds": [0]})()
    params = type("CFGDenoiserParams", (), {})()
    params.x, params.sigma, params.image_cond = x, torch.full((batch,), 0.7), None
    params.text_cond, params.text_uncond = text_cond, text_uncond
    with torch.no_grad():
        out = sampling.sampling_function(denoiser, params, cond_scale, [[(i, 1.0)] for i in range(batch)])
    return (out[0] if isinstance(out, tuple) else out), params.sigma


# -- Flux's T5 text side ---------------------------------------------------------------------------------

T5_VOCAB, T5_WIDTH = 512, 32


def hf_t5_encoder(seed: int = 0):
    """A tiny `transformers` T5 encoder whose weights also fit the hosts' own T5 class (Forge and Neo fix
    32 relative-position buckets and max distance 128, as T5 does; inner width = model width)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=T5_VOCAB, d_model=T5_WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def host_t5(t5_module, hf_encoder):
    """The host's `IntegratedT5` (`backend/nn/t5.py`) carrying `hf_encoder`'s weights."""
    model = t5_module.IntegratedT5({"num_layers": 2, "d_model": T5_WIDTH, "d_ff": 48, "dense_act_fn": "relu",
                                    "is_gated_act": False, "num_heads": 4, "model_type": "t5", "vocab_size": T5_VOCAB})
    state = {k: v for k, v in hf_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    model.transformer.load_state_dict(state, strict=True)
    return model.eval()


class T5WordTokenizer:
    """A word-level stand-in for the T5 tokenizer (one id >= 2 per word, from the word's CRC): the
    chunking under test is the host's."""

    def get_vocab(self):
        return {}

    def __call__(self, texts, truncation=False, add_special_tokens=False):
        import zlib

        return {"input_ids": [[2 + zlib.crc32(w.encode()) % (T5_VOCAB - 2) for w in t.split()] for t in texts]}
