"""Reference-image tokens R and the model's own positive-text mask in the attention math.

VSF-SPEC, "Families beyond the paper": R (Flux Kontext, Qwen-Image-Edit) is conditioning, not output.

    query \\ key |  I  |  P  |  R  |  N0 |  N1
    I           | yes | yes | yes |  no | yes, logit - beta
    P           | yes | yes | yes |  no | no
    R           | yes | yes | yes |  no | no
    N0          | yes |  no | yes | yes | no

and a padded positive position (Qwen-Image text mask, Chroma padding mask) is a key for nobody. The
oracles below are written from the equations per query row in plain float64 torch: the roles of every
position are spelled out by the test (not read from the layout), eq. 7/8 with A+ summed over
{I, real P, R} and A- over the real N; NAG / NASA from the spec's baselines with Z+ over {I, real P, R},
Z- over {N} (NASA) or {I, R, N} (NAG).
"""
import math

import pytest
import torch

from lib_vsf.attention import Guidance, cross_attention, joint_attention
from lib_vsf.attention import fast as attention_fast
from lib_vsf.attention.reference import nag_reference, nasa_reference, vsf_joint_reference
from lib_vsf.layout import TokenLayout
from lib_vsf.state import NegativeShareMap

B, H, D = 2, 2, 8
COUNTS = {"I": 5, "R": 3, "P": 4, "N": 3}
ORDERS = {
    "I_R_P_N": ["I", "R", "P", "N"],  # image first, reference appended to the image (diffusers-style)
    "N_P_I_R": ["N", "P", "I", "R"],  # text first, negative first (Flux / Kontext)
    "P_N_I_R": ["P", "N", "I", "R"],  # Qwen-Image joint: text then image then reference
    "I_P_N_I_R": ["I", "P", "N", "I", "R"],  # image split in two pieces (index paths)
    "R_P_I_N": ["R", "P", "I", "N"],  # reference before the text
}
# sample 0 keeps every positive token; sample 1 pads two (one inside the span, one at the end)
POSITIVE_MASK = torch.tensor([[True, True, True, True], [True, False, True, False]])
NEGATIVE_MASK = torch.tensor([[True, True, True], [True, False, False]])
SHARED_POSITIVE_MASK = torch.tensor([[True, True, False, False]])  # one row for the whole batch
MASKS = {"none": (None, None), "positive": (POSITIVE_MASK, None), "both": (POSITIVE_MASK, NEGATIVE_MASK),
         "shared_positive": (SHARED_POSITIVE_MASK, NEGATIVE_MASK)}
ALPHA, BETA = 3.3, 0.2


def build(order, counts=COUNTS, positive_mask=None, negative_mask=None, reference=True):
    """(layout, role letter per position) for `order`; the I pieces share counts["I"] (split evenly)."""
    pieces = [r for r in order if reference or r != "R"]
    n_image_pieces = pieces.count("I")
    roles, spans, at, image_left = [], {}, 0, counts["I"]
    for i, r in enumerate(pieces):
        if r == "I":
            n = image_left if pieces[i + 1:].count("I") == 0 else counts["I"] // n_image_pieces
            image_left -= n
        else:
            n = counts[r]
            spans[r] = slice(at, at + n)
        roles += [r] * n
        at += n
    layout = TokenLayout(at, spans["P"], spans["N"], negative_mask, spans.get("R"), positive_mask)
    return layout, roles


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def qkv(length, seed=0, dtype=torch.float64, batch=B):
    return tuple(rand(batch, H, length, D, seed=seed + i, dtype=dtype) for i in range(3))


def key_sets(roles, b, positive_mask, negative_mask):
    """Positions per role for sample b: I, R, real P, real N (masks given per span)."""
    at = {r: [i for i, x in enumerate(roles) if x == r] for r in "IRPN"}
    if positive_mask is None:
        p_ok = [True] * len(at["P"])
    else:  # a [1, P] mask holds for every sample
        p_ok = positive_mask[min(b, len(positive_mask) - 1)].tolist()
    n_ok = [True] * len(at["N"]) if negative_mask is None else negative_mask[b].tolist()
    real_p = [i for i, ok in zip(at["P"], p_ok) if ok]
    real_n = [i for i, ok in zip(at["N"], n_ok) if ok]
    return at["I"], at["R"], real_p, real_n


