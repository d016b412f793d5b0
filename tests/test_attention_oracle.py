"""The attention math against the paper's equations (VSF-SPEC.md, "Equivalence" and "Baselines").

The oracles here are written from the equations, independently of lib_vsf's implementation: plain
exp/sum arithmetic per query row, float64.
"""
import math

import pytest
import torch

from lib_vsf.attention import Guidance, cross_attention, joint_attention
from lib_vsf.attention.reference import (
    nag_reference,
    nasa_reference,
    vsf_cross_reference,
    vsf_joint_reference,
)
from lib_vsf.layout import TokenLayout, text_layout

B, H, D = 2, 3, 8


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def qkv(length, seed=0):
    return rand(B, H, length, D, seed=seed), rand(B, H, length, D, seed=seed + 1), rand(B, H, length, D, seed=seed + 2)


def eq78_image_row(q_row, k_plus, v_plus, k_neg, v_neg, alpha, beta):
    """Paper eq. 7/8: W = A+/(A+ + A-), Z = W Z+ - alpha (1 - W) Z-, for one query row."""
    s_plus = (k_plus @ q_row) / math.sqrt(q_row.shape[-1])
    s_neg = (k_neg @ q_row) / math.sqrt(q_row.shape[-1]) - beta
    a_plus, a_minus = s_plus.exp().sum(), s_neg.exp().sum()
    z_plus = (s_plus.exp()[:, None] * v_plus).sum(0) / a_plus
    z_minus = (s_neg.exp()[:, None] * v_neg).sum(0) / a_minus
    w = a_plus / (a_plus + a_minus)
    return w * z_plus - alpha * (1 - w) * z_minus


def plain_row(q_row, k_sel, v_sel):
    s = (k_sel @ q_row) / math.sqrt(q_row.shape[-1])
    return (s.exp()[:, None] * v_sel).sum(0) / s.exp().sum()


LAYOUTS = {
    # diffusers SD3: [I, P, N0]
    "image_first": lambda: text_layout(5, 3, offset=7),
    # SAI MMDiT / Flux: text first, [P, N0, I]
    "text_first": lambda: text_layout(5, 3, offset=0, total=15),
    # negative first in the text stream: [N0, P, I]
    "negative_first": lambda: text_layout(5, 3, negative_first=True, total=15),
}


@pytest.mark.parametrize("impl", ["reference", "production"])
@pytest.mark.parametrize("order", sorted(LAYOUTS))
def test_joint_vsf_matches_equation_7_8(order, impl):
    layout = LAYOUTS[order]()
    q, k, v = qkv(layout.length)
    alpha, beta = 3.3, 0.2
    if impl == "reference":
        out = vsf_joint_reference(q, k, v, layout, alpha, beta)
    else:
        out = joint_attention(q, k, v, layout, Guidance("vsf", alpha, beta))
    roles = layout.roles()
    image = (roles == 0).nonzero().flatten()
    pos = (roles == 1).nonzero().flatten()
    neg = (roles == 2).nonzero().flatten()
    ip = torch.cat([image, pos]).sort().values
    inn = torch.cat([image, neg]).sort().values
    for b in range(B):
        for h in range(H):
            for i in image.tolist():
                want = eq78_image_row(q[b, h, i], k[b, h, ip], v[b, h, ip], k[b, h, neg], v[b, h, neg], alpha, beta)
                torch.testing.assert_close(out[b, h, i], want, rtol=1e-9, atol=1e-9)
            for i in pos.tolist():  # P sees I and P only
                torch.testing.assert_close(out[b, h, i], plain_row(q[b, h, i], k[b, h, ip], v[b, h, ip]))
            for i in neg.tolist():  # N0 sees I and N0 only
                torch.testing.assert_close(out[b, h, i], plain_row(q[b, h, i], k[b, h, inn], v[b, h, inn]))


