"""Optional fused Triton kernels for the fast exact VSF path (`fast.py`).

Imported lazily by `fast.py` and only for CUDA tensors (or when forced under the Triton CPU
interpreter, `TRITON_INTERPRET=1 VSF_TRITON=1`, which is how the tests check the math without a GPU).
Without Triton (`import triton` fails: CPU-only wheels, Windows) `AVAILABLE` is False and nothing here
is used; `fast.py` keeps its torch path.

Two kernels:

* `image_rows_vsf`: the image-row merge (tensor-core dots for 16-bit inputs, a float32 loop over the
  keys for float32). Given the main pass over {I, P} (output `o_i`, log-sum-exp
  `lse_i`) it attends each image row over the few negative keys N1 (logits - beta, online softmax in
  float32, padded keys masked out), and writes

      out = o_i + (1 - W) (-alpha Z- - o_i),   1 - W = A- / (A+ + A-) = sigmoid(log A- - log A+)

  straight into the destination (any strides, e.g. the image slice of the output). It reads q_i and
  o_i once and writes once: memory-bound, replacing a second attention call, a sigmoid and a strided
  lerp. 1 - W is computed directly (never as 1 - W) and everything is float32 until the single store.

* `negative_rows`: the N0 rows (the negative text stream, few queries) over the image keys, the
  reference-image keys R (when the model has them) and the real N0 keys, i.e. every key but the
  positive span and padded negatives. Few queries and many keys:
  split over the keys (flash-decoding), partial (max, sum, acc) per split in float32, then a tiny
  combine. 16-bit dtypes only (the key loop uses tensor-core dots; float32 would need IEEE dots that
  differ between Triton versions), others use SDPA.
"""
from __future__ import annotations

import os

import torch

try:  # feature detection: a missing or broken Triton only disables the kernels
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # noqa: BLE001
    triton = tl = None
    AVAILABLE = False

MAX_NEGATIVE = 256  # the merge loops over negative keys one by one; longer blocks use the torch path
MAX_HEAD_DIM = 256
MAX_N0_ROWS = 64  # queries of the N0 kernel handled in one tile
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def supports_merge(q: torch.Tensor, n_negative: int) -> bool:
    return AVAILABLE and q.dtype in _DTYPES and q.shape[-1] <= MAX_HEAD_DIM and 0 < n_negative <= MAX_NEGATIVE


def supports_negative_rows(q: torch.Tensor, n_rows: int) -> bool:
    return (AVAILABLE and q.dtype in (torch.bfloat16, torch.float16) and 16 <= q.shape[-1] <= MAX_HEAD_DIM
            and 0 < n_rows <= MAX_N0_ROWS)


