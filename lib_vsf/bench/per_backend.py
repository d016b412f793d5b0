"""`python -m lib_vsf.bench --backend sdpa|flash|xformers|sage`: guidance cost on one attention library.

The host's unguided calls run on the user's attention library, and VSF's fast path then runs its big
pass on the same library (`lib_vsf/attention/backends.py`). This section times, with everything on the
chosen library:

- one attention call: `unguided` (the library's ordinary call over image + positive tokens), `cfg`
  (the same at batch 2) and `vsf_fast` (the fast exact VSF call, its LSE pass on the library);
- one whole transformer forward: the same three, with the diffusers model's own attention set to the
  library (`set_attention_backend`, diffusers 0.35+) for `unguided` and `cfg`.

It reports which LSE backend actually served VSF (the first-use check may reject one), the installed
library versions, the fast path's error against the float32 reference, and the aten ops one VSF call
dispatches (`aten_ops`, counted with a TorchDispatchMode: a device-independent launch count, honest on
CPU where wall times are no stand-in for GPU ratios). An unavailable library ends the run with a clear
message (exit status 2), nothing timed.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import warnings

import torch

from ..attention import backends
from ..attention import fast as attention_fast

CHOICES = {"sdpa": "sdpa", "flash": "flash_attn", "xformers": "xformers", "sage": "sage"}
DIFFUSERS_BACKENDS = {"flash_attn": "flash", "xformers": "xformers", "sage": "sage"}
VIEW_OPS = {"view", "_unsafe_view", "transpose", "t", "slice", "select", "expand", "unsqueeze", "squeeze",
            "alias", "as_strided", "reshape", "detach", "empty", "empty_like", "empty_strided"}


class UnavailableBackend(RuntimeError):
    """The requested attention library cannot serve this run (message says why)."""


def installed_versions() -> dict:
    """Version of each attention library as importable here (or why not)."""
    out = {"torch": torch.__version__}
    for dist, module in (("flash_attn", "flash_attn"), ("flash_attn_3", "flash_attn_interface"),
                         ("xformers", "xformers"), ("sageattention", "sageattention")):
        try:
            out[dist] = str(getattr(importlib.import_module(module), "__version__", "installed"))
        except Exception as err:  # noqa: BLE001
            out[dist] = f"unavailable ({type(err).__name__})"
    return out


def count_aten_ops(fn) -> dict | None:
    """aten ops one call of `fn` dispatches after a first call (backend choice, caches): total, compute
    (views and allocations left out) and per op. None on torch builds without TorchDispatchMode."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except Exception:  # noqa: BLE001
        return None

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        fn()
        with _Count() as counter:
            fn()
    ops = dict(sorted(counter.ops.items()))
    return {"total": sum(ops.values()), "compute": sum(n for k, n in ops.items() if k not in VIEW_OPS),
            "ops": ops}


@contextlib.contextmanager
def using_backend(name: str, device: torch.device):
    """VSF's LSE pass on `name` for a while: the host preference on CUDA, forced elsewhere (the
    preference is CUDA-only); "sdpa" is the automatic aten choice. Caches reset on the way in and out."""
    from .measure import forced_backend

    previous = backends.set_preferred_backend(None if name == "sdpa" else name)
    force = name if name != "sdpa" and device.type != "cuda" else None
    try:
        with forced_backend(force):
            yield
    finally:
        backends.set_preferred_backend(previous)
        attention_fast.reset_backend_cache()


def check_available(name: str) -> str:
    """A label of what will run, or UnavailableBackend with the reason."""
    if name == "sdpa":
        return "torch scaled_dot_product_attention; VSF's LSE pass on the automatic aten choice"
    fn = backends.FACTORIES[name]()
    if fn is None or backends.plain_attention(name) is None:
        raise UnavailableBackend(f"attention backend {name!r} is not available here: {backends.unavailable_reason(name)}")
    return fn.vsf_label


@contextlib.contextmanager
def model_attention(model, name: str):
    """The diffusers model's own attention on the library (unguided and CFG forwards), restored after."""
    if name == "sdpa":
        yield "native"
        return
    setter = getattr(model, "set_attention_backend", None)
    if setter is None:
        raise UnavailableBackend("this diffusers has no set_attention_backend (0.35+ needed for the forward rows)")
    setter(DIFFUSERS_BACKENDS[name])
    try:
        yield DIFFUSERS_BACKENDS[name]
    finally:
        reset = getattr(model, "reset_attention_backend", None)
        if reset is not None:
            reset()
        else:
            setter("native")