def plain_row(q_row, k_sel, v_sel):
    s = (k_sel @ q_row) / math.sqrt(q_row.shape[-1])
    return (s.exp()[:, None] * v_sel).sum(0) / s.exp().sum()


def eq78_row(q_row, k_plus, v_plus, k_neg, v_neg, alpha, beta):
    """Paper eq. 7/8 for one image query: W = A+/(A+ + A-), Z = W Z+ - alpha (1 - W) Z-; also 1 - W."""
    s_plus = (k_plus @ q_row) / math.sqrt(q_row.shape[-1])
    s_neg = (k_neg @ q_row) / math.sqrt(q_row.shape[-1]) - beta
    a_plus, a_minus = s_plus.exp().sum(), s_neg.exp().sum()
    z_plus = (s_plus.exp()[:, None] * v_plus).sum(0) / a_plus
    z_minus = (s_neg.exp()[:, None] * v_neg).sum(0) / a_minus
    w = a_plus / (a_plus + a_minus)
    return w * z_plus - alpha * (1 - w) * z_minus, 1 - w


def oracle(q, k, v, roles, method, positive_mask=None, negative_mask=None, alpha=ALPHA, beta=BETA, tau=2.5):
    """Every real row of the joint call, per query, from the table and the equations (float64).
    Returns (out with NaN at padded N0 rows, [B, image tokens] 1 - W for VSF, NAG rows whose cap acted)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.full_like(q, float("nan"))
    share = torch.zeros(q.shape[0], roles.count("I"), dtype=torch.float64)
    capped = 0
    for b in range(q.shape[0]):
        image, ref, real_p, real_n = key_sets(roles, b, positive_mask, negative_mask)
        plus = sorted(image + ref + real_p)  # what I, P and R rows attend to
        n0_keys = sorted(image + ref + real_n)  # what N0 rows attend to
        minus = real_n if method in ("vsf", "nasa") else n0_keys  # NAG's Z-: image over {I, R, N}
        for h in range(q.shape[1]):
            for i, r in enumerate(roles):
                qr = q[b, h, i]
                if r in "PR":
                    out[b, h, i] = plain_row(qr, k[b, h, plus], v[b, h, plus])
                elif r == "N" and i in real_n:
                    out[b, h, i] = plain_row(qr, k[b, h, n0_keys], v[b, h, n0_keys])
                elif r == "I" and method == "vsf":
                    out[b, h, i], w_neg = eq78_row(qr, k[b, h, plus], v[b, h, plus],
                                                   k[b, h, real_n], v[b, h, real_n], alpha, beta)
                    share[b, image.index(i)] += w_neg / q.shape[1]
                elif r == "I" and method == "nasa":
                    out[b, h, i] = plain_row(qr, k[b, h, plus], v[b, h, plus]) - alpha * plain_row(
                        qr, k[b, h, minus], v[b, h, minus])
        if method == "nag":  # Zt = Z+ + phi (Z+ - Z-), L1 cap at tau over heads and channels, blend
            for i in image:
                z_plus = torch.stack([plain_row(q[b, h, i], k[b, h, plus], v[b, h, plus]) for h in range(H)])
                z_minus = torch.stack([plain_row(q[b, h, i], k[b, h, minus], v[b, h, minus]) for h in range(H)])
                z_t = z_plus + alpha * (z_plus - z_minus)
                ratio = z_t.abs().sum() / z_plus.abs().sum()
                if ratio > tau:
                    z_t = z_t * tau / ratio
                    capped += 1
                out[b, :, i] = beta * z_t + (1 - beta) * z_plus
    return out, share, capped


def guidance(method):
    return {"vsf": Guidance("vsf", ALPHA, BETA), "nag": Guidance("nag", 4.0, 0.5, 1.1),
            "nasa": Guidance("nasa", 0.15)}[method]


def oracle_for(method, q, k, v, roles, pm=None, nm=None):
    g = guidance(method)
    return oracle(q, k, v, roles, method, pm, nm, g.alpha, g.beta, g.tau)


def run(impl, method, q, k, v, layout, negative_share=None):
    g = guidance(method)
    if impl == "production":
        return joint_attention(q, k, v, layout, g, negative_share=negative_share)
    if method == "vsf":
        return vsf_joint_reference(q, k, v, layout, g.alpha, g.beta, negative_share=negative_share)
    if method == "nag":
        return nag_reference(q, k, v, layout, g.alpha, g.beta, g.tau, cross=False)
    return nasa_reference(q, k, v, layout, g.alpha, cross=False)


def real_rows(out, roles, b, nm):
    """Rows of sample b that are real tokens (padded N0 rows are junk by design)."""
    _, _, _, real_n = key_sets(roles, b, None, nm)
    return [i for i, r in enumerate(roles) if r != "N" or i in real_n]


def assert_rows_close(got, want, roles, nm, **tol):
    for b in range(got.shape[0]):
        rows = real_rows(got, roles, b, nm)
        torch.testing.assert_close(got[b][:, rows].double(), want[b][:, rows], **tol)


@pytest.fixture(params=["auto", "chunked"])
def backend(request, monkeypatch):
    """The automatically chosen LSE kernel and the pure-torch fallback."""
    if request.param == "chunked":
        monkeypatch.setenv("VSF_ATTENTION_BACKEND", "chunked")
    else:
        monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)
    attention_fast.reset_backend_cache()
    yield request.param
    attention_fast.reset_backend_cache()


# --- the table and the equations ------------------------------------------------------------------------

@pytest.mark.parametrize("masks", sorted(MASKS))
@pytest.mark.parametrize("impl", ["reference", "production"])
@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_joint_with_reference_matches_equations(order, method, impl, masks):
    pm, nm = MASKS[masks]
    layout, roles = build(ORDERS[order], positive_mask=pm, negative_mask=nm)
    q, k, v = qkv(layout.length, seed=3)
    got = run(impl, method, q, k, v, layout)
    want, _, capped = oracle_for(method, q, k, v, roles, pm, nm)
    assert method != "nag" or capped > 0, "the tau cap was never exercised"
    assert got.shape == q.shape and got.dtype == q.dtype
    tol = 1e-6 if (method, impl) == ("nag", "production") else 1e-9  # production NAG combines in float32
    assert_rows_close(got, want, roles, nm, rtol=tol, atol=tol)
    if nm is not None:  # padded N0 rows: junk by design, but finite (a masked-out NaN value poisons 0 * v)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("impl", ["reference", "production"])
@pytest.mark.parametrize("order", ["N_P_I_R", "I_R_P_N"])
def test_negative_share_covers_true_image_rows_only(order, impl):
    """The negative map gets 1 - W (eq. 8, head mean) for each image token, in sequence order; R rows
    (never flipped) are not image rows of the map."""
    layout, roles = build(ORDERS[order], positive_mask=POSITIVE_MASK, negative_mask=NEGATIVE_MASK)
    q, k, v = qkv(layout.length, seed=5)
    rec = NegativeShareMap()
    out_on = run(impl, "vsf", q, k, v, layout, negative_share=rec)
    _, want, _ = oracle(q, k, v, roles, "vsf", POSITIVE_MASK, NEGATIVE_MASK)
    got = rec.mean()
    assert got is not None and got.shape == (B, COUNTS["I"])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert float(want.min()) > 0.01  # not vacuous: the negative holds real mass
    assert torch.equal(out_on, run(impl, "vsf", q, k, v, layout))  # recording changes nothing


# --- invariants -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_reference_and_positive_rows_never_depend_on_negative(order, method):
    """Changing every N query, key and value leaves the P and R rows bit for bit as they were."""
    layout, roles = build(ORDERS[order], positive_mask=POSITIVE_MASK, negative_mask=NEGATIVE_MASK)
    q, k, v = qkv(layout.length, seed=7)
    out1 = joint_attention(q, k, v, layout, guidance(method))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for i, t in enumerate((q2, k2, v2)):
        t[:, :, layout.negative] = rand(B, H, layout.negative_len, D, seed=90 + i)
    out2 = joint_attention(q2, k2, v2, layout, guidance(method))
    for span in (layout.positive, layout.reference):
        assert torch.equal(out1[:, :, span], out2[:, :, span])
    image = [i for i, r in enumerate(roles) if r == "I"]
    assert not torch.equal(out1[:, :, image], out2[:, :, image])  # the negative does act on the image


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_negative_rows_see_reference_but_not_positive(order, method):
    layout, roles = build(ORDERS[order], positive_mask=POSITIVE_MASK)
    q, k, v = qkv(layout.length, seed=9)
    out = joint_attention(q, k, v, layout, guidance(method))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, layout.reference] = rand(B, H, layout.reference_len, D, seed=80)
    v2[:, :, layout.reference] = rand(B, H, layout.reference_len, D, seed=81)
    changed_r = joint_attention(q, k2, v2, layout, guidance(method))
    assert not torch.allclose(out[:, :, layout.negative], changed_r[:, :, layout.negative])
    k3, v3 = k.clone(), v.clone()
    k3[:, :, layout.positive] = rand(B, H, layout.positive_len, D, seed=82)
    v3[:, :, layout.positive] = rand(B, H, layout.positive_len, D, seed=83)
    changed_p = joint_attention(q, k3, v3, layout, guidance(method))
    assert torch.equal(out[:, :, layout.negative], changed_p[:, :, layout.negative])


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_padded_positive_keys_never_matter(order, method, backend):
    """New keys and values at the padded positive positions: the whole output is bit for bit the same.
    Without the mask the same change does move the output (the check can fail)."""
    layout, roles = build(ORDERS[order], positive_mask=POSITIVE_MASK, negative_mask=NEGATIVE_MASK)
    q, k, v = qkv(layout.length, seed=11)
    out = joint_attention(q, k, v, layout, guidance(method))
    padded = [layout.positive.start + j for j in range(layout.positive_len) if not POSITIVE_MASK[1, j]]
    k2, v2 = k.clone(), v.clone()
    k2[1, :, padded] = 5 * rand(H, len(padded), D, seed=70)
    v2[1, :, padded] = 5 * rand(H, len(padded), D, seed=71)
    assert torch.equal(out, joint_attention(q, k2, v2, layout, guidance(method)))
    unmasked = build(ORDERS[order], negative_mask=NEGATIVE_MASK)[0]
    assert not torch.allclose(joint_attention(q, k, v, unmasked, guidance(method))[1],
                              joint_attention(q, k2, v2, unmasked, guidance(method))[1])


BATCH_MASKS = {
    2: (POSITIVE_MASK, NEGATIVE_MASK),
    # three samples, two of them sharing a positive mask (a group of two behind a group of one)
    3: (torch.tensor([[True, True, True, True], [True, False, True, False], [True, True, True, True]]),
        torch.tensor([[True, True, True], [True, False, False], [True, True, False]])),
}


@pytest.mark.parametrize("batch", sorted(BATCH_MASKS))
@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_batch_with_masks_equals_each_sample_alone(order, method, batch, backend):
    """Different positive masks and negative lengths in one batch, with R: each sample equals itself
    run alone with its padded P and N tokens removed from the sequence (no masks at all)."""
    pm, nm = BATCH_MASKS[batch]
    layout, roles = build(ORDERS[order], positive_mask=pm, negative_mask=nm)
    q, k, v = qkv(layout.length, seed=13, batch=batch)
    out = joint_attention(q, k, v, layout, guidance(method))
    for b in range(batch):
        image, ref, real_p, real_n = key_sets(roles, b, pm, nm)
        keep = sorted(image + ref + real_p + real_n)
        counts = dict(COUNTS, P=len(real_p), N=len(real_n))
        alone, _ = build(ORDERS[order], counts)
        single = joint_attention(*(t[b:b + 1, :, keep] for t in (q, k, v)), alone, guidance(method))
        torch.testing.assert_close(out[b:b + 1, :, keep], single, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_alpha_zero_beta_inf_is_unguided(order, backend):
    """alpha 0, beta +inf: every non-negative row equals plain attention over {I, P, R}."""
    layout, roles = build(ORDERS[order])
    q, k, v = qkv(layout.length, seed=15)
    out = joint_attention(q, k, v, layout, Guidance("vsf", 0.0, math.inf))
    keep = [i for i, r in enumerate(roles) if r != "N"]
    unguided = torch.nn.functional.scaled_dot_product_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(out[:, :, keep], unguided, rtol=1e-12, atol=1e-12)
    # with a positive mask: the plain rows over {I, real P, R} (oracle), image rows included
    layout, roles = build(ORDERS[order], positive_mask=POSITIVE_MASK)
    out = joint_attention(q, k, v, layout, Guidance("vsf", 0.0, math.inf))
    for b in range(B):
        image, ref, real_p, _ = key_sets(roles, b, POSITIVE_MASK, None)
        plus = sorted(image + ref + real_p)
        for h in range(H):
            for i in keep:
                torch.testing.assert_close(out[b, h, i], plain_row(q[b, h, i], k[b, h, plus], v[b, h, plus]))


def test_empty_negative_with_reference_is_unguided():
    """No negative: the model's own pass (R is just more keys), bit for bit; with a positive mask the
    padded positive keys are left out exactly as the model's own masked pass."""
    counts = dict(COUNTS, N=0)
    layout, roles = build(ORDERS["P_N_I_R"], counts)
    q, k, v = qkv(layout.length, seed=17)
    for method in ("vsf", "nag", "nasa"):
        assert torch.equal(joint_attention(q, k, v, layout, guidance(method)),
                           torch.nn.functional.scaled_dot_product_attention(q, k, v))
    layout, roles = build(ORDERS["P_N_I_R"], counts, positive_mask=POSITIVE_MASK)
    for method in ("vsf", "nag", "nasa"):
        out = joint_attention(q, k, v, layout, guidance(method))
        for b in range(B):
            image, ref, real_p, _ = key_sets(roles, b, POSITIVE_MASK, None)
            plus = sorted(image + ref + real_p)
            for i in range(layout.length):
                torch.testing.assert_close(out[b, :, i], torch.stack(
                    [plain_row(q[b, h, i], k[b, h, plus], v[b, h, plus]) for h in range(H)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("masks", sorted(MASKS))
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_production_matches_reference_in_each_dtype(order, masks, dtype, backend, monkeypatch):
    """The fast path (not a detour through the dense reference) against the dense reference."""
    pm, nm = MASKS[masks]
    monkeypatch.setattr(attention_fast, "vsf_joint_reference", lambda *a, **kw: pytest.fail("dense detour"))
    layout, roles = build(ORDERS[order], counts=dict(COUNTS, I=40), positive_mask=pm, negative_mask=nm)
    q, k, v = qkv(layout.length, seed=19, dtype=dtype)
    rec_fast, rec_ref = NegativeShareMap(), NegativeShareMap()
    got = joint_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA), negative_share=rec_fast)
    want = vsf_joint_reference(q, k, v, layout, ALPHA, BETA, negative_share=rec_ref)
    assert got.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for b in range(B):
        rows = real_rows(got, roles, b, nm)
        torch.testing.assert_close(got[b][:, rows].float(), want[b][:, rows].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(rec_fast.mean(), rec_ref.mean(), rtol=max(tol, 1e-5), atol=max(tol, 1e-5))


# --- cross-attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_cross_layout_with_reference_is_refused(method):
    layout = TokenLayout(10, slice(0, 4), slice(4, 7), reference=slice(7, 10))
    q, k, v = rand(B, H, 6, D), rand(B, H, 10, D, seed=1), rand(B, H, 10, D, seed=2)
    with pytest.raises(ValueError, match="reference"):
        cross_attention(q, k, v, layout, guidance(method))


@pytest.mark.parametrize("method", ["vsf", "nag", "nasa"])
def test_cross_positive_mask_leaves_padded_keys_out(method):
    """Cross-attention with a positive mask: image queries over the real P keys only (eq. 9 for VSF)."""
    layout = TokenLayout(7, slice(0, 4), slice(4, 7), positive_mask=POSITIVE_MASK)
    q, k, v = rand(B, H, 6, D, seed=3), rand(B, H, 7, D, seed=4), rand(B, H, 7, D, seed=5)
    rec = NegativeShareMap()
    out = cross_attention(q, k, v, layout, guidance(method), negative_share=rec)
    g = guidance(method)
    for b in range(B):
        real_p = [j for j in range(4) if POSITIVE_MASK[b, j]]
        neg = [4, 5, 6]
        for h in range(H):
            for i in range(6):
                z_plus = plain_row(q[b, h, i], k[b, h, real_p], v[b, h, real_p])
                z_minus = plain_row(q[b, h, i], k[b, h, neg], v[b, h, neg])
                if method == "vsf":
                    want, w_neg = eq78_row(q[b, h, i], k[b, h, real_p], v[b, h, real_p], k[b, h, neg],
                                           v[b, h, neg], g.alpha, g.beta)
                    torch.testing.assert_close(out[b, h, i], want)
                elif method == "nasa":
                    torch.testing.assert_close(out[b, h, i], z_plus - g.alpha * z_minus)
        if method == "nag":  # the L1 cap is per token over all heads (production combines in float32)
            for i in range(6):
                zp = torch.stack([plain_row(q[b, h, i], k[b, h, real_p], v[b, h, real_p]) for h in range(H)])
                zm = torch.stack([plain_row(q[b, h, i], k[b, h, neg], v[b, h, neg]) for h in range(H)])
                z_t = zp + g.alpha * (zp - zm)
                ratio = z_t.abs().sum() / zp.abs().sum()
                z_t = z_t * tau_cap(ratio, g.tau)
                torch.testing.assert_close(out[b, :, i], g.beta * z_t + (1 - g.beta) * zp, rtol=1e-6, atol=1e-6)
    if method == "vsf":
        want_share = torch.stack([torch.stack([torch.stack([eq78_row(
            q[b, h, i], k[b, h, [j for j in range(4) if POSITIVE_MASK[b, j]]],
            v[b, h, [j for j in range(4) if POSITIVE_MASK[b, j]]], k[b, h, 4:], v[b, h, 4:], g.alpha, g.beta)[1]
            for i in range(6)]) for h in range(H)]).mean(0) for b in range(B)])
        torch.testing.assert_close(rec.mean().double(), want_share, rtol=1e-5, atol=1e-6)


def tau_cap(ratio, tau):
    return tau / ratio if ratio > tau else 1.0


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_alpha_zero_beta_inf_with_positive_mask_is_the_models_masked_pass_bit_for_bit(order):
    """The model's own pass (Chroma: SDPA over its sequence without N, with the boolean mask m_i * m_j of
    its tokens) and alpha 0, beta +inf agree bit for bit on every row the model defines (rows of real
    tokens: the model leaves a padded query row with no key at all). float32 and a sequence long enough
    for a different summation order to show (the gathered-keys LSE pass is a few ULPs off)."""
    counts = {"I": 40, "R": 8, "P": 24, "N": 5}
    positive_mask = torch.ones(2, counts["P"], dtype=torch.bool)
    positive_mask[0, 9:] = False  # prompt, EOS, one kept pad token; the rest padding
    positive_mask[1, 20:] = False
    layout, roles = build(ORDERS[order], counts, positive_mask=positive_mask)
    q, k, v = qkv(layout.length, seed=19, dtype=torch.float32)
    q, k, v = (t.repeat(1, 1, 1, 4) for t in (q, k, v))  # head dim 32
    out = joint_attention(q, k, v, layout, Guidance("vsf", 0.0, math.inf))
    keep = [i for i, r in enumerate(roles) if r != "N"]
    p_at = [i for i, r in enumerate(roles) if r == "P"]
    for b in range(2):
        real = torch.ones(layout.length, dtype=torch.bool)
        real[p_at] = positive_mask[b]
        m = real[keep]
        model_mask = m[None, :] & m[:, None]  # [L, L]: the model's outer-product mask
        own = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, :, keep], k[b:b + 1, :, keep], v[b:b + 1, :, keep], attn_mask=model_mask)
        defined = [i for i, ok in zip(keep, m.tolist()) if ok]
        assert torch.equal(out[b, :, defined], own[0][:, m]), f"sample {b}"
