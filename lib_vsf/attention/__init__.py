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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fast as attention_fast
from .reference import nag_combine
from ..layout import IMAGE, NEGATIVE, POSITIVE, TokenLayout


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


def joint_attention(q, k, v, layout: TokenLayout, guidance: Guidance, scale=None, negative_share=None):
    """Guided joint attention over a sequence laid out by `layout` (any token order)."""
    if layout.negative_len == 0:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if guidance.method == "vsf":
        if negative_share is None:  # the default call, exactly as without the map
            return attention_fast.vsf_joint(q, k, v, layout, guidance.alpha, guidance.beta, scale)
        return attention_fast.vsf_joint(q, k, v, layout, guidance.alpha, guidance.beta, scale,
                                        negative_share=negative_share)
    return _baseline_joint(q, k, v, layout, guidance, scale)


def cross_attention(q, k, v, layout: TokenLayout, guidance: Guidance, scale=None, negative_share=None):
    """Guided cross-attention: image queries over text keys laid out by `layout`."""
    if layout.negative_len == 0:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if guidance.method == "vsf":
        if negative_share is None:
            return attention_fast.vsf_cross(q, k, v, layout, guidance.alpha, guidance.beta, scale)
        return attention_fast.vsf_cross(q, k, v, layout, guidance.alpha, guidance.beta, scale,
                                        negative_share=negative_share)
    batch, device = q.shape[0], q.device
    pos = _take_keys(layout, (POSITIVE,), device)
    z_plus = sdpa(q, _take(k, pos), _take(v, pos), scale=scale)
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


def _baseline_joint(q, k, v, layout: TokenLayout, guidance: Guidance, scale):
    """NAG / NASA in joint attention: image rows guided, P rows over {I, P}, N0 rows over {I, N0}.
    No key copies and no Lq x Lk masks: N0 rows and NAG's Z- come from `fast.py`'s helpers."""
    batch, device = q.shape[0], q.device
    out = torch.empty_like(q)
    image_positive = _take_keys(layout, (IMAGE, POSITIVE), device)
    image = _take_keys(layout, (IMAGE,), device)
    neg_valid = layout.negative_valid(batch, device)
    has_negative = neg_valid.any(dim=-1)

    # P rows: the plain pass over {I, P}.  N0 rows: their own stream over {I, N0}.
    k_ip, v_ip = _take(k, image_positive), _take(v, image_positive)
    out[:, :, layout.positive] = sdpa(q[:, :, layout.positive], k_ip, v_ip, scale=scale)
    out[:, :, layout.negative] = attention_fast.negative_rows(q, k, v, layout, scale)
    # Image rows: Z+ over {I, P}; Z- over {N} (NASA) or {I, N} (NAG).
    q_img = _take(q, image)
    z_plus = sdpa(q_img, k_ip, v_ip, scale=scale)
    k_neg, v_neg = k[:, :, layout.negative], v[:, :, layout.negative]
    if guidance.method == "nasa":
        guided = _combine(q_img, z_plus, k_neg, v_neg, neg_valid, has_negative, guidance, scale)
    else:
        z_minus = attention_fast.image_over_image_and_negative(
            q_img, _take(k, image), _take(v, image), k_neg, v_neg, layout, scale)
        guided = _guided(z_plus, z_minus, has_negative, guidance)
    if isinstance(image, slice):
        out[:, :, image] = guided
    else:
        out.index_copy_(2, image, guided)
    return out
