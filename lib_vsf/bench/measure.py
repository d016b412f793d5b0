"""What the benchmark's runs share: the guidance of each method, timing, the fast path's environment
switches, attention inputs shaped as diffusers makes them, and `lib_vsf.diffusers`' processors on a bare
transformer. `runner.py` (the main rows) and `per_backend.py` (`--backend`) both measure with these."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable

import torch

from ..attention import Guidance
from ..attention import fast as attention_fast
from .models import Preset

METHODS = {  # name -> Guidance used for the attention call and the forward
    "vsf": Guidance("vsf", 3.3, 0.2),
    "nag": Guidance("nag", 4.0, 0.125, 2.5),
    "nasa": Guidance("nasa", 0.15, 0.0),
}

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, baseline_ms=None) -> dict:
    """Median wall time of `fn` (synchronised) and the peak memory it reached (CUDA only)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - start) * 1000.0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    med = statistics.median(times)
    return {"median_ms": round(med, 4), "min_ms": round(min(times), 4), "repeats": len(times),
            "ratio": None if not baseline_ms else round(med / baseline_ms, 3),
            "peak_mib": None if peak is None else round(peak, 1)}


@contextlib.contextmanager
def _attention_env(name: str, value: str | None):
    """Set (a string) or unset (None) one of the fast path's environment switches for a while, with
    the cached kernel choices reset on the way in and out."""
    saved = os.environ.get(name)
    try:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        attention_fast.reset_backend_cache()
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
        attention_fast.reset_backend_cache()


def forced_backend(name: str | None):
    """Force one LSE backend (VSF_ATTENTION_BACKEND) for a while; None = automatic choice."""
    return _attention_env("VSF_ATTENTION_BACKEND", name)


def triton_disabled(disabled: bool = True):
    """Keep the fast path off the optional Triton kernels for a while (VSF_TRITON=0): the torch-only
    variant, timed as `vsf_fast_torch` beside `vsf_fast` (which uses them where usable)."""
    return _attention_env("VSF_TRITON", "0") if disabled else contextlib.nullcontext()


def heads_view(batch, heads, length, dim, device, dtype, gen):
    """[B, H, L, D] as diffusers produces it: a transposed view of [B, L, H, D]."""
    t = torch.randn(batch, length, heads, dim, generator=gen, device="cpu", dtype=torch.float32)
    return t.to(device=device, dtype=dtype).transpose(1, 2)


@contextlib.contextmanager
def guided_inputs(model, p: Preset, guidance: Guidance, kwargs: dict, negative: torch.Tensor,
                  negative_map: bool = False):
    """Install `lib_vsf.diffusers`' processors of the preset's family on a bare transformer for one
    step with `negative` [B, n, E] appended to the text stream; yields the forward kwargs. The
    original processors are restored on exit. Isolated here: this is the only place that knows the
    adapter API."""
    from ..diffusers.guidance import FAMILIES
    from ..settings import VSFSettings
    from ..state import GuidanceRun, NegativeText

    from types import SimpleNamespace

    adapter = next(f() for f in FAMILIES if f.family == p.family)
    settings = VSFSettings(guidance.method, alpha=guidance.alpha, beta=guidance.beta, tau=guidance.tau)
    run = GuidanceRun(settings, negative_first=adapter.negative_first)
    if negative_map:
        run.record_negative_map()
    (_, table), = adapter.denoisers(SimpleNamespace(transformer=model))  # what holds the processors
    originals = dict(table.attn_processors)
    ours = {name: adapter.processor_for(name, proc, run) or proc for name, proc in originals.items()}
    text = NegativeText(negative, torch.ones(negative.shape[:2], dtype=torch.bool, device=negative.device))

    def add_negative(module, args, kw):  # the part of VSFGuidance's step hook a guided step needs
        run.set_step(0, 1)
        run.set_text(adapter.positive_length(kw), text, adapter.negative_first)
        return args, adapter.extend_inputs(kw, text)

    table.set_attn_processor(ours)
    hook = adapter.register_step_hook(table, add_negative)
    try:
        yield kwargs
    finally:
        hook.remove()
        table.set_attn_processor(originals)


def cfg_batch(kwargs: dict, batch: int) -> dict:
    """The CFG batch: every per-sample input twice (position ids are shared; per-sample lists doubled)."""
    def doubled(k, t):
        if isinstance(t, list) and len(t) == batch:
            return t + t
        if torch.is_tensor(t) and t.dim() and t.shape[0] == batch and not k.endswith("_ids"):
            return torch.cat([t, t])
        return t

    return {k: doubled(k, t) for k, t in kwargs.items()}