def attention_rows(p, device, dtype, name, warmup, repeats, batch=1) -> tuple[dict, dict]:
    """unguided / cfg / vsf_fast on one attention call, everything on `name`."""
    from ..attention import Guidance, cross_attention, joint_attention
    from ..attention.reference import vsf_cross_reference, vsf_joint_reference
    from ..layout import text_layout
    from .measure import METHODS, heads_view, timed

    plain = backends.plain_attention(name)
    gen = torch.Generator().manual_seed(0)
    li, lp, n, h, d = p.image_tokens, p.positive_tokens, p.negative_tokens, p.heads, p.head_dim
    vsf: Guidance = METHODS["vsf"]
    if p.kind == "joint":
        length = li + lp + n
        layout = (text_layout(lp, n, negative_first=True, total=length) if p.negative_first
                  else text_layout(lp, n, offset=li))
        q, k, v = (heads_view(batch, h, length, d, device, dtype, gen) for _ in range(3))
        keep = slice(n, length) if p.negative_first else slice(0, li + lp)
        qu, ku, vu = q[:, :, keep], k[:, :, keep], v[:, :, keep]
        guided = lambda: joint_attention(q, k, v, layout, vsf)  # noqa: E731
        reference = lambda: vsf_joint_reference(q, k, v, layout, vsf.alpha, vsf.beta)  # noqa: E731
    else:
        layout = text_layout(lp, n)
        q = heads_view(batch, h, li, d, device, dtype, gen)
        k, v = (heads_view(batch, h, lp + n, d, device, dtype, gen) for _ in range(2))
        qu, ku, vu = q, k[:, :, :lp], v[:, :, :lp]
        guided = lambda: cross_attention(q, k, v, layout, vsf)  # noqa: E731
        reference = lambda: vsf_cross_reference(q, k, v, layout, vsf.alpha, vsf.beta)  # noqa: E731
    q2, k2, v2 = (torch.cat([t, t]) for t in (qu, ku, vu))
    rows = {"unguided": {**timed(lambda: plain(qu, ku, vu), device, warmup, repeats), "ratio": 1.0}}
    base = rows["unguided"]["median_ms"]
    rows["cfg"] = timed(lambda: plain(q2, k2, v2), device, warmup, repeats, base)
    check = {}
    with using_backend(name, device), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows["vsf_fast"] = timed(guided, device, warmup, repeats, base)
        check["lse_backend"] = attention_fast.select_backend(q.device, q.dtype, d)[0]
        with torch.no_grad():
            err = (guided().float() - reference().float()).abs()
        check["vsf_fast_vs_reference_max_abs"] = float(err.max())
        check["aten_ops"] = count_aten_ops(guided)
    check["warnings"] = [str(w.message) for w in caught if "VSF" in str(w.message)]
    return rows, check


def forward_rows(p, device, dtype, name, warmup, repeats, batch=1) -> tuple[dict, dict]:
    """unguided / cfg / vsf_fast whole transformer forwards, the model's own attention on `name`."""
    try:
        import diffusers  # noqa: F401

        from .. import diffusers as _lib_diffusers  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return {}, {"skipped": f"whole forward needs diffusers and lib_vsf.diffusers: {err!r:.200}"}
    from .models import build_model
    from .measure import METHODS, cfg_batch, guided_inputs, timed

    torch.manual_seed(0)
    model = build_model(p, device, dtype)
    kwargs = p.make_inputs(p, batch, device, dtype)
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else kwargs["cap_feats"][0]
    negative = torch.randn(batch, p.negative_tokens, text.shape[-1], device=device, dtype=dtype)

    def fwd(kw):
        out = model(**kw, return_dict=False)[0]
        return torch.stack(out) if isinstance(out, list) else out

    rows, check = {}, {}
    with torch.no_grad(), model_attention(model, name) as model_backend:
        check["model_attention"] = model_backend
        rows["unguided"] = {**timed(lambda: fwd(kwargs), device, warmup, repeats), "ratio": 1.0}
        base = rows["unguided"]["median_ms"]
        cfg_kwargs = cfg_batch(kwargs, batch)
        rows["cfg"] = timed(lambda: fwd(cfg_kwargs), device, warmup, repeats, base)
        del cfg_kwargs
        with using_backend(name, device), guided_inputs(model, p, METHODS["vsf"], kwargs, negative) as gkw:
            rows["vsf_fast"] = timed(lambda: fwd(gkw), device, warmup, repeats, base)
            check["lse_backend"] = attention_fast.select_backend(device, dtype, p.head_dim)[0]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, check


def run(args, preset, device, dtype, warmup) -> dict:
    """The `--backend` run (see the module docstring); raises UnavailableBackend."""
    name = CHOICES[args.backend]
    out = {"backend_requested": args.backend, "installed": installed_versions()}
    out["lse_path"] = check_available(name)
    if not args.forward_only:
        out["attention"], out["attention_check"] = attention_rows(preset, device, dtype, name, warmup,
                                                                   args.repeats or 30, args.batch)
    if not args.attention_only:
        out["forward"], out["forward_check"] = forward_rows(preset, device, dtype, name,
                                                            2 if args.repeats == 1 else min(warmup, 3),
                                                            args.repeats or 10, args.batch)
    return out
