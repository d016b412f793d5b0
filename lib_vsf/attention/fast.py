"""VSF attention implementations used in production (see attention.py for the entry points).

Exact VSF at about the cost of the unguided pass, without an Lq x Lk mask (memory stays linear in the
sequence length). The idea (VSF-SPEC.md, "Equivalence"): for an image query,

    A+ = sum over {I, P, R} of exp(s),   A- = sum over N of exp(s - beta),   W = A+ / (A+ + A-)
    Z  = W Z+ - alpha (1 - W) Z-

(R: reference-image tokens, `TokenLayout.reference`, when the model has them) and A+ / A- are exactly
what an attention kernel's log-sum-exp (LSE) output holds. So one *unmasked* attention over the
{I, P, R} rows and keys (the unguided pass itself, on the fastest kernel) gives Z+ and log A+ for every
image row and the final output of every P and R row (R is never flipped); a second unmasked call of the
true image rows over the few negative keys gives Z- and log A-; two elementwise kernels merge them. N0
rows (the negative text stream, few queries) attend {I, R, N0}: every key but P, one masked call.

The model's own positive-text mask (`TokenLayout.positive_mask`: padded positive positions are keys for
nobody) keeps the big pass maskless: the samples are grouped by their mask (usually one group) and each
group's pass runs over its real keys only, gathered (`_context_pass`). N0 rows never see P anyway.
With beta = +inf (N1 removed) those rows are the model's own masked pass, so they run as it does: one
SDPA call with the padding as a key mask, bit for bit the model's output (`_masked_unguided_rows`).

Which kernel returns the LSE depends on device, dtype and torch version (2.1 .. 2.13): `attention_lse`
tries the candidates in order on first use for a (device, dtype, head_dim), checks each against plain
math on a tiny problem, and caches the first that works; a pure-torch chunked implementation is always
there as the last resort. `VSF_ATTENTION_BACKEND=<name>` forces one (names in `BACKENDS`); a forced
backend that is not usable here gives one warning and the automatic order. The user's own attention
library (flash-attn, xformers, SageAttention: `backends.py`) joins the candidates when the host uses it
(`backends.set_preferred_backend`, set by the WebUI glue): on CUDA it is tried first, checked the same way.

Padded negatives (samples with different negative lengths, `TokenLayout.negative_mask`) cannot be
expressed to a maskless kernel; that case merges the small negative block in float32 instead
(`_merge_block`), still exact and linear in memory, only slower.

Where Triton works (CUDA; `attention_triton.py`, imported lazily) two fused kernels replace the small
steps: the image-row merge (N1 attention + weight + blend in one memory-bound pass, padding included)
and the N0 rows (split-key attention over every key but P). They are checked against float32 math on
first use per device/dtype/head_dim; `VSF_TRITON=0` turns them off. Everything else is unchanged and
remains the path on CPU, without Triton, or when a kernel fails.

The negative-attention map (`negative_share`, a `lib_vsf.state.NegativeShareMap` or None): the image
rows' weight of the N1 block, 1 - W = sigmoid(log A- - log A+), is already an intermediate of the
merge; when a recorder is given its head mean `[B, image tokens]` (true image rows, never R) is handed
over (one reduction per call). None (the default) adds nothing. The fused Triton merge then also
stores the weight into a `[B, H, rows]` float32 buffer (its output is computed exactly as without it).
"""
from __future__ import annotations

import math
import os
import warnings
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from . import backends
from .reference import check_cross_layout, vsf_joint_reference
from ..layout import NEGATIVE, TokenLayout

