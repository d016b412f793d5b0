"""Production attention entry points for guided attention: what every processor and host adapter calls.

`joint_attention` (MMDiT / Flux: one sequence of image, positive and negative tokens) and
`cross_attention` (Wan, UNet attn2: image queries over `[P, N]` text keys) take `[B, H, L, D]` tensors,
a `TokenLayout` and a `Guidance`, and return `[B, H, Lq, D]`. They must agree with
`lib_vsf.attention.reference` (tests check it); the VSF path picks its implementation in
`lib_vsf.attention.fast` by device, dtype and torch version.

Both take an optional `negative_share` recorder (`lib_vsf.state.NegativeShareMap`, default None): for
VSF it receives each image query's share of attention mass on the flipped negative, `1 - W` (paper
eq. 8), averaged over heads, from the call's own log-sum-exps (no second pass). NAG and NASA have no W
and record nothing (the recorder says the map is undefined for them).

Reference-image tokens R (`TokenLayout.reference`, Flux Kontext / Qwen-Image-Edit) and the model's own
positive-text mask (`TokenLayout.positive_mask`) follow the table in `lib_vsf.attention.reference`:
R rows are plain rows over {I, P, R}, N0 rows see {I, R, N0}, padded P positions are keys for nobody.
NAG / NASA: Z+ = image queries over {I, P, R}; Z- over {N} (NASA) or {I, R, N} (NAG). Cross-attention
layouts carry no R (ValueError); their positive mask leaves padded P keys out of Z+.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fast as attention_fast
from .reference import check_cross_layout, nag_combine
from ..layout import IMAGE, NEGATIVE, POSITIVE, REFERENCE, TokenLayout


@dataclass(frozen=True)
class Guidance:
    """What one attention call applies: the method and its numbers for this step (see settings.py)."""

    method: str = "vsf"
    alpha: float = 3.3
    beta: float = 0.2
    tau: float = 2.5

    @classmethod
    def from_settings(cls, settings, alpha: float | None = None) -> "Guidance":
        return cls(settings.method, settings.alpha if alpha is None else alpha, settings.beta, settings.tau)


def sdpa(q, k, v, key_mask=None, scale=None):
    """SDPA with an optional per-sample key mask `[B, Lk]` (True = attend). The mask is broadcast over
    queries, so it costs Lk, not Lq x Lk, memory."""
    mask = None if key_mask is None else key_mask[:, None, None, :].to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _positions(layout: TokenLayout, roles: tuple[int, ...], device) -> torch.Tensor:
    r = layout.roles(device)
    keep = torch.zeros_like(r, dtype=torch.bool)
    for role in roles:
        keep |= r == role
    return torch.nonzero(keep, as_tuple=False).flatten()


def _as_span(index: torch.Tensor) -> slice | torch.Tensor:
    """A slice when the positions are contiguous (a view, no copy), else the index itself."""
    if index.numel() and int(index[-1] - index[0]) + 1 == index.numel():
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _take(t: torch.Tensor, span) -> torch.Tensor:
    return t[:, :, span] if isinstance(span, slice) else t.index_select(2, span)


def _unguided(q, k, v, layout: TokenLayout, scale):
    """The model's own pass: every key, padded positive positions left out (when there is a mask)."""
    if layout.positive_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    keys = torch.ones(q.shape[0], layout.length, dtype=torch.bool, device=q.device)
    keys[:, layout.positive] = layout.positive_valid(q.shape[0], q.device)
    return sdpa(q, k, v, keys, scale=scale)


def joint_attention(q, k, v, layout: TokenLayout, guidance: Guidance, scale=None, negative_share=None):
    """Guided joint attention over a sequence laid out by `layout` (any token order)."""
    if layout.negative_len == 0:
        return _unguided(q, k, v, layout, scale)
    if guidance.method == "vsf":
        if negative_share is None:  # the default call, exactly as without the map
            return attention_fast.vsf_joint(q, k, v, layout, guidance.alpha, guidance.beta, scale)
        return attention_fast.vsf_joint(q, k, v, layout, guidance.alpha, guidance.beta, scale,
                                        negative_share=negative_share)
    return _baseline_joint(q, k, v, layout, guidance, scale)


