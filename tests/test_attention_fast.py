"""The fast VSF attention (lib_vsf.attention.fast) against the dense-mask reference.

`vsf_joint_reference` is checked against the paper's eq. 7/8 in test_attention_oracle.py; here the
split LSE implementation must equal it for every token order, padded batches, the limits of alpha and
beta, both float32 and bfloat16, and whichever LSE backend the selection logic picks (or falls back to).
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from lib_vsf.attention import fast as attention_fast
from lib_vsf.attention.fast import vsf_cross, vsf_joint
from lib_vsf.attention.reference import vsf_cross_reference, vsf_joint_reference
from lib_vsf.layout import text_layout

B, H, D = 2, 3, 16
LI, LP, N = 40, 7, 4
ORDERS = {
    "image_first": lambda mask=None: text_layout(LP, N, offset=LI, negative_mask=mask),  # [I, P, N0]
    "text_first": lambda mask=None: text_layout(LP, N, total=LI + LP + N, negative_mask=mask),  # [P, N0, I]
    "negative_first": lambda mask=None: text_layout(LP, N, negative_first=True, total=LI + LP + N,
                                                    negative_mask=mask),  # [N0, P, I]
}
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


def qkv(length, dtype, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, H, length, D, generator=g).to(dtype) for _ in range(3))


@pytest.fixture(params=["auto", "chunked"])
def backend(request, monkeypatch):
    """Run each test with the automatically chosen LSE kernel and with the pure-torch fallback."""
    if request.param == "chunked":
        monkeypatch.setenv("VSF_ATTENTION_BACKEND", "chunked")
    else:
        monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)
    attention_fast.reset_backend_cache()
    yield request.param
    attention_fast.reset_backend_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_joint_matches_reference(order, dtype, backend):
    layout = ORDERS[order]()
    q, k, v = qkv(layout.length, dtype)
    got = vsf_joint(q, k, v, layout, 3.3, 0.2)
    want = vsf_joint_reference(q, k, v, layout, 3.3, 0.2)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_bf16_error_is_kernel_sized():
    """bf16 at realistic head size: the merge must not add more than a couple of bf16 ulps (a 1 - W
    computed in bf16 once cost ten times that)."""
    layout = text_layout(77, 8, offset=512)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, layout.length, 64, generator=g).bfloat16() for _ in range(3))
    err = (vsf_joint(q, k, v, layout, 3.3, 0.2).float() - vsf_joint_reference(q, k, v, layout, 3.3, 0.2).float()).abs()
    assert float(err.max()) < 4e-3 and float(err.mean()) < 3e-4


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_padded_batch_with_empty_negative(order, backend):
    """Three samples: 4, 2 and 0 real negative tokens (the last is all padding)."""
    mask = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    layout = ORDERS[order](mask)
    q, k, v = qkv(layout.length, torch.float32, seed=3, batch=3)
    got = vsf_joint(q, k, v, layout, 2.5, 0.3)
    torch.testing.assert_close(got, vsf_joint_reference(q, k, v, layout, 2.5, 0.3), **TOL[torch.float32])
    # The all-padding sample is the unguided pass for its image and positive rows.
    keep = (layout.roles() != 2).nonzero().flatten()
    plain = torch.nn.functional.scaled_dot_product_attention(q[2:, :, keep], k[2:, :, keep], v[2:, :, keep])
    torch.testing.assert_close(got[2:, :, keep], plain, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_padded_batch_bf16_and_mask_all_real(dtype, backend):
    """An all-True mask takes the maskless route and must equal the unmasked call."""
    layout = ORDERS["negative_first"](torch.ones(B, N, dtype=torch.bool))
    q, k, v = qkv(layout.length, dtype, seed=5)
    got = vsf_joint(q, k, v, layout, 3.8, 0.2)
    torch.testing.assert_close(got.float(), vsf_joint_reference(q, k, v, layout, 3.8, 0.2).float(), **TOL[dtype])
    torch.testing.assert_close(got, vsf_joint(q, k, v, ORDERS["negative_first"](), 3.8, 0.2), rtol=0, atol=0)


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_limits_alpha_zero_beta_inf(order, backend):
    layout = ORDERS[order]()
    q, k, v = qkv(layout.length, torch.float32, seed=7)
    for alpha, beta in ((0.0, math.inf), (3.3, math.inf), (0.0, 0.2)):
        got = vsf_joint(q, k, v, layout, alpha, beta)
        want = vsf_joint_reference(q, k, v, layout, alpha, beta)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    keep = (layout.roles() != 2).nonzero().flatten()
    plain = torch.nn.functional.scaled_dot_product_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(vsf_joint(q, k, v, layout, 0.0, math.inf)[:, :, keep], plain, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cross_matches_reference(dtype, backend):
    mask = torch.tensor([[True, True, True], [True, False, False]])
    for layout in (text_layout(6, 3), text_layout(6, 3, negative_mask=mask), text_layout(6, 3, negative_first=True)):
        g = torch.Generator().manual_seed(11)
        q = torch.randn(B, H, 23, D, generator=g).to(dtype)
        k, v = (torch.randn(B, H, 9, D, generator=g).to(dtype) for _ in range(2))
        got = vsf_cross(q, k, v, layout, 1.7, 0.2)
        torch.testing.assert_close(got.float(), vsf_cross_reference(q, k, v, layout, 1.7, 0.2).float(), **TOL[dtype])


@pytest.mark.parametrize("method", ["nag", "nasa"])
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_nag_nasa_routes_match_reference(order, method, backend):
    """NAG / NASA reuse the N0-row and {I, N} helpers: padded batch with an all-padding sample."""
    from lib_vsf.attention import Guidance, joint_attention
    from lib_vsf.attention.reference import nag_reference, nasa_reference

    mask = torch.tensor([[True] * 4, [True, False, True, False], [False] * 4])
    layout = ORDERS[order](mask)
    q, k, v = qkv(layout.length, torch.float32, seed=29, batch=3)
    got = joint_attention(q, k, v, layout, Guidance(method, 3.0, 0.2, 2.5))
    want = (nag_reference(q, k, v, layout, 3.0, 0.2, 2.5, cross=False) if method == "nag"
            else nasa_reference(q, k, v, layout, 3.0, cross=False))
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_selection_falls_back_when_lse_ops_are_missing(monkeypatch):
    """Torch without any LSE op (e.g. old CPU builds): the chunked math is chosen and stays exact."""
    monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)
    for name in ("flash", "cudnn", "efficient", "flash_cpu"):
        monkeypatch.setitem(attention_fast._FACTORIES, name, lambda: None)
    attention_fast.reset_backend_cache()
    try:
        layout = ORDERS["text_first"]()
        q, k, v = qkv(layout.length, torch.float32, seed=13)
        got = vsf_joint(q, k, v, layout, 3.3, 0.2)
        assert attention_fast.select_backend(q.device, q.dtype, D)[0] == "chunked"
        torch.testing.assert_close(got, vsf_joint_reference(q, k, v, layout, 3.3, 0.2), **TOL[torch.float32])
    finally:
        attention_fast.reset_backend_cache()


def test_selection_rejects_wrong_backend_and_survives_runtime_failure(monkeypatch):
    """A backend that returns wrong numbers is rejected by the first-use check; one that raises on a
    real call is dropped and the call is answered by the chunked math."""
    monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)

    def wrong(q, k, v, scale):
        out, lse = attention_fast.chunked_attention_lse(q, k, v, scale)
        return out, lse + 1.0  # LSE off by one: must be caught

    calls = {"n": 0}

    def fails_on_big(q, k, v, scale):
        calls["n"] += 1
        if q.shape[2] > 100:
            raise RuntimeError("shape not supported")
        return attention_fast.chunked_attention_lse(q, k, v, scale)

    monkeypatch.setitem(attention_fast._ORDER, "cpu", ("wrong", "fails_on_big", "chunked"))
    monkeypatch.setitem(attention_fast._FACTORIES, "wrong", lambda: wrong)
    monkeypatch.setitem(attention_fast._FACTORIES, "fails_on_big", lambda: fails_on_big)
    attention_fast.reset_backend_cache()
    try:
        layout = text_layout(LP, N, offset=200)
        q, k, v = qkv(layout.length, torch.float32, seed=17)
        assert attention_fast.select_backend(q.device, q.dtype, D)[0] == "fails_on_big"
        with pytest.warns(UserWarning, match="fails_on_big"):
            got = vsf_joint(q, k, v, layout, 3.3, 0.2)
        torch.testing.assert_close(got, vsf_joint_reference(q, k, v, layout, 3.3, 0.2), **TOL[torch.float32])
        assert attention_fast.select_backend(q.device, q.dtype, D)[0] == "chunked"
    finally:
        attention_fast.reset_backend_cache()


def test_chunked_lse_is_linear_in_memory_and_exact():
    """The fallback splits queries so the logits stay under its budget; results equal plain math."""
    q, k, v = qkv(300, torch.float64, seed=19)
    out, lse = attention_fast.chunked_attention_lse(q, k, v, 0.25)
    s = q @ k.transpose(-1, -2) * 0.25
    torch.testing.assert_close(lse, s.logsumexp(-1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


def test_bench_tiny_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "lib_vsf.bench", "--preset", "tiny", "--repeats", "1",
                           "--json", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(path.read_text())
    for key in ("preset", "device", "dtype", "torch", "backend", "attention", "forward", "check"):
        assert key in data, key
    for name in ("unguided", "cfg", "vsf_fast", "vsf_reference", "nag", "nasa"):
        assert name in data["attention"], name
        assert {"median_ms", "ratio", "peak_mib"} <= set(data["attention"][name])
    assert data["check"]["attention"]["vsf_fast_vs_reference_max_abs"] < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_cuda_matches_reference(dtype):
    """On a GPU: every token order, padded and unpadded, with the automatically chosen kernel."""
    attention_fast.reset_backend_cache()
    mask = torch.tensor([[True] * 4, [True, False, False, False]], device="cuda")
    for order in sorted(ORDERS):
        for m in (None, mask):
            layout = ORDERS[order](m)
            q, k, v = (t.cuda() for t in qkv(layout.length, dtype, seed=23))
            got = vsf_joint(q, k, v, layout, 3.3, 0.2)
            want = vsf_joint_reference(q, k, v, layout, 3.3, 0.2)
            torch.testing.assert_close(got.float(), want.float(), **TOL.get(dtype, TOL[torch.bfloat16]))
    q = torch.randn(2, H, 77, 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, H, 20, 64, device="cuda", dtype=dtype) for _ in range(2))
    layout = text_layout(14, 6)
    torch.testing.assert_close(vsf_cross(q, k, v, layout, 1.7, 0.2).float(),
                               vsf_cross_reference(q, k, v, layout, 1.7, 0.2).float(),
                               **TOL.get(dtype, TOL[torch.bfloat16]))
