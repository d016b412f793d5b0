"""VSF attention implementations used in production (see attention.py for the entry points).

Cross-attention needs no Lq x Lk mask: the -beta bias depends on the key only, so it is a `[B, 1, 1, Lk]`
additive row broadcast over queries, and the sign flip is a scaled copy of the (short) text values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_reference import vsf_joint_reference
from .layout import NEGATIVE, TokenLayout


def vsf_cross(q, k, v, layout: TokenLayout, alpha: float, beta: float, scale=None):
    """Exact cross-attention VSF (paper eq. 9) in one SDPA call; keys/values laid out by `layout`."""
    batch, device = q.shape[0], q.device
    is_negative = layout.roles(device) == NEGATIVE
    value_scale = torch.where(is_negative, -alpha, 1.0).to(v.dtype)
    values = v * value_scale[:, None]
    bias = torch.where(is_negative, -beta, 0.0).to(q.dtype).expand(batch, -1).clone()
    real = layout.negative_valid(batch, device)
    bias[:, layout.negative] = bias[:, layout.negative].masked_fill(~real, float("-inf"))
    # Rows outside the text (image-conditioning keys) are not ours to see: the caller passes text only.
    return F.scaled_dot_product_attention(q, k, values, attn_mask=bias[:, None, None, :], scale=scale)


def vsf_joint(q, k, v, layout: TokenLayout, alpha: float, beta: float, scale=None):
    """Exact joint-attention VSF."""
    return vsf_joint_reference(q, k, v, layout, alpha, beta, scale)