# ---------------------------------------------------------------------------------------------------------
# Attention with log-sum-exp: backends


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _aten_op(name: str):
    """The `.default` overload of an aten op, or None on torch versions without it."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    try:
        return packet.default
    except (AttributeError, RuntimeError):
        return None


def _fixed_kwargs(op) -> dict:
    """Keyword arguments for `op` built from its schema: the op signatures changed between torch
    versions (e.g. cuDNN gained attn_bias / compute_log_sumexp in 2.5), so pass only what exists."""
    wanted = {"attn_bias": None, "attn_mask": None, "compute_log_sumexp": True, "dropout_p": 0.0,
              "is_causal": False, "return_debug_mask": False}
    names = {a.name for a in op._schema.arguments}
    return {k: v for k, v in wanted.items() if k in names}


def _aten_lse_backend(name: str) -> Callable | None:
    op = _aten_op(name)
    if op is None:
        return None
    fixed = _fixed_kwargs(op)

    def run(q, k, v, scale):
        res = op(q, k, v, scale=scale, **fixed)
        out, lse = res[0], res[1]
        # Efficient pads the LSE to a multiple of 32 queries, cuDNN may return [B, H, Lq, 1].
        lse = lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]]
        return out, lse.to(_compute_dtype(q.dtype))

    return run


def chunked_attention_lse(q, k, v, scale):
    """Exact attention and its log-sum-exp in plain torch, in query chunks so that the logits never
    exceed a fixed budget (memory linear in the sequence). Math in float32 (float64 for float64)."""
    cd = _compute_dtype(q.dtype)
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    budget = 1 << 24  # logits elements per chunk (64 MiB in float32)
    step = max(1, min(lq, budget // max(1, batch * heads * lk)))
    kt, vc = k.to(cd).transpose(-1, -2), v.to(cd)
    outs, lses = [], []
    for start in range(0, lq, step):
        s = torch.matmul(q[:, :, start:start + step].to(cd), kt) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vc).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


# Candidates per device type, fastest first. Each: name -> factory returning fn(q, k, v, scale) or None.
_FACTORIES: dict[str, Callable[[], Callable | None]] = {
    "flash": lambda: _aten_lse_backend("_scaled_dot_product_flash_attention"),
    "cudnn": lambda: _aten_lse_backend("_scaled_dot_product_cudnn_attention"),
    "efficient": lambda: _aten_lse_backend("_scaled_dot_product_efficient_attention"),
    "flash_cpu": lambda: _aten_lse_backend("_scaled_dot_product_flash_attention_for_cpu"),
    "chunked": lambda: chunked_attention_lse,
    **backends.FACTORIES,  # the user's attention libraries: tried only when preferred or forced
}
BACKENDS = tuple(_FACTORIES)
_ORDER = {
    # Measured on H200 / torch 2.11 at SD3.5-Large shapes: the cuDNN pass with LSE costs 1.05x the default
    # SDPA call, flash 1.4x (Hopper); `_order_for` puts flash first on older GPUs.
    "cuda": ("cudnn", "flash", "efficient", "chunked"),
    # torch 2.1/2.2 served CPU flash through the generic flash op; 2.3+ has the _for_cpu op.
    "cpu": ("flash_cpu", "flash", "chunked"),
}
_CHOSEN: dict[tuple, tuple[str, Callable]] = {}
_DROPPED: dict[tuple, set[str]] = {}  # per key: backends that failed on a real call


def _order_for(device: torch.device) -> tuple[str, ...]:
    order = _ORDER.get(device.type, ("chunked",))
    preferred = backends.preferred_backend()
    if device.type == "cuda" and preferred in backends.LIBRARY_BACKENDS:  # the host's library, then aten
        return (preferred,) + _order_without_preference(device, order)
    return _order_without_preference(device, order)


def _order_without_preference(device: torch.device, order: tuple[str, ...]) -> tuple[str, ...]:
    if device.type == "cuda" and "flash" in order and "cudnn" in order:
        try:
            hopper = torch.cuda.get_device_capability(device)[0] >= 9
        except Exception:  # noqa: BLE001
            hopper = False
        if not hopper:  # cuDNN attention is tuned for Hopper; flash first elsewhere (A100, consumer cards)
            order = ("flash", "cudnn") + tuple(n for n in order if n not in ("flash", "cudnn"))
    return order


def reset_backend_cache() -> None:
    """Forget the cached backend choices (tests, or after changing VSF_ATTENTION_BACKEND / VSF_TRITON)."""
    _CHOSEN.clear()
    _DROPPED.clear()
    _TRITON_OK.clear()


def _works(fn, device, dtype, head_dim) -> bool:
    """Does `fn` give the right output and LSE on small problems of this device/dtype/head_dim?
    A backend may loosen the tolerance (`fn.vsf_tolerance`: quantized kernels such as SageAttention)."""
    g = torch.Generator().manual_seed(1234)
    cd = _compute_dtype(dtype)
    tol = 1e-6 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 3e-2)
    tol = max(tol, getattr(fn, "vsf_tolerance", 0.0))
    try:
        for lq, lk in ((67, 5), (5, 67)):  # few keys (negative block) and few queries (N0 rows)
            q, k, v = (torch.randn(2, 3, n, head_dim, generator=g, dtype=cd) for n in (lq, lk, lk))
            s = torch.matmul(q, k.transpose(-1, -2)) * 0.3
            q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
            out, lse = fn(q, k, v, 0.3)
            want_out = torch.matmul(torch.softmax(s, -1), v.to(cd).cpu())
            if out.shape != q.shape or lse.shape != q.shape[:3]:
                return False
            if not torch.allclose(lse.cpu().to(cd), torch.logsumexp(s, -1), atol=tol, rtol=tol):
                return False
            if not torch.allclose(out.cpu().to(cd), want_out, atol=tol, rtol=tol):
                return False
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def _key(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple:
    return (device.type, device.index, dtype, head_dim, backends.preferred_backend())


def select_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, Callable]:
    """(name, fn) of the LSE attention used for this device/dtype/head_dim, chosen once and cached.
    A forced or preferred backend that is unavailable or fails the check gives one warning (per key)."""
    key = _key(device, dtype, head_dim)
    if key in _CHOSEN:
        return _CHOSEN[key]
    forced = os.environ.get("VSF_ATTENTION_BACKEND", "").strip()
    wanted = forced or (backends.preferred_backend() if device.type == "cuda" else None)
    order = _order_for(device)
    if forced:
        order = (forced,) + tuple(n for n in order if n != forced)
    for name in order:
        if name in _DROPPED.get(key, ()):
            continue
        factory = _FACTORIES.get(name)
        fn = factory() if factory else None
        if fn is not None and (name == "chunked" or _works(fn, device, dtype, head_dim)):
            _CHOSEN[key] = (name, fn)
            return _CHOSEN[key]
        if name == wanted:
            why = ("unknown name" if factory is None else backends.unavailable_reason(name) if fn is None
                   else "its output or log-sum-exp failed the first-use check against float32 math")
            src = "VSF_ATTENTION_BACKEND" if forced else "the host's attention backend"
            backends.note_unusable(name, why)
            warnings.warn(f"VSF: {name!r} ({src}) is not usable for {device.type} {str(dtype)[6:]} head_dim "
                          f"{head_dim}: {why}; using the automatic choice")
    _CHOSEN[key] = ("chunked", chunked_attention_lse)
    return _CHOSEN[key]


def attention_lse(q, k, v, scale):
    """Unmasked attention over [B, H, L, D] tensors -> (output in q's dtype, LSE [B, H, Lq] in float32,
    float64 for float64). Uses the cached backend; if it fails on a particular call (shape limits),
    that backend is dropped for this key and the next candidate in the order answers (chunked last)."""
    key = _key(q.device, q.dtype, q.shape[-1])
    name, fn = select_backend(q.device, q.dtype, q.shape[-1])
    try:
        res = fn(q, k, v, scale)
    except Exception as err:  # noqa: BLE001
        if name == "chunked":
            raise
        warnings.warn(f"VSF: attention backend {name!r} failed ({err!s:.200}); using the next choice")
        _DROPPED.setdefault(key, set()).add(name)
        _CHOSEN.pop(key, None)
        return attention_lse(q, k, v, scale)
    backends.record_use(name)
    return res


# ---------------------------------------------------------------------------------------------------------
# Token positions


def _gaps(length: int, spans) -> list[tuple[int, int]]:
    """[start, stop) pieces of [0, length) not covered by `spans` (non-overlapping slices), in order."""
    pieces, at = [], 0
    for span in sorted((s for s in spans if s.stop > s.start), key=lambda s: s.start):
        if span.start > at:
            pieces.append((at, span.start))
        at = max(at, span.stop)
    if at < length:
        pieces.append((at, length))
    return pieces


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def _positions(pieces, device):
    """A slice for one contiguous piece (a view, no copy), else a cached index tensor."""
    if len(pieces) == 1:
        return slice(*pieces[0])
    key = (tuple(pieces), str(device))
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = torch.cat([torch.arange(a, b) for a, b in pieces]).to(device)
    return _INDEX_CACHE[key]


def _take(t, pos):
    return t[:, :, pos] if isinstance(pos, slice) else t.index_select(2, pos)


def _put(out, pos, src):
    if isinstance(pos, slice):
        out[:, :, pos] = src
    else:
        out.index_copy_(2, pos, src)


def _shift_past(pieces, removed: slice) -> list[tuple[int, int]]:
    """Coordinates of `pieces` once the `removed` span is cut out of the sequence."""
    n = removed.stop - removed.start
    return [(a - n, b - n) if a >= removed.stop else (a, b) for a, b in pieces]


_MASK_CACHE: dict[int, tuple[weakref.ref, bool]] = {}


def _padding_mask(layout: TokenLayout, batch: int, device) -> torch.Tensor | None:
    """[B, n] real-token mask when some negative position is padding, None when all are real.
    The all-real answer is cached per mask tensor, so a GPU mask costs one sync per generation, not per
    attention call."""
    mask = layout.negative_mask
    if mask is None:
        return None
    hit = _MASK_CACHE.get(id(mask))
    if hit is None or hit[0]() is not mask:
        if len(_MASK_CACHE) > 64:
            _MASK_CACHE.clear()
        hit = (weakref.ref(mask), bool(mask.all()))
        _MASK_CACHE[id(mask)] = hit
    return None if hit[1] else layout.negative_valid(batch, device)


# ---------------------------------------------------------------------------------------------------------
# Optional fused Triton kernels (attention_triton.py)
#
# Used for CUDA tensors in bf16/fp16/fp32 when `import triton` works and the kernel passes a check
# against the float32 torch math on a tiny problem (once per device, dtype, head_dim and kernel, cached).
# VSF_TRITON=0 disables them; VSF_TRITON=1 skips the check and, with TRITON_INTERPRET=1, also runs them
# on CPU tensors through Triton's interpreter (tests). Any failure falls back to the torch path.

_TRITON_OK: dict[tuple, bool] = {}
_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes", "force")


def _triton_module():
    try:
        from . import triton_kernels as attention_triton
    except Exception:  # noqa: BLE001
        return None
    return attention_triton if attention_triton.AVAILABLE else None


def _triton_check(mod, kind: str, device, dtype, head_dim: int) -> bool:
    """Does the Triton kernel `kind` agree with the float32 torch math on small problems here?"""
    if kind == "n0" and dtype == torch.float32:
        return False  # tensor-core dots: 16-bit inputs only (see triton_kernels.py)
    g = torch.Generator().manual_seed(4321)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    try:
        valids = (None, torch.tensor([[True, False, True, True, False], [False] * 5], device=device))
        if kind == "merge":
            q, k, v = rnd(2, 3, 67, head_dim), rnd(2, 3, 11, head_dim), rnd(2, 3, 11, head_dim)
            k_n, v_n = rnd(2, 3, 5, head_dim), rnd(2, 3, 5, head_dim)
            o, lse = chunked_attention_lse(q, k, v, 0.3)
            for valid in valids:
                got = mod.image_rows_vsf(o, lse, q, k_n, v_n, 2.5, 0.2, valid, 0.3)
                want = _merge_block(o.float(), lse, q.float(), k_n, v_n, -2.5, 0.2, valid, 0.3)
                if not torch.allclose(got.float(), want, atol=tol, rtol=tol):
                    return False
        else:
            q, k, v = rnd(2, 3, 90, head_dim), rnd(2, 3, 90, head_dim), rnd(2, 3, 90, head_dim)
            pos, neg = slice(30, 50), slice(80, 85)
            for valid in valids:
                got = mod.negative_rows(q[:, :, neg], k, v, pos, neg, valid, 0.3)
                keys = torch.ones(2, 90, dtype=torch.bool, device=device)
                keys[:, pos] = False
                if valid is not None:
                    keys[:, neg] &= valid
                s = torch.matmul(q[:, :, neg].float(), k.float().transpose(-1, -2)) * 0.3
                s = s.masked_fill(~keys[:, None, None, :], float("-inf"))
                want = torch.matmul(torch.softmax(s, -1), v.float())
                if not torch.allclose(got.float(), want, atol=tol, rtol=tol):
                    return False
        return True
    except Exception:  # noqa: BLE001 - a kernel that fails to build or run is not used
        return False


def _triton_kernel(kind: str, q: torch.Tensor, supported: Callable):
    """The triton_kernels module if its `kind` kernel ("merge" or "n0") should serve `q`, else None."""
    flag = os.environ.get("VSF_TRITON", "").strip().lower()
    if flag in _OFF or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    forced = flag in _ON
    if q.device.type != "cuda" and not (forced and os.environ.get("TRITON_INTERPRET", "") == "1"):
        return None
    key = (kind, q.device.type, q.device.index, q.dtype, q.shape[-1])
    ok = _TRITON_OK.get(key)
    if ok is None:
        mod = _triton_module()
        ok = mod is not None and (forced or _triton_check(mod, kind, q.device, q.dtype, q.shape[-1]))
        _TRITON_OK[key] = ok
        if forced and not ok:
            warnings.warn("VSF_TRITON is set but Triton is not usable here; using the torch path")
    if not ok:
        return None
    mod = _triton_module()
    return mod if supported(mod) else None


def _triton_failed(kind: str, q: torch.Tensor, err: Exception) -> None:
    warnings.warn(f"VSF: Triton {kind} kernel failed ({err!s:.200}); using the torch path")
    _TRITON_OK[(kind, q.device.type, q.device.index, q.dtype, q.shape[-1])] = False


def triton_status(device, dtype, head_dim: int) -> dict:
    """Which Triton kernels the automatic choice would use here (bench reports)."""
    probe = torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype)
    return {"merge": _triton_kernel("merge", probe, lambda m: True) is not None,
            "n0": _triton_kernel("n0", probe, lambda m: True) is not None}


# ---------------------------------------------------------------------------------------------------------
# Merges


def _merge_block(out, lse, q, k_blk, v_blk, value_scale: float, bias: float, valid, scale, block_weight=False,
                 dest=None):
    """Exactly add a small key block to an attention result: given `out`/`lse` of rows `q` over some
    keys, return the attention of the same rows over those keys plus `k_blk` (logits shifted by -bias,
    values times value_scale, keys where `valid` [B, n] is False left out). Math in float32.
    `block_weight`: also return the softmax mass of the block per row, [B, H, Lq] float32. `dest`: a
    q-dtype tensor (or view) the result is written into, else a new one.
    Full-size ([rows, D]) work is one matmul, one fused multiply-add that reads `out` in its own dtype
    (no float32 copy) and one division that stores in q's dtype (no cast kernel); the rest is on
    [rows, n] logits, updated in place."""
    cd = _compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), k_blk.to(cd).transpose(-1, -2)).mul_(scale)
    if bias:
        s.sub_(bias)
    if valid is not None:
        s.masked_fill_(~valid[:, None, None, :], float("-inf"))
    lse = lse.to(cd)
    m = torch.maximum(lse, s.amax(dim=-1))  # lse is finite, so m is finite and nothing turns into NaN
    w_old = torch.sub(lse, m).exp_()
    w_blk = s.sub_(m[..., None]).exp_()
    mass = w_blk.sum(dim=-1)
    num = torch.matmul(w_blk, v_blk.to(cd) * value_scale).addcmul_(w_old[..., None], out)
    total = w_old.add_(mass)
    if dest is None and num.dtype == q.dtype:
        res = num.div_(total[..., None])
    else:
        res = torch.div(num, total[..., None], out=torch.empty_like(q) if dest is None else dest)
    if not block_weight:
        return res
    return res, mass.div_(total)


def _image_rows_vsf(o_i, lse_i, q_i, k_n, v_n, alpha, beta, valid, scale, dest=None, negative_share=None):
    """VSF image rows: merge Z+ (o_i, lse_i over {I, P}) with the sign-flipped negative block N1.

    Unpadded: one maskless call over N1 (values already times -alpha, so it returns -alpha Z-, and its
    LSE is log A- + beta), then Z = lerp(Z+, -alpha Z-, 1 - W) with 1 - W = sigmoid(log A- - log A+)
    per row: one full-size kernel. Padded negatives: the float32 block merge.
    `negative_share`: recorder of 1 - W (head mean, [B, rows]) or None."""
    if math.isinf(beta):  # beta = +inf removes N1 entirely: the unguided rows, bit for bit
        if negative_share is not None:  # A- = 0: no mass on the negative
            negative_share.add(lse_i.new_zeros(lse_i.shape[0], lse_i.shape[2], dtype=torch.float32))
        if dest is None:
            return o_i
        dest.copy_(o_i)
        return dest
    mod = _triton_kernel("merge", q_i, lambda m: m.supports_merge(q_i, k_n.shape[2]))
    if mod is not None:  # one fused memory-bound kernel, float32 math, written straight into dest
        try:
            if negative_share is None:
                return mod.image_rows_vsf(o_i, lse_i, q_i, k_n, v_n, alpha, beta, valid, scale, dest)
            share = torch.empty(lse_i.shape, device=lse_i.device, dtype=torch.float32)
            res = mod.image_rows_vsf(o_i, lse_i, q_i, k_n, v_n, alpha, beta, valid, scale, dest, share=share)
            negative_share.add(share.mean(dim=1))
            return res
        except Exception as err:  # noqa: BLE001
            _triton_failed("merge", q_i, err)
    if valid is None:
        o_n, lse_n = attention_lse(q_i, k_n, v_n * (-alpha), scale)
        # Weight of the N1 block, 1 - W = A- / (A+ + A-), computed directly (not as 1 - W) so that it
        # keeps its relative precision when cast to a 16-bit dtype; lerp blends in float internally.
        # In place on the fresh difference; the sigmoid stores straight into o's dtype (no cast kernel).
        logit = torch.sub(lse_n, lse_i)
        if beta:
            logit.sub_(beta)
        if negative_share is not None:
            w_neg = logit.sigmoid_()
            negative_share.add(w_neg.float().mean(dim=1))
            w_neg = w_neg.to(o_i.dtype)[..., None]
        elif logit.dtype == o_i.dtype:
            w_neg = logit.sigmoid_()[..., None]
        else:
            w_neg = torch.sigmoid(logit, out=torch.empty(logit.shape, dtype=o_i.dtype, device=logit.device))[..., None]
        if dest is None:
            return torch.lerp(o_i, o_n, w_neg)
        return torch.lerp(o_i, o_n, w_neg, out=dest)
    if negative_share is None:
        return _merge_block(o_i, lse_i, q_i, k_n, v_n, -alpha, beta, valid, scale, dest=dest)
    res, w_neg = _merge_block(o_i, lse_i, q_i, k_n, v_n, -alpha, beta, valid, scale, block_weight=True, dest=dest)
    negative_share.add(w_neg.float().mean(dim=1))
    return res


_N0_MASKS: dict[tuple, tuple] = {}


def _negative_rows_mask(layout: TokenLayout, batch: int, device, valid, dtype) -> torch.Tensor:
    """[B, 1, n, L] additive mask in `dtype` (0 / -inf): N0 queries see image keys, R keys and the real
    N0 keys (all but P). n x L, not L x L: the negative rows are few. Cached per layout geometry, dtype and
    padding mask (one generation reuses it every layer); additive, because SDPA turns a bool mask into
    this one every call."""
    key = (layout.length, layout.positive.start, layout.positive.stop, layout.negative.start,
           layout.negative.stop, batch, str(device), dtype, None if valid is None else id(layout.negative_mask))
    hit = _N0_MASKS.get(key)
    if hit is not None and (valid is None or hit[1]() is layout.negative_mask):
        return hit[0]
    keys = (layout.roles(device) != 1).expand(batch, -1).clone()  # image and negative keys
    if valid is not None:
        keys[:, layout.negative] &= valid
    bias = torch.zeros(keys.shape, device=device, dtype=dtype).masked_fill_(~keys, float("-inf"))
    mask = bias[:, None, None, :].expand(-1, 1, layout.negative_len, -1).contiguous()
    if len(_N0_MASKS) > 32:
        _N0_MASKS.clear()
    ref = (lambda: None) if valid is None else weakref.ref(layout.negative_mask)
    _N0_MASKS[key] = (mask, ref)
    return mask


# ---------------------------------------------------------------------------------------------------------
# Public entry points


def vsf_joint(q, k, v, layout: TokenLayout, alpha: float, beta: float, scale=None, negative_share=None):
    """Exact joint-attention VSF (VSF-SPEC.md table) for `[B, H, L, D]` tensors in any token order.

    I rows: softmax over {I, P, R} and N1 (logits - beta, values -alpha v_N); P and R rows: plain over
    {I, P, R}; N0 rows: over {I, R, real N0}; padded positive positions are keys for nobody. Equals
    `vsf_joint_reference` within dtype tolerance with memory linear in L. Contiguous token groups are
    used as views; other orders fall back to index_select.
    `negative_share`: optional recorder of the image rows' 1 - W (module docstring)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    length, neg, pos, ref = layout.length, layout.negative, layout.positive, layout.reference
    if q.shape[2] != length:
        raise ValueError(f"sequence has {q.shape[2]} tokens, layout describes {length}")
    image_pieces = _gaps(length, (pos, neg) if ref is None else (pos, neg, ref))  # true image rows
    if not image_pieces:  # no image tokens: a text-only call, tiny; the dense reference is fine (no map)
        return vsf_joint_reference(q, k, v, layout, alpha, beta, scale)
    batch, device = q.shape[0], q.device
    if layout.negative_len == 0:
        if layout.positive_mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        keys = torch.ones(batch, length, dtype=torch.bool, device=device)
        keys[:, pos] = layout.positive_valid(batch, device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :], scale=scale)
    valid = _padding_mask(layout, batch, device)

    ip = _positions(_gaps(length, (neg,)), device)  # {I, P, R} in sequence order
    if math.isinf(beta) and layout.positive_mask is not None:  # N1 removed: the model's own masked pass
        return _masked_unguided_rows(q, k, v, layout, ip, image_pieces, valid, scale, negative_share)
    image = _positions(image_pieces, device)
    image_in_ip = _positions(_shift_past(image_pieces, neg), device)
    pos_in_ip = slice(*_shift_past([(pos.start, pos.stop)], neg)[0])

    # One pass over {I, P, R} (the unguided attention, with log-sum-exp): unmasked, or over the real
    # keys of each group of samples that share a positive mask.
    o_ip, lse_ip = _context_pass(q, k, v, layout, ip, scale)

    out = torch.empty_like(q)
    out[:, :, pos] = o_ip[:, :, pos_in_ip]
    if ref is not None:  # R rows: final from the same pass, never flipped
        out[:, :, ref] = o_ip[:, :, slice(*_shift_past([(ref.start, ref.stop)], neg)[0])]
    q_n, k_n, v_n = q[:, :, neg], k[:, :, neg], v[:, :, neg]
    o_i, lse_i = _take(o_ip, image_in_ip), lse_ip[:, :, image_in_ip]
    q_i = _take(q, image)
    if isinstance(image, slice):
        _image_rows_vsf(o_i, lse_i, q_i, k_n, v_n, alpha, beta, valid, scale, dest=out[:, :, image],
                        negative_share=negative_share)
    else:
        _put(out, image, _image_rows_vsf(o_i, lse_i, q_i, k_n, v_n, alpha, beta, valid, scale,
                                         negative_share=negative_share))

    # N0 rows (few queries): one SDPA call over the whole sequence with an n x L key mask (no copies).
    _negative_rows_into(q_n, k, v, layout, valid, scale, out[:, :, neg])
    return out