@pytest.mark.parametrize("impl", ["reference", "production"])
def test_cross_vsf_matches_equation_9(impl):
    layout = text_layout(6, 4)
    q = rand(B, H, 11, D, seed=3)
    k, v = rand(B, H, 10, D, seed=4), rand(B, H, 10, D, seed=5)
    alpha, beta = 1.7, 0.3
    fn = vsf_cross_reference if impl == "reference" else (
        lambda *a: cross_attention(*a[:4], Guidance("vsf", alpha, beta)))
    out = fn(q, k, v, layout, alpha, beta)
    for b in range(B):
        for h in range(H):
            for i in range(11):
                want = eq78_image_row(q[b, h, i], k[b, h, :6], v[b, h, :6], k[b, h, 6:], v[b, h, 6:], alpha, beta)
                torch.testing.assert_close(out[b, h, i], want)


@pytest.mark.parametrize("order", sorted(LAYOUTS))
def test_alpha_zero_beta_inf_is_unguided(order):
    """alpha = 0, beta = +inf: image and positive rows equal plain attention over [I, P] exactly."""
    layout = LAYOUTS[order]()
    q, k, v = qkv(layout.length, seed=7)
    out = joint_attention(q, k, v, layout, Guidance("vsf", 0.0, math.inf))
    keep = (layout.roles() != 2).nonzero().flatten()
    unguided = torch.nn.functional.scaled_dot_product_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(out[:, :, keep], unguided, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_positive_rows_never_depend_on_negative(method):
    layout = LAYOUTS["text_first"]()
    q, k, v = qkv(layout.length, seed=11)
    out1 = joint_attention(q, k, v, layout, Guidance(method, 3.0, 0.2, 2.5))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, layout.negative] = rand(B, H, layout.negative_len, D, seed=99)
    out2 = joint_attention(q2, k2, v2, layout, Guidance(method, 3.0, 0.2, 2.5))
    torch.testing.assert_close(out1[:, :, layout.positive], out2[:, :, layout.positive], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
@pytest.mark.parametrize("kind", ["joint", "cross"])
def test_batch_with_different_negative_lengths_equals_each_alone(method, kind):
    """Two samples, negatives of 3 and 1 tokens: padded batch == each sample run alone."""
    guidance = Guidance(method, 2.0, 0.25, 2.5)
    lp, nmax, li = 4, 3, 6
    lengths = [3, 1]
    mask = torch.tensor([[True, True, True], [True, False, False]])
    if kind == "joint":
        layout = text_layout(lp, nmax, offset=0, total=lp + nmax + li, negative_mask=mask)
        q, k, v = qkv(layout.length, seed=21)
        out = joint_attention(q, k, v, layout, guidance)
    else:
        layout = text_layout(lp, nmax, negative_mask=mask)
        q = rand(B, H, li, D, seed=21)
        k, v = rand(B, H, lp + nmax, D, seed=22), rand(B, H, lp + nmax, D, seed=23)
        out = cross_attention(q, k, v, layout, guidance)
    for b, n in enumerate(lengths):
        keep = list(range(lp + n)) + (list(range(lp + nmax, layout.length)) if kind == "joint" else [])
        alone = text_layout(lp, n, offset=0, total=lp + n + (li if kind == "joint" else 0))
        qs = q[b:b + 1] if kind == "cross" else q[b:b + 1, :, keep]
        args = (qs, k[b:b + 1, :, keep], v[b:b + 1, :, keep], alone, guidance)
        single = joint_attention(*args) if kind == "joint" else cross_attention(*args)
        # Every real row: cross attention has image rows only; joint leaves out the padded N0 rows.
        got = out[b:b + 1] if kind == "cross" else out[b:b + 1, :, keep]
        torch.testing.assert_close(got, single)
        if kind == "joint":
            # Padded N0 rows are junk by design but must be finite: the next layer masks those keys out,
            # and a masked-out NaN value still makes the weighted sum NaN (0 * NaN).
            padded = list(range(lp + n, lp + nmax))
            assert torch.isfinite(out[b, :, padded]).all()


def test_empty_negative_is_unguided():
    layout = text_layout(5, 0, offset=0, total=12)
    q, k, v = qkv(12, seed=31)
    for method in ("vsf", "nag", "nasa"):
        out = joint_attention(q, k, v, layout, Guidance(method, 3.0, 0.2))
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_all_padding_negative_sample_is_unguided():
    """A batch where one sample's negative is empty: that sample equals the plain pass."""
    mask = torch.tensor([[True, True], [False, False]])
    layout = text_layout(4, 2, offset=0, total=12, negative_mask=mask)
    q, k, v = qkv(12, seed=41)
    keep = (layout.roles() != 2).nonzero().flatten()
    plain = torch.nn.functional.scaled_dot_product_attention(q[1:, :, keep], k[1:, :, keep], v[1:, :, keep])
    for method in ("vsf", "nag", "nasa"):
        out = joint_attention(q, k, v, layout, Guidance(method, 3.0, 0.2))
        torch.testing.assert_close(out[1:, :, keep], plain)


def test_nasa_matches_definition():
    """NASA: Z = Z+ - a Z-, Z- over N alone (spec, Baselines)."""
    layout = text_layout(5, 3, offset=7)
    q, k, v = qkv(layout.length, seed=51)
    a = 0.15
    for impl in ("reference", "production"):
        out = nasa_reference(q, k, v, layout, a, cross=False) if impl == "reference" else \
            joint_attention(q, k, v, layout, Guidance("nasa", a))
        for b in range(B):
            for h in range(H):
                for i in range(7):
                    z_plus = plain_row(q[b, h, i], k[b, h, :12], v[b, h, :12])
                    z_minus = plain_row(q[b, h, i], k[b, h, 12:], v[b, h, 12:])
                    torch.testing.assert_close(out[b, h, i], z_plus - a * z_minus)


@pytest.mark.parametrize("cross", [False, True])
def test_nag_matches_definition(cross):
    """NAG: Zt = Z+ + phi (Z+ - Z-), L1 ratio capped at tau per token, Z = a Zt + (1 - a) Z+."""
    phi, blend, tau = 4.0, 0.125, 1.05  # small tau so the cap is exercised
    if cross:
        layout = text_layout(5, 3)
        q = rand(B, H, 6, D, seed=61)
        k, v = rand(B, H, 8, D, seed=62), rand(B, H, 8, D, seed=63)
        image, plus_keys, minus_keys = range(6), list(range(5)), list(range(5, 8))
    else:
        layout = text_layout(5, 3, offset=7)
        q, k, v = qkv(layout.length, seed=61)
        image, plus_keys, minus_keys = range(7), list(range(12)), list(range(7)) + [12, 13, 14]
    for impl in ("reference", "production"):
        if impl == "reference":
            out = nag_reference(q, k, v, layout, phi, blend, tau, cross=cross)
        else:
            fn = cross_attention if cross else joint_attention
            out = fn(q, k, v, layout, Guidance("nag", phi, blend, tau))
        capped = 0
        for b in range(B):
            for i in image:
                z_plus = torch.stack([plain_row(q[b, h, i], k[b, h, plus_keys], v[b, h, plus_keys]) for h in range(H)])
                z_minus = torch.stack([plain_row(q[b, h, i], k[b, h, minus_keys], v[b, h, minus_keys]) for h in range(H)])
                z_t = z_plus + phi * (z_plus - z_minus)
                ratio = z_t.abs().sum() / z_plus.abs().sum()
                if ratio > tau:
                    z_t = z_t * tau / ratio
                    capped += 1
                want = blend * z_t + (1 - blend) * z_plus
                torch.testing.assert_close(out[b, :, i], want)
        assert capped > 0, "the tau cap was never exercised"
