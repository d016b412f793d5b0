"""VSF's attention written out from VSF-SPEC, in float64 with plain torch, as the expected values of
the real-host tests. Nothing here comes from `lib_vsf` (no layout helper, no reference, no kernel):
the tests name the token positions themselves and compare what the patched host call returned.

Joint attention (SD3/SD3.5 MMDiT, Flux), per sample, token positions `I` (image), `P` (positive),
`N` (the sample's real negative tokens), `s = q.k / sqrt(d)`:
- image query (paper eq. 7/8, VSF-SPEC "Equivalence"):
      A+ = sum_{I u P} exp(s),  A- = sum_{N} exp(s - beta),  W = A+ / (A+ + A-)
      Z  = W * Z+  -  alpha * (1 - W) * Z-
  with Z+ ordinary attention over I u P and Z- ordinary attention over N alone;
- positive query: ordinary attention over I u P (rows of P never depend on N);
- negative query: ordinary attention over I u N (what the negative pass would see).
Reference-image tokens `R` (Flux Kontext, Qwen-Image-Edit; VSF-SPEC "Families beyond the paper") are
keys of every query but never flipped: image queries use I u P u R for A+ and Z+, positive and
reference queries ordinary attention over I u P u R, negative queries over I u R u N.
Cross-attention (Wan, UNet attn2), paper eq. 9 with the bias:
      Z = softmax([s(Q, K_P), s(Q, K_N) - beta]) . [V_P ; -alpha V_N]

`bug=` feeds one known mistake into the expectation ("flip": +alpha instead of -alpha; "no_beta":
beta dropped; "positive_sees_negative": P rows computed like image rows; "reference_as_image": R rows
computed like image rows, seeing the flipped negative; "negative_misses_reference": N rows over I u N
only), so a test can show that its oracle tells the right output from each mistake.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _attend(q, k, v, keys):
    """Ordinary softmax attention of every query in `q` [H, Lq, D] over the key positions `keys`."""
    keys = torch.as_tensor(list(keys), dtype=torch.long)
    s = q @ k[:, keys].transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v[:, keys]


def _eq78(q, k, v, positive_keys, negative_keys, alpha, beta):
    """Paper eq. 7/8 for the queries `q` [H, Lq, D] of one sample."""
    d = q.shape[-1]
    pk = torch.as_tensor(list(positive_keys), dtype=torch.long)
    nk = torch.as_tensor(list(negative_keys), dtype=torch.long)
    s_pos = q @ k[:, pk].transpose(-1, -2) / math.sqrt(d)
    s_neg = q @ k[:, nk].transpose(-1, -2) / math.sqrt(d)
    a_pos = torch.exp(s_pos).sum(-1, keepdim=True)
    a_neg = torch.exp(s_neg - beta).sum(-1, keepdim=True)
    w = a_pos / (a_pos + a_neg)
    z_pos = torch.softmax(s_pos, dim=-1) @ v[:, pk]
    z_neg = torch.softmax(s_neg, dim=-1) @ v[:, nk]
    return w * z_pos - alpha * (1 - w) * z_neg


def joint_expected(q, k, v, image: Sequence[int], positive: Sequence[int], negatives: Sequence[Sequence[int]],
                   alpha: float, beta: float, bug: str | None = None, reference: Sequence[int] = ()):
    """Expected joint attention `[B, H, L, D]` (float64) and the `[B, L]` rows it defines (image,
    positive, reference and real negative rows; rows of padded negative slots are the host's business).
    `q, k, v` are `[B, H, L, D]`; `negatives[b]` are sample b's real negative positions, `reference`
    the positions of reference-image tokens (none by default)."""
    q, k, v = (t.double() for t in (q, k, v))
    if bug == "flip":
        alpha = -alpha
    if bug == "no_beta":
        beta = 0.0
    out = torch.zeros_like(q)
    defined = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)
    image, positive, reference = list(image), list(positive), list(reference)
    seen = image + positive + reference  # the keys of I, P and R queries (besides N1 for I)
    for b, negative in enumerate(negatives):
        negative = list(negative)
        qb, kb, vb = q[b], k[b], v[b]
        img = torch.as_tensor(image)
        out[b][:, img] = _eq78(qb[:, img], kb, vb, seen, negative, alpha, beta)
        pos = torch.as_tensor(positive)
        if bug == "positive_sees_negative":
            out[b][:, pos] = _eq78(qb[:, pos], kb, vb, seen, negative, alpha, beta)
        else:
            out[b][:, pos] = _attend(qb[:, pos], kb, vb, seen)
        if reference:
            ref = torch.as_tensor(reference)
            if bug == "reference_as_image":
                out[b][:, ref] = _eq78(qb[:, ref], kb, vb, seen, negative, alpha, beta)
            else:
                out[b][:, ref] = _attend(qb[:, ref], kb, vb, seen)
        if negative:
            neg = torch.as_tensor(negative)
            negative_keys = image + negative if bug == "negative_misses_reference" else image + reference + negative
            out[b][:, neg] = _attend(qb[:, neg], kb, vb, negative_keys)
        defined[b, seen + negative] = True
    return out, defined


def cross_expected(q, k, v, positive: Sequence[int], negatives: Sequence[Sequence[int]], alpha: float, beta: float,
                   bug: str | None = None):
    """Expected cross-attention `[B, H, Lq, D]` (float64), paper eq. 9: `q` `[B, H, Lq, D]`, keys and
    values `[B, H, Lk, D]`; `positive` the positive key positions, `negatives[b]` sample b's real
    negative key positions."""
    q, k, v = (t.double() for t in (q, k, v))
    if bug == "flip":
        alpha = -alpha
    if bug == "no_beta":
        beta = 0.0
    out = torch.zeros_like(q)
    d = q.shape[-1]
    for b, negative in enumerate(negatives):
        keys = torch.as_tensor(list(positive) + list(negative), dtype=torch.long)
        bias = torch.cat([torch.zeros(len(positive)), torch.full((len(negative),), -beta)]).double()
        logits = q[b] @ k[b][:, keys].transpose(-1, -2) / math.sqrt(d) + bias
        sign = torch.cat([torch.ones(len(positive)), torch.full((len(negative),), -alpha)]).double()
        out[b] = torch.softmax(logits, dim=-1) @ (v[b][:, keys] * sign[:, None])
    return out


def bhld(t: torch.Tensor, heads: int, heads_first: bool) -> torch.Tensor:
    """A host tensor as `[B, H, L, D]`: unchanged when the host passes heads first, else from
    `[B, L, H*D]` or `[B, L, H, D]` (SAI MMDiT passes v that way)."""
    if heads_first:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def assert_matches_spec(got_bhld: torch.Tensor, expected: torch.Tensor, defined: torch.Tensor | None = None,
                        atol: float = 2e-5, rtol: float = 1e-4) -> float:
    """`got` (the patched host call's output as `[B, H, L, D]`) equals the spec on the defined rows;
    returns the largest difference seen, for the bug checks."""
    got = got_bhld.double()
    if defined is not None:
        rows = defined[:, None, :, None].expand_as(got)
        got, expected = got[rows], expected[rows]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    return float((got - expected).abs().max())


def assert_bugs_are_caught(got_bhld: torch.Tensor, expected_with_bug, defined: torch.Tensor | None = None,
                           margin: float = 1e-3) -> None:
    """For each fed bug, the output differs from the buggy expectation by far more than the tolerance."""
    got = got_bhld.double()
    for bug, expected in expected_with_bug.items():
        g, e = got, expected
        if defined is not None:
            rows = defined[:, None, :, None].expand_as(got)
            g, e = got[rows], expected[rows]
        assert float((g - e).abs().max()) > margin, f"the spec oracle cannot tell the output from bug {bug!r}"


JOINT_BUGS = ("flip", "no_beta", "positive_sees_negative")
REFERENCE_BUGS = ("reference_as_image", "negative_misses_reference")
CROSS_BUGS = ("flip", "no_beta")


def check_joint_call(q, k, v, out, heads, image, positive, negatives, alpha, beta, heads_first=False,
                     reference=(), **tolerance) -> None:
    """One recorded joint call (inputs as the host passed them, `heads_first` when `[B, H, L, D]`;
    `out` what the patched call returned, `[B, L, H*D]`) against `joint_expected`, and against each
    fed bug (the reference bugs too when the call has reference tokens)."""
    q, k, v = (bhld(t, heads, heads_first) for t in (q, k, v))
    got = bhld(out, heads, False)
    expected, defined = joint_expected(q, k, v, image, positive, negatives, alpha, beta, reference=reference)
    assert_matches_spec(got, expected, defined, **tolerance)
    bugs = JOINT_BUGS + (REFERENCE_BUGS if len(reference) else ())
    assert_bugs_are_caught(got, {bug: joint_expected(q, k, v, image, positive, negatives, alpha, beta, bug=bug,
                                                     reference=reference)[0] for bug in bugs}, defined)


def check_cross_call(q, k, v, out, heads, positive, negatives, alpha, beta, heads_first=False,
                     **tolerance) -> None:
    """One recorded cross-attention call against `cross_expected` (eq. 9), and against each fed bug."""
    q, k, v = (bhld(t, heads, heads_first) for t in (q, k, v))
    got = bhld(out, heads, False)
    assert_matches_spec(got, cross_expected(q, k, v, positive, negatives, alpha, beta), **tolerance)
    assert_bugs_are_caught(got, {bug: cross_expected(q, k, v, positive, negatives, alpha, beta, bug=bug)
                                 for bug in CROSS_BUGS})