def _masked_unguided_rows(q, k, v, layout: TokenLayout, ip, image_pieces, valid, scale, negative_share):
    """VSF with beta = +inf and a positive mask: A- = 0, so every {I, P, R} row is plain attention over
    {I, real P, R}, the model's own masked pass, and runs as the model runs it: one SDPA call over those
    rows with the padding as a key mask. (The maskless LSE pass over the gathered real keys of
    `_context_pass` is exact too, but sums in another order: a few ULPs off the model's masked kernel.)
    N0 rows as always."""
    batch, device = q.shape[0], q.device
    keys = torch.ones(batch, layout.length, dtype=torch.bool, device=device)
    keys[:, layout.positive] = layout.positive_valid(batch, device)
    keys = keys[:, ip] if isinstance(ip, slice) else keys.index_select(1, ip)
    out = torch.empty_like(q)
    _put(out, ip, F.scaled_dot_product_attention(_take(q, ip), _take(k, ip), _take(v, ip),
                                                 attn_mask=keys[:, None, None, :], scale=scale))
    if negative_share is not None:  # A- = 0: no mass on the negative
        rows = sum(b - a for a, b in image_pieces)
        negative_share.add(torch.zeros(batch, rows, dtype=torch.float32, device=device))
    _negative_rows_into(q[:, :, layout.negative], k, v, layout, valid, scale, out[:, :, layout.negative])
    return out


