"""Attention libraries the user may already run (flash-attn, xformers, SageAttention) as LSE backends.

The fast VSF path (`fast.py`) needs one unmasked attention pass that also returns its log-sum-exp
(LSE). Besides the aten kernels, three libraries a WebUI user often installs can return it:

- flash-attn: `flash_attn_func(q, k, v, ..., return_attn_probs=True)` returns `(out, softmax_lse, ...)`,
  tensors `[B, L, H, D]`, LSE `[B, H, Lq]` (natural log, float32). FlashAttention 3's
  `flash_attn_interface.flash_attn_func` has the same layout; its return value is also a tuple.
- xformers: `memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=None, p=0.0, scale=...)`
  returns `(out, lse)`, tensors `[B, M, H, K]`, LSE `[B, H, Mq]`, padded on the query axis by some
  kernels (to a multiple of 32).
- SageAttention 2+: `sageattn(q, k, v, tensor_layout="HND", sm_scale=..., return_lse=True)` returns
  `(out, lse)` in `[B, H, L, D]`, LSE `[B, H, Lq]` natural log. SageAttention 1 has no `return_lse`
  (its `**kwargs` would swallow the flag silently), so it is not offered. Sage quantizes Q and K to int8:
  its first-use check runs with a looser tolerance (`SAGE_TOLERANCE`), as the host already accepts its
  approximation for every unguided call.

Each factory feature-detects the installed API (module, function, the keyword it needs) and returns
`fn(q, k, v, scale) -> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)` or None, with the reason
kept in `unavailable_reason(name)`. `fast.select_backend` still checks every candidate against float32
math on first use per (device, dtype, head_dim) and falls back to the aten kernels.

Which one to try first follows the host: `set_preferred_backend(name)` (called by the WebUI glue in
`lib_vsf/webui/attention_backend.py`, which reads the host's own setting) puts that backend first on
CUDA. This module imports no host code; `take_used()` tells the glue which backends served the calls.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

LIBRARY_BACKENDS = ("flash_attn", "xformers", "sage")
SAGE_TOLERANCE = 0.1  # int8 Q/K, fp8/fp16 PV: absolute error on the tiny first-use problems (std-1 values)
LABELS = {
    "flash_attn": "flash-attn", "xformers": "xformers", "sage": "SageAttention",
    "cudnn": "PyTorch SDPA (cuDNN)", "flash": "PyTorch SDPA (flash)", "efficient": "PyTorch SDPA (efficient)",
    "flash_cpu": "PyTorch SDPA (CPU flash)", "chunked": "plain torch math (chunked)",
}
PREFERENCES = LIBRARY_BACKENDS + ("sdpa",)  # "sdpa": the aten kernels in their default order

_preferred: str | None = None
_reasons: dict[str, str] = {}
_used: set[str] = set()


# ---------------------------------------------------------------------------------------------------------
# Preference and use (process-wide, read by fast.select_backend / attention_lse)


def set_preferred_backend(name: str | None) -> str | None:
    """Try `name` first for CUDA attention (one of `PREFERENCES`, or None for the default order);
    returns the previous preference so that callers can restore it."""
    global _preferred
    if name is not None and name not in PREFERENCES:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(PREFERENCES)}")
    previous, _preferred = _preferred, name
    return previous


def preferred_backend() -> str | None:
    return _preferred


def record_use(name: str) -> None:
    _used.add(name)


def take_used() -> tuple[str, ...]:
    """Names of the backends that answered `attention_lse` calls since the last call (and forget them)."""
    names = tuple(sorted(_used))
    _used.clear()
    return names


def label(name: str) -> str:
    return LABELS.get(name, name)


def unavailable_reason(name: str) -> str:
    return _reasons.get(name, "not tried: the host's library is preferred for CUDA tensors only")


def note_unusable(name: str, reason: str) -> None:
    """Keep why `name` was not used (shown in the WebUI note)."""
    _reasons[name] = reason


# ---------------------------------------------------------------------------------------------------------
# Layout conversion


def to_sequence_major(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H, D] (a view; diffusers' tensors are [B, L, H, D] in memory already)."""
    return t.transpose(1, 2)


def lse_rows(lse: torch.Tensor, batch: int, heads: int, rows: int) -> torch.Tensor:
    """A library's LSE as `[B, H, rows]` float32: drops query padding ([B, H, rows + pad]) and a
    trailing unit axis ([B, H, rows, 1])."""
    return lse.reshape(batch, heads, -1)[..., :rows].float()


def from_sequence_major(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor):
    """(out [B, L, H, D], lse [B, H, L(+pad)]) -> the project's (out [B, H, L, D], lse [B, H, L])."""
    batch, heads, rows = q.shape[:3]
    return out.transpose(1, 2).to(q.dtype), lse_rows(lse, batch, heads, rows)


# ---------------------------------------------------------------------------------------------------------
# Factories


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken install is "not available", never a crash
        return err


def _parameters(fn) -> set[str]:
    try:
        return {n for n, p in inspect.signature(fn).parameters.items() if p.kind != p.VAR_KEYWORD}
    except (TypeError, ValueError):
        return set()