if AVAILABLE:

    @triton.jit
    def _image_merge_kernel(
        q_ptr, o_ptr, lse_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, share_ptr,
        H, L, N, D,
        sqb, sqh, sql, sqd,
        sob, soh, sol, sod,
        slb, slh, sll,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        smb, smn,
        sxb, sxh, sxl, sxd,
        ssb, ssh, ssl,
        scale, beta, alpha,
        HAS_VALID: tl.constexpr, STORE_SHARE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < L
        cmask = cols < D
        tile = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)

        q = tl.load(q_ptr + b * sqb + h * sqh + rows64[:, None] * sql + cols[None, :] * sqd,
                    mask=tile, other=0.0).to(tl.float32)
        # Online softmax over the negative keys. A finite start for the running max keeps padded keys
        # (logit -inf) from producing inf - inf.
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for j in range(0, N):
            kj = tl.load(k_base + j * skn + cols * skd, mask=cmask, other=0.0).to(tl.float32)
            vj = tl.load(v_base + j * svn + cols * svd, mask=cmask, other=0.0).to(tl.float32)
            s = tl.sum(q * kj[None, :], axis=1) * scale - beta
            if HAS_VALID:
                ok = tl.load(valid_ptr + b * smb + j * smn)
                s = tl.where(ok != 0, s, float("-inf"))
            m_new = tl.maximum(m, s)
            corr = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            l = l * corr + p
            acc = acc * corr[:, None] + p[:, None] * vj[None, :]
            m = m_new

        lse_i = tl.load(lse_ptr + b * slb + h * slh + rows64 * sll, mask=rmask, other=0.0).to(tl.float32)
        has = l > 0.0
        lse_n = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))  # log A-
        w_neg = 1.0 / (1.0 + tl.exp(lse_i - lse_n))  # A- / (A+ + A-), directly; 0 when A- = 0
        if STORE_SHARE:  # the negative-attention map's 1 - W, per (batch, head, row)
            tl.store(share_ptr + b * ssb + h * ssh + rows64 * ssl, w_neg, mask=rmask)
        z_neg = acc / tl.where(has, l, 1.0)[:, None]
        o = tl.load(o_ptr + b * sob + h * soh + rows64[:, None] * sol + cols[None, :] * sod,
                    mask=tile, other=0.0).to(tl.float32)
        res = o + w_neg[:, None] * (-alpha * z_neg - o)
        tl.store(out_ptr + b * sxb + h * sxh + rows64[:, None] * sxl + cols[None, :] * sxd,
                 res.to(out_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _image_merge_dot_kernel(
        q_ptr, o_ptr, lse_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, share_ptr,
        H, L, N, D,
        sqb, sqh, sql, sqd,
        sob, soh, sol, sod,
        slb, slh, sll,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        smb, smn,
        sxb, sxh, sxl, sxd,
        ssb, ssh, ssl,
        scale, beta, alpha,
        HAS_VALID: tl.constexpr, STORE_SHARE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """The merge for 16-bit inputs with tensor-core dots over blocks of negative keys. Logits are
        exact products accumulated in float32 (as in the attention kernels); the probabilities are
        split into two 16-bit parts (hi + lo) for the value dot, so Z- keeps ~16 mantissa bits
        (a single 16-bit cast, as flash kernels do, would keep 8 in bf16)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < L
        cmask = cols < D
        tile = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        q = tl.load(q_ptr + b * sqb + h * sqh + rows64[:, None] * sql + cols[None, :] * sqd, mask=tile, other=0.0)
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for start in range(0, N, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            inside = keys < N
            use = inside
            if HAS_VALID:
                ok = tl.load(valid_ptr + b * smb + keys * smn, mask=inside, other=0)
                use = inside & (ok != 0)
            kt = tl.load(k_base + keys[None, :] * skn + cols[:, None] * skd,
                         mask=inside[None, :] & cmask[:, None], other=0.0)
            s = tl.dot(q, kt) * scale - beta
            s = tl.where(use[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            corr = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * corr + tl.sum(p, axis=1)
            vb = tl.load(v_base + keys[:, None] * svn + cols[None, :] * svd,
                         mask=inside[:, None] & cmask[None, :], other=0.0)
            p_hi = p.to(vb.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(vb.dtype)
            acc = acc * corr[:, None] + tl.dot(p_hi, vb) + tl.dot(p_lo, vb)
            m = m_new

        lse_i = tl.load(lse_ptr + b * slb + h * slh + rows64 * sll, mask=rmask, other=0.0).to(tl.float32)
        has = l > 0.0
        lse_n = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        w_neg = 1.0 / (1.0 + tl.exp(lse_i - lse_n))
        if STORE_SHARE:
            tl.store(share_ptr + b * ssb + h * ssh + rows64 * ssl, w_neg, mask=rmask)
        z_neg = acc / tl.where(has, l, 1.0)[:, None]
        o = tl.load(o_ptr + b * sob + h * soh + rows64[:, None] * sol + cols[None, :] * sod,
                    mask=tile, other=0.0).to(tl.float32)
        res = o + w_neg[:, None] * (-alpha * z_neg - o)
        tl.store(out_ptr + b * sxb + h * sxh + rows64[:, None] * sxl + cols[None, :] * sxd,
                 res.to(out_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _negative_rows_partial_kernel(
        q_ptr, k_ptr, v_ptr, valid_ptr, part_o_ptr, part_ml_ptr,
        H, LQ, LK, D, P0, P1, N0, N1, KEYS_PER_SPLIT, SPLITS,
        sqb, sqh, sql, sqd,
        skb, skh, skl, skd,
        svb, svh, svl, svd,
        smb, smn,
        scale,
        HAS_VALID: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        qr = tl.arange(0, BLOCK_Q)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        q = tl.load(q_ptr + b * sqb + h * sqh + qr[:, None].to(tl.int64) * sql + cols[None, :] * sqd,
                    mask=(qr[:, None] < LQ) & cmask[None, :], other=0.0)
        m = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        start = pid_s * KEYS_PER_SPLIT
        stop = tl.minimum(start + KEYS_PER_SPLIT, LK)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        for kb in range(start, stop, BLOCK_N):
            keys = kb + tl.arange(0, BLOCK_N)
            # keys seen by N0 rows: everything but the positive span, real negatives only
            use = (keys < stop) & ((keys < P0) | (keys >= P1))
            if HAS_VALID:
                is_neg = (keys >= N0) & (keys < N1)
                ok = tl.load(valid_ptr + b * smb + (keys - N0) * smn, mask=use & is_neg, other=1)
                use = use & ((ok != 0) | (~is_neg))
            keys64 = keys.to(tl.int64)
            kt = tl.load(k_base + keys64[None, :] * skl + cols[:, None] * skd,
                         mask=use[None, :] & cmask[:, None], other=0.0)
            s = tl.dot(q, kt) * scale
            s = tl.where(use[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            corr = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * corr + tl.sum(p, axis=1)
            vt = tl.load(v_base + keys64[:, None] * svl + cols[None, :] * svd,
                         mask=use[:, None] & cmask[None, :], other=0.0)
            acc = acc * corr[:, None] + tl.dot(p.to(vt.dtype), vt)
            m = m_new
        # partials: o [BH, SPLITS, BLOCK_Q, BLOCK_D] (unnormalised), ml [BH, SPLITS, 2, BLOCK_Q]
        slot = pid_bh.to(tl.int64) * SPLITS + pid_s
        tl.store(part_o_ptr + slot * BLOCK_Q * BLOCK_D + qr[:, None] * BLOCK_D + cols[None, :], acc)
        tl.store(part_ml_ptr + slot * 2 * BLOCK_Q + qr, m)
        tl.store(part_ml_ptr + slot * 2 * BLOCK_Q + BLOCK_Q + qr, l)

    @triton.jit
    def _negative_rows_combine_kernel(
        part_o_ptr, part_ml_ptr, out_ptr,
        H, LQ, D, SPLITS,
        sxb, sxh, sxl, sxd,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        qr = tl.arange(0, BLOCK_Q)
        cols = tl.arange(0, BLOCK_D)
        base = pid_bh.to(tl.int64) * SPLITS
        m = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        for s in range(0, SPLITS):
            m = tl.maximum(m, tl.load(part_ml_ptr + (base + s) * 2 * BLOCK_Q + qr))
        l = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for s in range(0, SPLITS):
            ms = tl.load(part_ml_ptr + (base + s) * 2 * BLOCK_Q + qr)
            ls = tl.load(part_ml_ptr + (base + s) * 2 * BLOCK_Q + BLOCK_Q + qr)
            f = tl.exp(ms - m)
            l += ls * f
            acc += tl.load(part_o_ptr + (base + s) * BLOCK_Q * BLOCK_D + qr[:, None] * BLOCK_D + cols[None, :]) * f[:, None]
        res = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        mask = (qr[:, None] < LQ) & (cols[None, :] < D)
        tl.store(out_ptr + b * sxb + h * sxh + qr[:, None].to(tl.int64) * sxl + cols[None, :] * sxd,
                 res.to(out_ptr.dtype.element_ty), mask=mask)


def _valid_arg(valid, like):
    if valid is None:
        return like, 0, 0  # never read (HAS_VALID is False)
    valid = valid.to(device=like.device, dtype=torch.uint8)
    return valid, valid.stride(0), valid.stride(1)


def _dot_merge(dtype) -> bool:
    """Tensor-core merge for 16-bit inputs; float32 keeps the exact float32 loop. Triton's CPU
    interpreter computes bf16 dots wrongly (3.9), so there bf16 takes the loop too."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "") != "1"


def image_rows_vsf(o_i, lse_i, q_i, k_n, v_n, alpha, beta, valid, scale, dest=None, share=None):
    """Fused VSF image-row merge (see the module docstring); same contract as
    `attention_fast._image_rows_vsf` for finite beta. Returns `dest` (written in place) or a new tensor.
    `share`: a float32 [B, H, L] tensor that also receives 1 - W per row (the negative-attention map);
    the output is computed exactly as without it."""
    batch, heads, length, dim = q_i.shape
    n = k_n.shape[2]
    out = torch.empty_like(o_i) if dest is None else dest
    if length == 0 or batch * heads == 0:
        return out
    valid_t, smb, smn = _valid_arg(valid, q_i)
    share_t, share_strides = (lse_i, (0, 0, 0)) if share is None else (share, share.stride())  # never written without
    block_d = max(16, _pow2(dim))
    args = (q_i, o_i, lse_i, k_n, v_n, valid_t, out, share_t, heads, length, n, dim,
            *q_i.stride(), *o_i.stride(), *lse_i.stride(), *k_n.stride(), *v_n.stride(), smb, smn, *out.stride(),
            *share_strides, float(scale), float(beta), float(alpha))
    if _dot_merge(q_i.dtype) and dim >= 16:
        block_m = 64
        _image_merge_dot_kernel[(triton.cdiv(length, block_m), batch * heads)](
            *args, HAS_VALID=valid is not None, STORE_SHARE=share is not None, BLOCK_M=block_m, BLOCK_N=16,
            BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8)
    else:
        block_m = 64 if block_d <= 64 else 32
        _image_merge_kernel[(triton.cdiv(length, block_m), batch * heads)](
            *args, HAS_VALID=valid is not None, STORE_SHARE=share is not None, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=4 if block_d <= 64 else 8)
    return out


def negative_rows(q_n, k, v, positive: slice, negative: slice, valid, scale, dest=None):
    """N0 rows: attention of `q_n` [B, H, n, D] over every key of `k`/`v` [B, H, L, D] except the
    `positive` span and the padded keys of the `negative` span (`valid` [B, n] or None): image and
    reference-image (R) keys are all seen, as in the negative pass. Writes into `dest` when given (any
    strides)."""
    batch, heads, lq, dim = q_n.shape
    lk = k.shape[2]
    out = torch.empty_like(q_n) if dest is None else dest
    if batch * heads == 0:
        return out
    valid_t, smb, smn = _valid_arg(valid, q_n)
    block_q = max(16, _pow2(lq))
    block_d = max(16, _pow2(dim))
    block_n = 64 if block_d <= 64 else 32
    # enough splits to fill the GPU (~4 programs per SM for one (batch, head) grid), whole key blocks each
    sms = torch.cuda.get_device_properties(q_n.device).multi_processor_count if q_n.is_cuda else 8
    splits = max(1, min(triton.cdiv(lk, 4 * block_n), triton.cdiv(4 * sms, batch * heads)))
    per_split = triton.cdiv(triton.cdiv(lk, splits), block_n) * block_n
    splits = triton.cdiv(lk, per_split)
    part_o = torch.empty(batch * heads * splits * block_q * block_d, device=q_n.device, dtype=torch.float32)
    part_ml = torch.empty(batch * heads * splits * 2 * block_q, device=q_n.device, dtype=torch.float32)
    _negative_rows_partial_kernel[(batch * heads, splits)](
        q_n, k, v, valid_t, part_o, part_ml,
        heads, lq, lk, dim, positive.start, positive.stop, negative.start, negative.stop, per_split, splits,
        *q_n.stride(), *k.stride(), *v.stride(), smb, smn, float(scale),
        HAS_VALID=valid is not None, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4,
    )
    _negative_rows_combine_kernel[(batch * heads,)](
        part_o, part_ml, out, heads, lq, dim, splits, *out.stride(),
        BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4,
    )
    return out