_GROUP_CACHE: dict[tuple, tuple[weakref.ref, list | None]] = {}


def _positive_groups(layout: TokenLayout, batch: int, device) -> list | None:
    """None when every positive position is real (or there is no mask); else one (samples, keys) per
    distinct positive mask in the batch: `samples` the batch rows (None: all of them), `keys` the
    positions of {I, real P, R} (a slice when contiguous). Cached per mask tensor and geometry, so a
    GPU mask costs one sync per generation, not per attention call."""
    mask = layout.positive_mask
    if mask is None:
        return None
    key = (id(mask), batch, str(device), layout.length, layout.positive.start, layout.positive.stop,
           layout.negative.start, layout.negative.stop)
    hit = _GROUP_CACHE.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    rows = layout.positive_valid(batch, "cpu")
    groups = None
    if not bool(rows.all()):
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        groups = []
        for g, row in enumerate(distinct):
            padded = [slice(layout.positive.start + j, layout.positive.start + j + 1)
                      for j in range(row.numel()) if not row[j]]
            keys = _positions(_gaps(layout.length, [layout.negative] + padded), device)
            members = torch.nonzero(inverse == g, as_tuple=False).flatten()
            groups.append((None if members.numel() == batch else members.to(device), keys))
    if len(_GROUP_CACHE) > 64:
        _GROUP_CACHE.clear()
    _GROUP_CACHE[key] = (weakref.ref(mask), groups)
    return groups


