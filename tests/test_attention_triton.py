"""The optional Triton kernels (lib_vsf.attention.triton_kernels) against the float32 reference math.

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

from lib_vsf.attention import fast as attention_fast  # noqa: E402
from lib_vsf.attention.reference import vsf_joint_reference  # noqa: E402
from lib_vsf.layout import text_layout  # noqa: E402

at = pytest.importorskip("lib_vsf.attention.triton_kernels")
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


def merge_want(q, k, v, k_n, v_n, alpha, beta, valid, scale):
    """Paper eq. 7/8 (VSF-SPEC.md, "Equivalence") per image row, in float64 from the raw inputs:
    A+ = sum_P exp(s), A- = sum_N exp(s - beta) over the real negative keys, W = A+ / (A+ + A-),
    Z = W Z+ - alpha (1 - W) Z-, with Z+ / Z- plain attention over the keys k / the real keys k_n.
    A sample whose negative is all padding has A- = 0, so W = 1 and Z = Z+."""
    q, k, v, k_n, v_n = (t.double() for t in (q, k, v, k_n, v_n))
    s_plus = torch.matmul(q, k.transpose(-1, -2)) * scale
    s_neg = torch.matmul(q, k_n.transpose(-1, -2)) * scale - beta
    real = torch.ones(q.shape[0], k_n.shape[2], dtype=torch.bool, device=q.device) if valid is None else valid
    s_neg = s_neg.masked_fill(~real[:, None, None, :], float("-inf"))
    a_plus, a_minus = s_plus.exp().sum(-1, keepdim=True), s_neg.exp().sum(-1, keepdim=True)
    z_plus = torch.matmul(s_plus.exp(), v) / a_plus
    z_minus = torch.matmul(s_neg.exp(), v_n) / a_minus.clamp_min(torch.finfo(torch.float64).tiny)
    w = a_plus / (a_plus + a_minus)
    return w * z_plus - alpha * (1 - w) * z_minus


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("dim", [16, 64, 80])
@pytest.mark.parametrize("n", [1, 8, 37])
def test_merge_kernel_matches_float32_math(dtype, dim, n):
    """Image-row merge on strided inputs (head_dim not a power of two included), into a strided dest."""
    q = heads_view(2, 3, 70, dim, dtype, 1)
    k, v = heads_view(2, 3, 20, dim, dtype, 2), heads_view(2, 3, 20, dim, dtype, 3)
    k_n, v_n = heads_view(2, 3, n, dim, dtype, 4), heads_view(2, 3, n, dim, dtype, 5)
    o, lse = attention_fast.chunked_attention_lse(q, k, v, 0.25)
    want = merge_want(q, k, v, k_n, v_n, 3.3, 0.2, None, 0.25)
    got = at.image_rows_vsf(o, lse, q, k_n, v_n, 3.3, 0.2, None, 0.25)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    big = torch.zeros(2, 3, 90, dim, device=DEVICE, dtype=dtype)
    at.image_rows_vsf(o, lse, q, k_n, v_n, 3.3, 0.2, None, 0.25, dest=big[:, :, 10:80])
    torch.testing.assert_close(big[:, :, 10:80].double(), want, **TOL[dtype])
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
        want = merge_want(q, k, v, k_n, v_n, alpha, beta, valid, 0.3)
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
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


class LaunchCounter:
    """Stands in for a `@triton.jit` kernel in attention_triton's namespace and counts `kernel[grid](...)`."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches += 1
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def merge_launches(monkeypatch):
    """() -> number of image-merge kernel launches so far (either merge kernel)."""
    counters = [LaunchCounter(getattr(at, name)) for name in ("_image_merge_kernel", "_image_merge_dot_kernel")]
    monkeypatch.setattr(at, "_image_merge_kernel", counters[0])
    monkeypatch.setattr(at, "_image_merge_dot_kernel", counters[1])
    return lambda: sum(c.launches for c in counters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_vsf_joint_triton_and_torch_paths_agree(dtype, monkeypatch, merge_launches):
    """Finite beta: VSF_TRITON=1 runs the merge kernel (one launch, selection flag set), VSF_TRITON=0
    launches nothing; both outputs agree within dtype tolerance."""
    layout = text_layout(7, 4, offset=40)
    q, k, v = (heads_view(2, 3, layout.length, 16, dtype, s) for s in (1, 2, 3))
    key = ("merge", q.device.type, q.device.index, dtype, 16)
    monkeypatch.setenv("VSF_TRITON", "1")
    monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)
    attention_fast.reset_backend_cache()
    with_kernel = attention_fast.vsf_joint(q, k, v, layout, 3.3, 0.2)
    assert merge_launches() == 1 and attention_fast._TRITON_OK.get(key) is True
    monkeypatch.setenv("VSF_TRITON", "0")
    attention_fast.reset_backend_cache()
    torch_path = attention_fast.vsf_joint(q, k, v, layout, 3.3, 0.2)
    assert merge_launches() == 1 and key not in attention_fast._TRITON_OK
    torch.testing.assert_close(with_kernel.float(), torch_path.float(), **TOL[dtype])
    attention_fast.reset_backend_cache()


