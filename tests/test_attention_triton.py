"""The optional Triton kernels (lib_vsf.attention_triton) against the float32 reference math.

Skipped where Triton is not installed (CI). With a CUDA GPU the real kernels run on CUDA tensors;
without one they run through Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernels are
defined). The interpreter mishandles bf16 tensor-core dots (Triton 3.9: garbage values), so there the
N0 kernel, which uses them, is checked in float16 only; the merge kernel does its math in float32 and is
checked in every dtype everywhere.
"""
import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET could be set (run this file alone, or "
                "with TRITON_INTERPRET=1)", allow_module_level=True)
if not ON_GPU:
    # Must precede `import triton` itself: Triton's own helpers (tl.zeros, ...) are jit functions
    # defined at its import, and only those defined under the variable run in the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"

from lib_vsf import attention_fast  # noqa: E402
from lib_vsf.attention_reference import vsf_joint_reference  # noqa: E402
from lib_vsf.layout import text_layout  # noqa: E402

at = pytest.importorskip("lib_vsf.attention_triton")
if not at.AVAILABLE:
    pytest.skip("triton imports but is not usable", allow_module_level=True)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}
N0_DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def heads_view(batch, heads, length, dim, dtype, seed):
    """[B, H, L, D] as diffusers hands it over: a transposed view of [B, L, H, D] (non-contiguous)."""
    return rand(batch, length, heads, dim, dtype=dtype, seed=seed).transpose(1, 2)


@pytest.fixture
def triton_on(monkeypatch):
    """Force the kernels (interpreter on CPU), fresh selection cache."""
    monkeypatch.setenv("VSF_TRITON", "1")
    monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)
    attention_fast.reset_backend_cache()
    if not ON_GPU:  # the interpreter's bf16 dots are broken: keep bf16 N0 rows on the torch path
        for d in (16, 64, 80):
            attention_fast._TRITON_OK[("n0", "cpu", None, torch.bfloat16, d)] = False
    yield
    attention_fast.reset_backend_cache()