def cross_attention(q, k, v, layout: TokenLayout, guidance: Guidance, scale=None, negative_share=None):
    """Guided cross-attention: image queries over text keys laid out by `layout`."""
    check_cross_layout(layout)
    if layout.negative_len == 0:
        return _unguided(q, k, v, layout, scale)
    if guidance.method == "vsf":
        if negative_share is None:
            return attention_fast.vsf_cross(q, k, v, layout, guidance.alpha, guidance.beta, scale)
        return attention_fast.vsf_cross(q, k, v, layout, guidance.alpha, guidance.beta, scale,
                                        negative_share=negative_share)
    batch, device = q.shape[0], q.device
    pos = _take_keys(layout, (POSITIVE,), device)
    pos_mask = None if layout.positive_mask is None else layout.positive_valid(batch, device)
    z_plus = sdpa(q, _take(k, pos), _take(v, pos), pos_mask, scale=scale)
    neg = _take_keys(layout, (NEGATIVE,), device)
    neg_mask = layout.negative_valid(batch, device)
    return _combine(q, z_plus, _take(k, neg), _take(v, neg), neg_mask, neg_mask.any(dim=-1), guidance, scale)


def _take_keys(layout, roles, device):
    return _as_span(_positions(layout, roles, device))


def _combine(q_img, z_plus, k_neg, v_neg, key_mask, has_negative, guidance, scale):
    """NASA or NAG of (Z+, Z-) for image rows, Z- = attention over (k_neg, v_neg) under `key_mask`.
    Samples without negative tokens keep Z+ (so an empty negative is exactly the unguided pass)."""
    # Samples without negatives get one dummy key so SDPA sees no all-masked row; they keep Z+ below.
    safe_mask = key_mask.clone()
    safe_mask[~has_negative, 0] = True
    z_minus = sdpa(q_img, k_neg, v_neg, safe_mask, scale=scale)
    return _guided(z_plus, z_minus, has_negative, guidance)


def _guided(z_plus, z_minus, has_negative, guidance):
    if guidance.method == "nasa":
        guided = z_plus - guidance.alpha * z_minus
    else:
        guided = nag_combine(z_plus.float(), z_minus.float(), guidance.alpha, guidance.beta, guidance.tau)
    return torch.where(has_negative[:, None, None, None], guided.to(z_plus.dtype), z_plus)


def _context_mask(layout: TokenLayout, context, batch: int, device) -> torch.Tensor | None:
    """[B, len(context)] real-key mask of the {I, P, R} keys, or None without a positive mask."""
    if layout.positive_mask is None:
        return None
    real = torch.ones(batch, layout.length, dtype=torch.bool, device=device)
    real[:, layout.positive] = layout.positive_valid(batch, device)
    return real[:, context] if isinstance(context, slice) else real.index_select(1, context)


def _baseline_joint(q, k, v, layout: TokenLayout, guidance: Guidance, scale):
    """NAG / NASA in joint attention: image rows guided, P and R rows over {I, P, R}, N0 rows over
    {I, R, N0}. No key copies and no Lq x Lk masks: N0 rows and NAG's Z- come from `fast.py`'s helpers;
    a positive mask is a [B, Lk] key mask."""
    batch, device = q.shape[0], q.device
    out = torch.empty_like(q)
    context = _take_keys(layout, (IMAGE, POSITIVE, REFERENCE), device)
    image = _take_keys(layout, (IMAGE,), device)
    neg_valid = layout.negative_valid(batch, device)
    has_negative = neg_valid.any(dim=-1)
    context_mask = _context_mask(layout, context, batch, device)

    # P and R rows: the plain pass over {I, P, R}.  N0 rows: their own stream over {I, R, N0}.
    k_ctx, v_ctx = _take(k, context), _take(v, context)
    out[:, :, layout.positive] = sdpa(q[:, :, layout.positive], k_ctx, v_ctx, context_mask, scale=scale)
    if layout.reference is not None:
        ref = layout.reference
        out[:, :, ref] = sdpa(q[:, :, ref], k_ctx, v_ctx, context_mask, scale=scale)
    out[:, :, layout.negative] = attention_fast.negative_rows(q, k, v, layout, scale)
    # Image rows: Z+ over {I, P, R}; Z- over {N} (NASA) or {I, R, N} (NAG).
    q_img = _take(q, image)
    z_plus = sdpa(q_img, k_ctx, v_ctx, context_mask, scale=scale)
    k_neg, v_neg = k[:, :, layout.negative], v[:, :, layout.negative]
    if guidance.method == "nasa":
        guided = _combine(q_img, z_plus, k_neg, v_neg, neg_valid, has_negative, guidance, scale)
    else:
        seen = image if layout.reference is None else _take_keys(layout, (IMAGE, REFERENCE), device)
        z_minus = attention_fast.image_over_image_and_negative(
            q_img, _take(k, seen), _take(v, seen), k_neg, v_neg, layout, scale)
        guided = _guided(z_plus, z_minus, has_negative, guidance)
    if isinstance(image, slice):
        out[:, :, image] = guided
    else:
        out.index_copy_(2, image, guided)
    return out