def test_beta_inf_is_the_unguided_pass_even_with_kernels_forced(monkeypatch, merge_launches):
    """beta = +inf removes N1: image and P rows are the unguided {I, P} pass bit for bit, no merge launch."""
    layout = text_layout(7, 4, offset=40)
    q, k, v = (heads_view(2, 3, layout.length, 16, torch.float32, s) for s in (1, 2, 3))
    monkeypatch.setenv("VSF_TRITON", "1")
    attention_fast.reset_backend_cache()
    got = attention_fast.vsf_joint(q, k, v, layout, 3.3, float("inf"))
    assert merge_launches() == 0
    keep = (layout.roles() != 2).nonzero().flatten()
    unguided, _ = attention_fast.attention_lse(q[:, :, keep], k[:, :, keep], v[:, :, keep], 0.25)
    assert torch.equal(got[:, :, keep], unguided)
    s = torch.matmul(q[:, :, keep].double(), k[:, :, keep].double().transpose(-1, -2)) * 0.25
    torch.testing.assert_close(got[:, :, keep].double(), torch.softmax(s, -1) @ v[:, :, keep].double(),
                               **TOL[torch.float32])
    attention_fast.reset_backend_cache()


@pytest.mark.skipif(not ON_GPU, reason="automatic selection only considers CUDA tensors")
def test_automatic_selection_on_cuda(monkeypatch):
    monkeypatch.delenv("VSF_TRITON", raising=False)
    attention_fast.reset_backend_cache()
    status = attention_fast.triton_status(DEVICE, torch.bfloat16, 64)
    assert status == {"merge": True, "n0": True}
    attention_fast.reset_backend_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("masked", [False, True])
def test_vsf_joint_with_reference_tokens_through_triton(dtype, masked, triton_on, monkeypatch, merge_launches):
    """Reference-image tokens R ([P, N, I, R], Flux Kontext order) and a positive mask through the fused
    kernels: the merge serves the true image rows only, the N0 kernel (16-bit) sees R; equals the dense
    reference."""
    from lib_vsf.layout import TokenLayout
    n0 = LaunchCounter(at._negative_rows_partial_kernel)
    monkeypatch.setattr(at, "_negative_rows_partial_kernel", n0)
    pm = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]) if masked else None
    nm = torch.tensor([[True] * 4, [True, True, False, False]]) if masked else None
    layout = TokenLayout(63, slice(0, 7), slice(7, 11), nm, reference=slice(51, 63), positive_mask=pm)
    q, k, v = (heads_view(2, 3, layout.length, 16, dtype, s) for s in (1, 2, 3))
    got = attention_fast.vsf_joint(q, k, v, layout, 3.3, 0.2)
    assert merge_launches() == 1
    assert n0.launches == (1 if dtype == torch.float16 else 0)
    want = vsf_joint_reference(q, k, v, layout, 3.3, 0.2)
    rows = list(range(63)) if not masked else [i for i in range(63) if i not in (9, 10)]  # padded N0 rows
    torch.testing.assert_close(got[0].float(), want[0].float(), **TOL[dtype])
    torch.testing.assert_close(got[1][:, rows].float(), want[1][:, rows].float(), **TOL[dtype])
