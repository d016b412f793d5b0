"""Reference attention for VSF, NAG and NASA: dense masks, plain softmax, nothing clever.

These functions are the readable statement of what guidance computes; the production entry points in
`lib_vsf.attention` must agree with them, and the tests check these against the paper's equations.
All tensors are `[batch, heads, tokens, head_dim]`. Math runs in float32 (float64 stays float64).

Joint attention (VSF, paper section 3.2): a second key/value group N1 is appended, keys = the keys of
the negative tokens N0, values = -alpha x their values. Who sees whom (R: reference-image tokens, when
the layout has them; VSF-SPEC, "Families beyond the paper"):

    query \\ key |  I  |  P  |  R  |  N0 |  N1
    I           | yes | yes | yes |  no | yes, logit - beta
    P           | yes | yes | yes |  no | no
    R           | yes | yes | yes |  no | no
    N0          | yes |  no | yes | yes | no

R is never flipped: an R row is computed exactly like a P row. Padded positive positions
(`TokenLayout.positive_mask`) and padded negatives (`negative_mask`) are keys for nobody.

Cross-attention (VSF, paper eq. 9): image queries over `[P, N]` with the N logits shifted by -beta and
the N values multiplied by -alpha. A cross layout has no R (a reference raises ValueError).

NAG and NASA in joint attention: image rows are guided, every other row is the plain row of the table
above without N1. Z+ = image queries over {I, P, R}; Z- = image queries over {N} (NASA) or {I, R, N}
(NAG: the context the image sees with the negative in place of the positive; R is conditioning the
image sees in either pass, like the N0 rows do).

Both VSF functions take an optional `negative_share` recorder (see `lib_vsf.state.NegativeShareMap`):
when given, it receives, per image query, the softmax mass on the negative keys, `1 - W` (paper eq. 8),
averaged over heads, `[B, image tokens]` in sequence order (true image rows only, never R rows). It is
read off the same softmax.
"""
from __future__ import annotations

import math

import torch

from ..layout import IMAGE, NEGATIVE, POSITIVE, REFERENCE, TokenLayout


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def masked_attention(q, k, v, allow, bias=None, scale=None, weights_on=None):
    """softmax(q k^T * scale + bias, masked to `allow`) v. `allow`: bool, broadcastable to
    [B, H, Lq, Lk]; `bias`: additive logits of the same shape or None. With `weights_on` (bool [Lk]),
    returns (output, [B, H, Lq] softmax mass on those keys)."""
    dtype = _compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits.masked_fill(~allow, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v.to(dtype))
    if weights_on is None:
        return out
    return out, probs[..., weights_on].sum(dim=-1)


def _real_keys(layout: TokenLayout, batch: int, device) -> torch.Tensor:
    """[B, L] bool: positions that are real tokens of each sample (padded P and N positions are not)."""
    real = torch.ones(batch, layout.length, dtype=torch.bool, device=device)
    real[:, layout.negative] = layout.negative_valid(batch, device)
    if layout.positive_mask is not None:
        real[:, layout.positive] = layout.positive_valid(batch, device)
    return real