def merge_want(o, lse, q, k_n, v_n, alpha, beta, valid, scale):
    return attention_fast._merge_block(o.float(), lse, q.float(), k_n, v_n, -alpha, beta, valid, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("dim", [16, 64, 80])
@pytest.mark.parametrize("n", [1, 8, 37])
def test_merge_kernel_matches_float32_math(dtype, dim, n):
    """Image-row merge on strided inputs (head_dim not a power of two included), into a strided dest."""
    q = heads_view(2, 3, 70, dim, dtype, 1)
    k, v = heads_view(2, 3, 20, dim, dtype, 2), heads_view(2, 3, 20, dim, dtype, 3)
    k_n, v_n = heads_view(2, 3, n, dim, dtype, 4), heads_view(2, 3, n, dim, dtype, 5)
    o, lse = attention_fast.chunked_attention_lse(q, k, v, 0.25)
    want = merge_want(o, lse, q, k_n, v_n, 3.3, 0.2, None, 0.25)
    got = at.image_rows_vsf(o, lse, q, k_n, v_n, 3.3, 0.2, None, 0.25)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    big = torch.zeros(2, 3, 90, dim, device=DEVICE, dtype=dtype)
    at.image_rows_vsf(o, lse, q, k_n, v_n, 3.3, 0.2, None, 0.25, dest=big[:, :, 10:80])
    torch.testing.assert_close(big[:, :, 10:80].float(), want, **TOL[dtype])
    assert not big[:, :, :10].any() and not big[:, :, 80:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_merge_kernel_padding_and_extremes(dtype):
    """Padded negatives (one sample all padding: exactly the unguided rows), alpha 0, large beta;
    20 keys so that the 16-bit kernel's second key block is partly padding."""
    q = heads_view(3, 2, 50, 32, dtype, 1)
    k, v = heads_view(3, 2, 9, 32, dtype, 2), heads_view(3, 2, 9, 32, dtype, 3)
    k_n, v_n = heads_view(3, 2, 20, 32, dtype, 4), heads_view(3, 2, 20, 32, dtype, 5)
    o, lse = attention_fast.chunked_attention_lse(q, k, v, 0.3)
    valid = torch.tensor([[True] * 20, [True, False] * 10, [False] * 20], device=DEVICE)
    valid[0, 17] = False
    for alpha, beta in ((3.3, 0.2), (0.0, 0.0), (6.0, 50.0), (-1.0, 0.0)):
        got = at.image_rows_vsf(o, lse, q, k_n, v_n, alpha, beta, valid, 0.3)
        torch.testing.assert_close(got.float(), merge_want(o, lse, q, k_n, v_n, alpha, beta, valid, 0.3), **TOL[dtype])
        assert torch.equal(got[2], o[2])


@pytest.mark.parametrize("dtype", N0_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dim", [64, 80])
@pytest.mark.parametrize("padded", [False, True])
def test_negative_rows_kernel_matches_float32_math(dtype, dim, padded):
    length, pos, neg = 300, slice(200, 260), slice(260, 268)
    q, k, v = (heads_view(2, 3, length, dim, dtype, s) for s in (1, 2, 3))
    valid = torch.tensor([[True] * 8, [True] * 3 + [False] * 5], device=DEVICE) if padded else None
    keys = torch.ones(2, length, dtype=torch.bool, device=DEVICE)
    keys[:, pos] = False
    if padded:
        keys[:, neg] &= valid
    s = torch.matmul(q[:, :, neg].float(), k.float().transpose(-1, -2)) / dim ** 0.5
    want = torch.matmul(torch.softmax(s.masked_fill(~keys[:, None, None, :], float("-inf")), -1), v.float())
    got = at.negative_rows(q[:, :, neg], k, v, pos, neg, valid, 1 / dim ** 0.5)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    dest = torch.zeros_like(q)
    at.negative_rows(q[:, :, neg], k, v, pos, neg, valid, 1 / dim ** 0.5, dest=dest[:, :, neg])
    torch.testing.assert_close(dest[:, :, neg].float(), want, **TOL[dtype])


ORDERS = {
    "image_first": lambda mask=None: text_layout(7, 4, offset=40, negative_mask=mask),
    "text_first": lambda mask=None: text_layout(7, 4, total=51, negative_mask=mask),
    "negative_first": lambda mask=None: text_layout(7, 4, negative_first=True, total=51, negative_mask=mask),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("padded", [False, True])
def test_vsf_joint_through_triton_matches_reference(order, dtype, padded, triton_on):
    mask = torch.tensor([[True] * 4, [True, True, False, False]]) if padded else None
    layout = ORDERS[order](mask)
    q, k, v = (heads_view(2, 3, layout.length, 16, dtype, s) for s in (1, 2, 3))
    got = attention_fast.vsf_joint(q, k, v, layout, 3.3, 0.2)
    assert attention_fast._TRITON_OK.get(("merge", q.device.type, q.device.index, dtype, 16))
    want = vsf_joint_reference(q, k, v, layout, 3.3, 0.2)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_bf16_error_is_kernel_sized(triton_on):
    """Same bound as test_attention_fast's: the fused merge must not add error beyond the kernel's."""
    layout = text_layout(77, 8, offset=512)
    q, k, v = (rand(1, 4, layout.length, 64, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))
    got = attention_fast.vsf_joint(q, k, v, layout, 3.3, 0.2).float()
    err = (got - vsf_joint_reference(q, k, v, layout, 3.3, 0.2).float()).abs()
    assert float(err.max()) < 4e-3 and float(err.mean()) < 3e-4


def test_beta_inf_and_disabled(monkeypatch):
    """beta = +inf stays the bit-exact unguided rows; VSF_TRITON=0 never touches the kernels."""
    layout = text_layout(7, 4, offset=40)
    q, k, v = (heads_view(2, 3, layout.length, 16, torch.float32, s) for s in (1, 2, 3))
    monkeypatch.setenv("VSF_TRITON", "1")
    attention_fast.reset_backend_cache()
    a = attention_fast.vsf_joint(q, k, v, layout, 0.0, float("inf"))
    monkeypatch.setenv("VSF_TRITON", "0")
    attention_fast.reset_backend_cache()
    b = attention_fast.vsf_joint(q, k, v, layout, 0.0, float("inf"))
    assert not any(key[0] == "merge" and ok for key, ok in attention_fast._TRITON_OK.items())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    attention_fast.reset_backend_cache()


@pytest.mark.skipif(not ON_GPU, reason="automatic selection only considers CUDA tensors")
def test_automatic_selection_on_cuda(monkeypatch):
    monkeypatch.delenv("VSF_TRITON", raising=False)
    attention_fast.reset_backend_cache()
    status = attention_fast.triton_status(DEVICE, torch.bfloat16, 64)
    assert status == {"merge": True, "n0": True}
    attention_fast.reset_backend_cache()