def _version(mod) -> str:
    return str(getattr(mod, "__version__", "?"))


def _unavailable(name: str, reason: str) -> None:
    _reasons[name] = reason
    return None


def flash_attn_lse() -> Callable | None:
    """flash-attn 2 (`flash_attn.flash_attn_func`), else FlashAttention 3 (`flash_attn_interface`)."""
    reasons = []
    for module in ("flash_attn", "flash_attn_interface"):
        mod = _import(module)
        fn = None if isinstance(mod, Exception) else getattr(mod, "flash_attn_func", None)
        if fn is None:
            reasons.append(f"{module}: {'no flash_attn_func' if not isinstance(mod, Exception) else type(mod).__name__}")
            continue
        params = _parameters(fn)
        if "return_attn_probs" not in params or "softmax_scale" not in params:
            reasons.append(f"{module}.flash_attn_func has no return_attn_probs/softmax_scale")
            continue
        fixed = {k: v for k, v in (("dropout_p", 0.0), ("causal", False)) if k in params}

        def run(q, k, v, scale, _fn=fn, _fixed=fixed):
            res = _fn(to_sequence_major(q), to_sequence_major(k), to_sequence_major(v), softmax_scale=scale,
                      return_attn_probs=True, **_fixed)
            return from_sequence_major(res[0], res[1], q)

        run.vsf_label = f"flash-attn {_version(mod)} ({module}.flash_attn_func with LSE)"
        return run
    return _unavailable("flash_attn", "; ".join(reasons))


def xformers_lse() -> Callable | None:
    """xformers' `memory_efficient_attention_forward_requires_grad` (out and LSE, no autograd graph)."""
    mod = _import("xformers.ops")
    if isinstance(mod, Exception):
        return _unavailable("xformers", f"xformers.ops: {type(mod).__name__}")
    fn = getattr(mod, "memory_efficient_attention_forward_requires_grad", None)
    if fn is None:
        fmha = getattr(mod, "fmha", None)
        fn = getattr(fmha, "memory_efficient_attention_forward_requires_grad", None)
    if fn is None or "scale" not in _parameters(fn):
        return _unavailable("xformers", "no memory_efficient_attention_forward_requires_grad(..., scale=)")

    def run(q, k, v, scale):
        out, lse = fn(to_sequence_major(q), to_sequence_major(k), to_sequence_major(v), attn_bias=None, p=0.0,
                      scale=scale)
        return from_sequence_major(out, lse, q)

    run.vsf_label = f"xformers {_version(_import('xformers'))} (memory_efficient_attention_forward_requires_grad)"
    return run


def sage_lse() -> Callable | None:
    """SageAttention 2+ `sageattn(..., tensor_layout="HND", return_lse=True)`."""
    mod = _import("sageattention")
    if isinstance(mod, Exception):
        return _unavailable("sage", f"sageattention: {type(mod).__name__}")
    fn = getattr(mod, "sageattn", None)
    params = _parameters(fn) if fn is not None else set()
    if not {"return_lse", "tensor_layout", "sm_scale"} <= params:
        return _unavailable("sage", "this sageattention's sageattn has no return_lse (SageAttention 1?)")

    def run(q, k, v, scale):
        out, lse = fn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale, return_lse=True)
        return out.to(q.dtype), lse_rows(lse, *q.shape[:3])

    run.vsf_label = f"SageAttention {_version(mod)} (sageattn with return_lse)"
    run.vsf_tolerance = SAGE_TOLERANCE
    return run


FACTORIES: dict[str, Callable[[], Callable | None]] = {
    "flash_attn": flash_attn_lse, "xformers": xformers_lse, "sage": sage_lse,
}


# ---------------------------------------------------------------------------------------------------------
# Host-side unguided call (benchmark): the same library without LSE, as the host calls it


def plain_attention(name: str) -> Callable | None:
    """fn(q, k, v) for [B, H, L, D] tensors: the library's ordinary call (what a host's unguided attention
    costs), or None when it is not installed. "sdpa" is torch's scaled_dot_product_attention."""
    if name == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if name == "flash_attn":
        mod = _import("flash_attn")
        fn = None if isinstance(mod, Exception) else getattr(mod, "flash_attn_func", None)
        if fn is None:
            return None
        return lambda q, k, v: fn(*(to_sequence_major(t) for t in (q, k, v))).transpose(1, 2)
    if name == "xformers":
        mod = _import("xformers.ops")
        fn = None if isinstance(mod, Exception) else getattr(mod, "memory_efficient_attention", None)
        if fn is None:
            return None
        return lambda q, k, v: fn(*(to_sequence_major(t) for t in (q, k, v))).transpose(1, 2)
    if name == "sage":
        mod = _import("sageattention")
        fn = None if isinstance(mod, Exception) else getattr(mod, "sageattn", None)
        if fn is None:
            return None
        return lambda q, k, v: fn(q, k, v, tensor_layout="HND", is_causal=False)
    raise ValueError(f"unknown attention backend {name!r}")