def _context_pass(q, k, v, layout: TokenLayout, ip, scale):
    """Rows {I, P, R} over keys {I, real P, R}: (output, LSE). Without padded positive positions this is
    the one unmasked pass over `ip`; with them, one unmasked pass per group of samples sharing a mask,
    over that group's real keys only (exact, still no Lq x Lk mask)."""
    groups = _positive_groups(layout, q.shape[0], q.device)
    q_ip = _take(q, ip)
    if groups is None:
        return attention_lse(q_ip, _take(k, ip), _take(v, ip), scale)
    if len(groups) == 1:
        keys = groups[0][1]
        return attention_lse(q_ip, _take(k, keys), _take(v, keys), scale)
    out, lse = None, None
    for samples, keys in groups:
        o_g, lse_g = attention_lse(q_ip.index_select(0, samples), _take(k.index_select(0, samples), keys),
                                   _take(v.index_select(0, samples), keys), scale)
        if out is None:
            out = o_g.new_empty(q_ip.shape)
            lse = lse_g.new_empty(q_ip.shape[:3])
        out.index_copy_(0, samples, o_g)
        lse.index_copy_(0, samples, lse_g)
    return out, lse


def _negative_rows_into(q_n, k, v, layout: TokenLayout, valid, scale, dest):
    """N0 rows into `dest`: the split-key Triton kernel where usable, else one masked SDPA call."""
    mod = _triton_kernel("n0", q_n, lambda m: m.supports_negative_rows(q_n, q_n.shape[2]))
    if mod is not None:
        try:
            return mod.negative_rows(q_n, k, v, layout.positive, layout.negative, valid, scale, dest)
        except Exception as err:  # noqa: BLE001
            _triton_failed("n0", q_n, err)
    dest.copy_(F.scaled_dot_product_attention(
        q_n, k, v, attn_mask=_negative_rows_mask(layout, q_n.shape[0], q_n.device, valid, q_n.dtype), scale=scale))
    return dest