def _key_allow(layout: TokenLayout, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample key masks over the sequence: ([B, L] keys of I, P and R rows = {I, real P, R},
    [B, L] keys of N0 rows = {I, R, real N0})."""
    roles = layout.roles(device)
    real = _real_keys(layout, batch, device)
    context = (roles != NEGATIVE) & real
    negative_context = (roles != POSITIVE) & real
    return context, negative_context


def plain_rows(q, k, v, layout: TokenLayout, scale=None):
    """Output for every query row as the unguided model would see it *with* the negative in the text
    stream: I, P and R rows attend to {I, P, R}; N0 rows attend to {I, R, N0} (their own stream)."""
    batch = q.shape[0]
    roles = layout.roles(q.device)
    ip, i_n = _key_allow(layout, batch, q.device)
    query_is_negative = (roles == NEGATIVE)[None, :, None]  # [1, Lq, 1]
    allow = torch.where(query_is_negative, i_n[:, None, :], ip[:, None, :])[:, None]  # [B, 1, Lq, Lk]
    return masked_attention(q, k, v, allow, scale=scale)


def vsf_joint_reference(q, k, v, layout: TokenLayout, alpha: float, beta: float, scale=None, negative_share=None):
    """VSF in joint attention, built exactly as the table in the module docstring."""
    batch, _, length, _ = q.shape
    device = q.device
    dtype = _compute_dtype(q)
    neg = layout.negative
    keys = torch.cat([k, k[:, :, neg]], dim=2)
    values = torch.cat([v.to(dtype), -alpha * v[:, :, neg].to(dtype)], dim=2)

    roles = layout.roles(device)
    n1_valid = layout.negative_valid(batch, device)  # [B, n]
    ip, i_n = _key_allow(layout, batch, device)
    q_role = roles[None, :, None]
    n1_cols = (q_role == IMAGE) & n1_valid[:, None, :]  # only image queries see N1
    main_cols = torch.where(q_role == NEGATIVE, i_n[:, None, :], ip[:, None, :])
    allow = torch.cat([main_cols, n1_cols], dim=2)[:, None]  # [B, 1, L, L + n]

    bias = torch.zeros(length, length + layout.negative_len, dtype=dtype, device=device)
    bias[:, length:] = -beta
    if negative_share is None:
        return masked_attention(q, keys, values, allow, bias, scale=scale).to(q.dtype)
    on_n1 = torch.zeros(length + layout.negative_len, dtype=torch.bool, device=device)
    on_n1[length:] = True
    out, mass = masked_attention(q, keys, values, allow, bias, scale=scale, weights_on=on_n1)
    negative_share.add(mass[:, :, roles == IMAGE].mean(dim=1))
    return out.to(q.dtype)


def check_cross_layout(layout: TokenLayout) -> None:
    """Cross-attention keys are text: a layout with reference-image tokens is a caller's mistake."""
    if layout.reference is not None:
        raise ValueError("cross-attention layouts have no reference-image tokens (R); "
                         f"got reference={layout.reference}")


def vsf_cross_reference(q, k, v, layout: TokenLayout, alpha: float, beta: float, scale=None, negative_share=None):
    """VSF in cross-attention (paper eq. 9): softmax([s_P, s_N - beta]) [V_P; -alpha V_N].
    `layout` describes the keys; queries are all image tokens."""
    check_cross_layout(layout)
    batch = q.shape[0]
    device = q.device
    dtype = _compute_dtype(q)
    roles = layout.roles(device)
    allow = (_real_keys(layout, batch, device) & (roles != IMAGE))[:, None, None, :]
    is_negative = roles == NEGATIVE
    bias = torch.where(is_negative, -beta, 0.0).to(dtype)
    value_scale = torch.where(is_negative, -alpha, 1.0).to(dtype)[:, None]
    if negative_share is None:
        return masked_attention(q, k, v.to(dtype) * value_scale, allow, bias, scale=scale).to(q.dtype)
    out, mass = masked_attention(q, k, v.to(dtype) * value_scale, allow, bias, scale=scale, weights_on=is_negative)
    negative_share.add(mass.mean(dim=1))
    return out.to(q.dtype)


def _guided_parts(q, k, v, layout: TokenLayout, cross: bool, negative_sees_image: bool, scale=None):
    """(Z+, Z-) for image queries. Joint: Z+ over {I, P, R}, Z- over {N} (NASA) or {I, R, N} (NAG).
    Cross: Z+ over {P}, Z- over {N}. Padded P and N positions are left out."""
    if cross:
        check_cross_layout(layout)
    batch = q.shape[0]
    roles = layout.roles(q.device)
    real = _real_keys(layout, batch, q.device)
    positive_keys = (roles != NEGATIVE if not cross else roles == POSITIVE) & real
    negative_keys = (roles == NEGATIVE) & real
    if negative_sees_image and not cross:
        negative_keys = negative_keys | (roles == IMAGE) | (roles == REFERENCE)
    z_plus = masked_attention(q, k, v, positive_keys[:, None, None, :], scale=scale)
    # A sample without negative tokens would give an all-masked row; give it Z+ (guidance off).
    has_negative = layout.has_negative(batch, q.device)
    safe_negative = torch.where(has_negative[:, None], negative_keys, positive_keys)
    z_minus = masked_attention(q, k, v, safe_negative[:, None, None, :], scale=scale)
    return z_plus, z_minus, has_negative


def _image_rows(layout: TokenLayout, device) -> torch.Tensor:
    return (layout.roles(device) == IMAGE)[None, None, :, None]


def nasa_reference(q, k, v, layout: TokenLayout, alpha: float, cross: bool, scale=None):
    """NASA: Z = Z+ - a Z-, Z- = attention over the negative tokens alone (image rows only)."""
    z_plus, z_minus, has_negative = _guided_parts(q, k, v, layout, cross, False, scale)
    guided = z_plus - alpha * z_minus
    guided = torch.where(has_negative[:, None, None, None], guided, z_plus)
    if cross:
        return guided.to(q.dtype)
    rows = plain_rows(q, k, v, layout, scale)
    return torch.where(_image_rows(layout, q.device), guided, rows).to(q.dtype)


def nag_combine(z_plus, z_minus, phi: float, blend: float, tau: float):
    """NAG: Zt = Z+ + phi (Z+ - Z-); cap ||Zt||_1 / ||Z+||_1 at tau per token (over all heads and
    channels); Z = blend Zt + (1 - blend) Z+. Inputs [B, H, L, D]."""
    z_t = z_plus + phi * (z_plus - z_minus)
    norm_plus = z_plus.abs().sum(dim=(1, 3), keepdim=True)
    norm_t = z_t.abs().sum(dim=(1, 3), keepdim=True)
    ratio = norm_t / norm_plus.clamp_min(torch.finfo(norm_plus.dtype).tiny)
    z_t = torch.where(ratio > tau, z_t * (tau / ratio), z_t)
    return blend * z_t + (1.0 - blend) * z_plus


def nag_reference(q, k, v, layout: TokenLayout, phi: float, blend: float, tau: float, cross: bool, scale=None):
    """NAG on image rows; Z- = image queries over [I, R, N] (joint) or [N] (cross)."""
    z_plus, z_minus, has_negative = _guided_parts(q, k, v, layout, cross, True, scale)
    guided = nag_combine(z_plus, z_minus, phi, blend, tau)
    guided = torch.where(has_negative[:, None, None, None], guided, z_plus)
    if cross:
        return guided.to(q.dtype)
    rows = plain_rows(q, k, v, layout, scale)
    return torch.where(_image_rows(layout, q.device), guided, rows).to(q.dtype)