def negative_rows(q, k, v, layout: TokenLayout, scale=None):
    """Outputs of the N0 rows (the negative text stream): attention over image keys, reference-image
    keys and the real N0 keys (every key but P), one SDPA call with an n x L mask. Shared by VSF, NAG
    and NASA."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    valid = _padding_mask(layout, q.shape[0], q.device)
    q_n = q[:, :, layout.negative]
    mod = _triton_kernel("n0", q_n, lambda m: m.supports_negative_rows(q_n, q_n.shape[2]))
    if mod is not None:
        try:
            return mod.negative_rows(q_n, k, v, layout.positive, layout.negative, valid, scale)
        except Exception as err:  # noqa: BLE001
            _triton_failed("n0", q_n, err)
    mask = _negative_rows_mask(layout, q.shape[0], q.device, valid, q.dtype)
    return F.scaled_dot_product_attention(q_n, k, v, attn_mask=mask, scale=scale)


def image_over_image_and_negative(q_img, k_img, v_img, k_neg, v_neg, layout: TokenLayout, scale=None):
    """Attention of image rows over {I, R, real N} (NAG's Z-; `k_img`/`v_img` are the {I, R} keys) without
    copying keys into one sequence or masking: a maskless pass over them with its LSE, merged exactly
    with the negative block."""
    scale = 1.0 / math.sqrt(q_img.shape[-1]) if scale is None else scale
    valid = _padding_mask(layout, q_img.shape[0], q_img.device)
    o_i, lse_i = attention_lse(q_img, k_img, v_img, scale)
    return _image_rows_vsf(o_i, lse_i, q_img, k_neg, v_neg, -1.0, 0.0, valid, scale)


def _vsf_cross_sdpa(q, k, v, layout: TokenLayout, alpha: float, beta: float, scale=None):
    """Cross-attention VSF in one SDPA call with a `[B, 1, 1, Lk]` additive key bias (general case)."""
    batch, device = q.shape[0], q.device
    roles = layout.roles(device)
    is_negative = roles == NEGATIVE
    value_scale = torch.where(is_negative, -alpha, 1.0).to(v.dtype)
    values = v * value_scale[:, None]
    bias = torch.where(is_negative, -beta, 0.0).to(q.dtype).expand(batch, -1).clone()
    real = layout.negative_valid(batch, device)
    bias[:, layout.negative] = bias[:, layout.negative].masked_fill(~real, float("-inf"))
    if layout.positive_mask is not None:
        real_p = layout.positive_valid(batch, device)
        bias[:, layout.positive] = bias[:, layout.positive].masked_fill(~real_p, float("-inf"))
    bias[:, roles == 0] = float("-inf")  # image-role keys are not text: the reference leaves them out
    return F.scaled_dot_product_attention(q, k, values, attn_mask=bias[:, None, None, :], scale=scale)


def _cross_share_from_logits(q, k, layout: TokenLayout, beta: float, scale) -> torch.Tensor:
    """1 - W of cross-attention queries from the logits alone ([B, Lq], head mean), for the general
    single-SDPA form, which returns no LSE. Text keys are few, so the [B, H, Lq, Lk] logits are small;
    the output itself is not recomputed."""
    cd = _compute_dtype(q.dtype)
    roles = layout.roles(q.device)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    neg_s = s[..., roles == NEGATIVE] - beta
    neg_s = neg_s.masked_fill(~layout.negative_valid(q.shape[0], q.device)[:, None, None, :], float("-inf"))
    lse_n = torch.logsumexp(neg_s, dim=-1)
    pos_s = s[..., roles == 1]
    if layout.positive_mask is not None:
        pos_s = pos_s.masked_fill(~layout.positive_valid(q.shape[0], q.device)[:, None, None, :], float("-inf"))
    lse_p = torch.logsumexp(pos_s, dim=-1)  # -inf without positive keys: the share is 1
    return torch.sigmoid(lse_n - lse_p).mean(dim=1)


def vsf_cross(q, k, v, layout: TokenLayout, alpha: float, beta: float, scale=None, negative_share=None):
    """Exact cross-attention VSF (paper eq. 9): image queries over text keys `[P, N]` laid out by
    `layout`: softmax([s_P, s_N - beta]) [V_P; -alpha V_N]. One maskless pass over P with its LSE,
    merged with the negative block; the general single-SDPA form covers unusual layouts.
    `negative_share`: optional recorder of every query's 1 - W (module docstring)."""
    check_cross_layout(layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if (layout.negative_len == 0 or layout.positive_len == 0 or layout.positive_mask is not None
            or _gaps(layout.length, (layout.positive, layout.negative))):
        if negative_share is not None and layout.negative_len:
            negative_share.add(_cross_share_from_logits(q, k, layout, beta, scale))
        return _vsf_cross_sdpa(q, k, v, layout, alpha, beta, scale)
    valid = _padding_mask(layout, q.shape[0], q.device)
    pos, neg = layout.positive, layout.negative
    o_p, lse_p = attention_lse(q, k[:, :, pos], v[:, :, pos], scale)
    return _image_rows_vsf(o_p, lse_p, q, k[:, :, neg], v[:, :, neg], alpha, beta, valid, scale,
                           negative_share=negative_share)
