"""The user's attention libraries as VSF's LSE backends (lib_vsf/attention/backends.py), how one is
chosen (lib_vsf/attention/fast.py's selection seam) and how the WebUI glue reads the host's choice
(lib_vsf/webui/attention_backend.py).

The libraries are not installed on CPU CI, so stand-ins play them: small modules put in `sys.modules`
with each library's documented signature and return shapes (flash-attn: `[B, L, H, D]` tensors, LSE
`[B, H, L]`; xformers: the same with the LSE padded to 32 queries; SageAttention 2: `[B, H, L, D]` with
`return_lse`), computing in float64. VSF's output is checked against the paper's eq. 7/8 written out
here. CUDA-only tests at the end check each really installed library against float32 math.
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from lib_vsf.attention import backends
from lib_vsf.attention import fast as attention_fast
from lib_vsf.attention.fast import vsf_cross, vsf_joint
from lib_vsf.layout import text_layout

B, H, D = 2, 3, 16
LI, LP, N = 37, 6, 4
ALPHA, BETA = 3.3, 0.2


@pytest.fixture(autouse=True)
def clean_selection(monkeypatch):
    monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)
    monkeypatch.setenv("VSF_TRITON", "0")
    monkeypatch.setattr(backends, "_reasons", {})  # why-not-used notes of earlier tests
    previous = backends.set_preferred_backend(None)
    attention_fast.reset_backend_cache()
    backends.take_used()
    yield
    backends.set_preferred_backend(previous)
    attention_fast.reset_backend_cache()
    backends.take_used()


def qkv(length, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, length, D, generator=g).to(dtype) for _ in range(3))


# -- the spec, written out: eq. 7/8 per query row, plain float64 math --------------------------------------

def vsf_joint_oracle(q, k, v, image, positive, negative, valid, alpha, beta, scale):
    """VSF-SPEC.md / paper eq. 7/8 for one joint sequence. Image rows: softmax over the logits of the
    image and positive keys and of the real negative keys shifted by -beta, values V_I, V_P and
    -alpha V_N. Positive rows: softmax over {I, P}. Negative rows: softmax over {I, real N}."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        real_n = [j for i, j in enumerate(negative) if valid is None or bool(valid[b, i])]
        for h in range(q.shape[1]):
            s = q[b, h] @ k[b, h].T * scale
            for rows, keys, shifts, signs in (
                    (image, image + positive + real_n, [0.0] * len(image + positive) + [-beta] * len(real_n),
                     [1.0] * len(image + positive) + [-alpha] * len(real_n)),
                    (positive, image + positive, [0.0] * len(image + positive), [1.0] * len(image + positive)),
                    (negative, image + real_n, [0.0] * len(image + real_n), [1.0] * len(image + real_n))):
                if not rows:
                    continue
                logits = s[rows][:, keys] + torch.tensor(shifts, dtype=torch.float64)
                weights = torch.softmax(logits, dim=-1)
                values = v[b, h][keys] * torch.tensor(signs, dtype=torch.float64)[:, None]
                out[b, h, rows] = weights @ values
    return out


def spans(layout):
    pos = list(range(layout.positive.start, layout.positive.stop))
    neg = list(range(layout.negative.start, layout.negative.stop))
    image = [i for i in range(layout.length) if i not in pos and i not in neg]
    return image, pos, neg


def plain_float64(q, k, v, scale):
    """Attention and its natural-log LSE in float64, [B, H, L, D] in and out."""
    s = q.double() @ k.double().transpose(-1, -2) * scale
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


# -- stand-ins shaped like each library's documented API ---------------------------------------------------

def fake_flash_attn(calls):
    """flash-attn 2: flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, ..., return_attn_probs)
    on [B, L, H, D]; returns (out [B, L, H, D], softmax_lse [B, H, L], S_dmask) with return_attn_probs."""
    mod = types.ModuleType("flash_attn")
    mod.__version__ = "2.99-test"

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        calls.append(tuple(q.shape))
        assert dropout_p == 0.0 and not causal
        out, lse = plain_float64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
        out = out.transpose(1, 2).to(q.dtype)
        return (out, lse.float(), None) if return_attn_probs else out

    mod.flash_attn_func = flash_attn_func
    return mod


def fake_xformers(calls, pad_to=32):
    """xformers: fmha's memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias, p,
    scale, *, op) on [B, M, H, K]; returns (out [B, M, H, K], lse [B, H, Mq padded to 32 queries])."""
    xformers = types.ModuleType("xformers")
    xformers.__version__ = "0.99-test"
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=None, p=0.0, scale=None,
                                                          *, op=None):
        calls.append(tuple(query.shape))
        assert attn_bias is None and p == 0.0
        out, lse = plain_float64(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale)
        rows = lse.shape[-1]
        padded = torch.full((*lse.shape[:2], -(-rows // pad_to) * pad_to), float("inf"))
        padded[..., :rows] = lse
        return out.transpose(1, 2).to(query.dtype), padded.float()

    ops.memory_efficient_attention_forward_requires_grad = memory_efficient_attention_forward_requires_grad
    ops.memory_efficient_attention = lambda q, k, v, attn_bias=None, p=0.0, scale=None: None
    xformers.ops = ops
    return {"xformers": xformers, "xformers.ops": ops}


def fake_sage(calls, version=2, log2=False):
    """SageAttention 2: sageattn(q, k, v, tensor_layout="HND", is_causal, sm_scale, return_lse, **kwargs)
    on [B, H, L, D]; returns (out, lse [B, H, L]) with return_lse. Version 1 has no return_lse.
    `log2`: a wrong-base LSE (what the kernels hold before sageattn converts it)."""
    mod = types.ModuleType("sageattention")
    mod.__version__ = f"{version}.0-test"
    if version == 1:
        def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
            calls.append(tuple(q.shape))
            return plain_float64(q, k, v, sm_scale)[0].to(q.dtype)
    else:
        def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
            calls.append(tuple(q.shape))
            assert tensor_layout == "HND"
            out, lse = plain_float64(q, k, v, sm_scale)
            lse = lse / math.log(2) if log2 else lse
            return (out.to(q.dtype), lse.float()) if return_lse else out.to(q.dtype)
    mod.sageattn = sageattn
    return mod


def install(monkeypatch, modules: dict):
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


# -- 1. the LSE merge on a stand-in backend equals eq. 7/8 --------------------------------------------------

LAYOUTS = {
    "image_first": lambda mask=None: text_layout(LP, N, offset=LI, negative_mask=mask),
    "negative_first": lambda mask=None: text_layout(LP, N, negative_first=True, total=LI + LP + N, negative_mask=mask),
}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("order", sorted(LAYOUTS))
def test_vsf_on_a_float64_lse_stand_in_equals_eq_7_8(order, padded, monkeypatch):
    calls = []

    def standin(q, k, v, scale):
        calls.append(tuple(q.shape))
        out, lse = plain_float64(q, k, v, scale)
        return out.to(q.dtype), lse

    monkeypatch.setitem(attention_fast._FACTORIES, "standin", lambda: standin)
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", "standin")
    mask = torch.tensor([[True, True, False, True], [False] * 4]) if padded else None
    layout = LAYOUTS[order](mask)
    q, k, v = qkv(layout.length, seed=3)
    scale = 1 / math.sqrt(D)
    got = vsf_joint(q, k, v, layout, ALPHA, BETA)
    assert attention_fast.select_backend(q.device, q.dtype, D)[0] == "standin" and calls
    want = vsf_joint_oracle(q, k, v, *spans(layout), mask, ALPHA, BETA, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_cross_vsf_on_a_float64_lse_stand_in_equals_eq_9(monkeypatch):
    monkeypatch.setitem(attention_fast._FACTORIES, "standin",
                        lambda: lambda q, k, v, s: plain_float64(q, k, v, s))
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", "standin")
    layout = text_layout(LP, N)
    q = qkv(LI, seed=4)[0]
    k, v = qkv(LP + N, seed=5)[1:]
    got = vsf_cross(q, k, v, layout, ALPHA, BETA)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s = torch.cat([s[..., :LP], s[..., LP:] - BETA], -1)  # eq. 9: [s_P, s_N - beta]
    want = torch.softmax(s, -1) @ torch.cat([v[:, :, :LP], -ALPHA * v[:, :, LP:]], 2)
    assert attention_fast.select_backend(q.device, q.dtype, D)[0] == "standin"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# -- 2. each library's API, converted to the project's layout ------------------------------------------------

def check_library(monkeypatch, factory, calls, rows=67, keys=11):
    q, k, v = qkv(max(rows, keys), dtype=torch.float32, seed=7)
    q, k, v = q[:, :, :rows], k[:, :, :keys], v[:, :, :keys]
    fn = factory()
    assert fn is not None and fn.vsf_label
    out, lse = fn(q, k, v, 0.3)
    want_out, want_lse = plain_float64(q, k, v, 0.3)
    assert out.shape == (B, H, rows, D) and out.dtype == q.dtype
    assert lse.shape == (B, H, rows) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    assert calls


def test_flash_attn_layout_blhd_and_its_lse(monkeypatch):
    calls = []
    install(monkeypatch, {"flash_attn": fake_flash_attn(calls)})
    check_library(monkeypatch, backends.flash_attn_lse, calls)
    assert calls[0] == (B, 67, H, D)  # the library saw [B, L, H, D]


def test_xformers_layout_and_padded_lse(monkeypatch):
    calls = []
    install(monkeypatch, fake_xformers(calls))
    check_library(monkeypatch, backends.xformers_lse, calls)
    assert calls[0] == (B, 67, H, D)


def test_sage_hnd_layout_and_return_lse(monkeypatch):
    calls = []
    install(monkeypatch, {"sageattention": fake_sage(calls)})
    check_library(monkeypatch, backends.sage_lse, calls)
    assert calls[0] == (B, H, 67, D)
    assert backends.sage_lse().vsf_tolerance == backends.SAGE_TOLERANCE


def test_sage_1_without_return_lse_is_not_offered(monkeypatch):
    install(monkeypatch, {"sageattention": fake_sage([], version=1)})
    assert backends.sage_lse() is None
    assert "return_lse" in backends.unavailable_reason("sage")


def test_missing_libraries_are_not_offered_and_say_why(monkeypatch):
    for name in ("flash_attn", "flash_attn_interface", "xformers", "xformers.ops", "sageattention"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    for name, factory in backends.FACTORIES.items():
        assert factory() is None
        assert "ImportError" in backends.unavailable_reason(name) or "ModuleNotFound" in backends.unavailable_reason(name)


@pytest.mark.parametrize("library", ["flash_attn", "xformers", "sage"])
def test_each_library_stand_in_serves_vsf_exactly(library, monkeypatch):
    """Forced (VSF_ATTENTION_BACKEND), each converted library answers VSF's LSE calls and the result is
    eq. 7/8 (float32 inputs: float32 tolerance)."""
    calls = []
    modules = {"flash_attn": {"flash_attn": fake_flash_attn(calls)}, "xformers": fake_xformers(calls),
               "sage": {"sageattention": fake_sage(calls)}}[library]
    install(monkeypatch, modules)
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", library)
    layout = LAYOUTS["image_first"]()
    q, k, v = qkv(layout.length, dtype=torch.float32, seed=9)
    got = vsf_joint(q, k, v, layout, ALPHA, BETA)
    assert attention_fast.select_backend(q.device, q.dtype, D)[0] == library
    assert backends.take_used() == (library,) and len(calls) > 2  # first-use check + the two LSE passes
    want = vsf_joint_oracle(q, k, v, *spans(layout), None, ALPHA, BETA, 1 / math.sqrt(D))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


# -- 3. dispatch order and fallbacks ---------------------------------------------------------------------

def test_a_log2_lse_fails_the_first_use_check_and_is_skipped_with_one_warning(monkeypatch):
    install(monkeypatch, {"sageattention": fake_sage([], log2=True)})
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", "sage")
    layout = LAYOUTS["image_first"]()
    q, k, v = qkv(layout.length, dtype=torch.float32, seed=11)
    with pytest.warns(UserWarning, match="'sage'.*first-use check") as record:
        got = vsf_joint(q, k, v, layout, ALPHA, BETA)
        vsf_joint(q, k, v, layout, ALPHA, BETA)
    assert len([w for w in record if "'sage'" in str(w.message)]) == 1  # once per key, then cached
    assert attention_fast.select_backend(q.device, q.dtype, D)[0] != "sage"
    want = vsf_joint_oracle(q, k, v, *spans(layout), None, ALPHA, BETA, 1 / math.sqrt(D))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_forced_backend_that_is_not_installed_warns_and_uses_the_automatic_choice(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    automatic = attention_fast.select_backend(torch.device("cpu"), torch.float32, D)[0]
    attention_fast.reset_backend_cache()
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", "xformers")
    with pytest.warns(UserWarning, match="VSF_ATTENTION_BACKEND.*not usable.*(ImportError|ModuleNotFoundError)"):
        name = attention_fast.select_backend(torch.device("cpu"), torch.float32, D)[0]
    assert name == automatic != "xformers"


def test_unknown_forced_name_warns_and_unknown_preference_is_refused(monkeypatch):
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", "flashh")
    with pytest.warns(UserWarning, match="'flashh'.*unknown name"):
        attention_fast.select_backend(torch.device("cpu"), torch.float32, D)
    with pytest.raises(ValueError, match="unknown attention backend 'flashh'"):
        backends.set_preferred_backend("flashh")


def test_preferred_library_goes_first_on_cuda_only_and_keys_the_cache():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    default_cuda, default_cpu = attention_fast._order_for(cuda), attention_fast._order_for(cpu)
    assert not set(backends.LIBRARY_BACKENDS) & set(default_cuda)
    for name in backends.LIBRARY_BACKENDS:
        backends.set_preferred_backend(name)
        assert attention_fast._order_for(cuda) == (name,) + default_cuda
        assert attention_fast._order_for(cpu) == default_cpu
        assert attention_fast._key(cuda, torch.bfloat16, 64)[-1] == name
    backends.set_preferred_backend("sdpa")
    assert attention_fast._order_for(cuda) == default_cuda


def test_library_failing_on_a_real_call_is_dropped_for_the_next_choice(monkeypatch):
    calls = []
    install(monkeypatch, fake_xformers(calls))
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", "xformers")
    layout = text_layout(LP, N, offset=150)
    q, k, v = qkv(layout.length, dtype=torch.float32, seed=13)
    real = sys.modules["xformers.ops"].memory_efficient_attention_forward_requires_grad

    def fails_on_long(query, key, value, attn_bias=None, p=0.0, scale=None):
        if query.shape[1] > 100:
            raise RuntimeError("sequence too long for this kernel")
        return real(query, key, value, attn_bias=attn_bias, p=p, scale=scale)

    monkeypatch.setattr(sys.modules["xformers.ops"], "memory_efficient_attention_forward_requires_grad", fails_on_long)
    attention_fast.reset_backend_cache()
    monkeypatch.delenv("VSF_ATTENTION_BACKEND")
    automatic = attention_fast.select_backend(q.device, q.dtype, D)[0]
    monkeypatch.setenv("VSF_ATTENTION_BACKEND", "xformers")
    attention_fast.reset_backend_cache()
    with pytest.warns(UserWarning, match="'xformers' failed"):
        got = vsf_joint(q, k, v, layout, ALPHA, BETA)
    assert attention_fast.select_backend(q.device, q.dtype, D)[0] == automatic != "xformers"
    assert "xformers" not in backends.take_used()  # the failed call does not count as served
    want = vsf_joint_oracle(q, k, v, *spans(layout), None, ALPHA, BETA, 1 / math.sqrt(D))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


# -- 4. host preference glue, with host doubles --------------------------------------------------------------

def _named(name):
    def fn(*args, **kwargs):
        return None
    fn.__name__ = name
    return fn


@pytest.mark.parametrize("function,expected", [("attention_sage", "sage"), ("attention_flash", "flash_attn"),
                                               ("attention_xformers", "xformers"), ("attention_pytorch", "sdpa"),
                                               ("attention_split", None), ("attention_sub_quad", None)])
def test_forge_and_neo_attention_function_decides(function, expected, monkeypatch):
    from lib_vsf.webui.attention_backend import host_attention_backend
    monkeypatch.setitem(sys.modules, "backend.attention",
                        types.SimpleNamespace(attention_function=_named(function)))
    assert host_attention_backend() == expected


def test_reforge_optimized_attention_decides(monkeypatch):
    from lib_vsf.webui.attention_backend import host_attention_backend
    monkeypatch.delitem(sys.modules, "backend.attention", raising=False)
    monkeypatch.setitem(sys.modules, "ldm_patched.ldm.modules.attention",
                        types.SimpleNamespace(optimized_attention=_named("attention_xformers")))
    assert host_attention_backend() == "xformers"


@pytest.mark.parametrize("method,flags,expected", [("xformers", {}, "xformers"), ("sdp", {}, "sdpa"),
                                                   ("sdp-no-mem", {}, "sdpa"), ("Doggettx", {"xformers": True}, None),
                                                   (None, {"xformers": True}, "xformers"),
                                                   (None, {"force_enable_xformers": True}, "xformers"),
                                                   (None, {}, None)])
def test_a1111_applied_optimization_then_its_flags_decide(method, flags, expected, monkeypatch):
    from lib_vsf.webui.attention_backend import host_attention_backend
    for name in ("backend.attention", "ldm_patched.ldm.modules.attention"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "modules.sd_hijack",
                        types.SimpleNamespace(model_hijack=types.SimpleNamespace(optimization_method=method)))
    monkeypatch.setitem(sys.modules, "modules.shared", types.SimpleNamespace(
        cmd_opts=types.SimpleNamespace(**{"xformers": False, "force_enable_xformers": False, **flags})))
    assert host_attention_backend() == expected


def test_generation_prefers_the_host_library_for_its_pass_and_notes_what_ran(monkeypatch):
    """On the host double: during the guided pass the core prefers the host's library; afterwards the
    preference is back, and the note says VSF could not use the library (here: CPU tensors)."""
    from webui_host_double import ATTENTION_MODULE, DoubleAdapter, Processing, host_double

    seen = []

    def patch(self, run):
        from lib_vsf.patching import AttributePatch

        def guided_attention(q, k, v):
            run.calls += 1
            seen.append(backends.preferred_backend())
            layout = LAYOUTS["image_first"]()
            vsf_joint(*qkv(layout.length, dtype=torch.float32), layout, ALPHA, BETA)  # VSF's LSE calls
            return q - k - v
        return AttributePatch().add(ATTENTION_MODULE, "attention", guided_attention)

    monkeypatch.setattr(DoubleAdapter, "patch", patch)
    with host_double() as host:
        monkeypatch.setitem(sys.modules, "backend.attention",
                            types.SimpleNamespace(attention_function=_named("attention_xformers")))
        p = host.process_images(Processing(host, steps=2), [True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True])
    assert seen and set(seen) == {"xformers"}
    assert backends.preferred_backend() is None
    (note,) = [c for c in p.comments if "attention backend" in c]
    assert "xformers" in note and "CUDA tensors only" in note
    assert p.extra_generation_params["VSF note"] == note


def test_used_backend_note():
    from lib_vsf.webui.attention_backend import used_backend_note
    backends.record_use("xformers")
    assert used_backend_note("xformers") == "VSF ran its attention on your backend, xformers, with log-sum-exp."
    backends.record_use("cudnn")
    assert used_backend_note("sdpa") is None and backends.take_used() == ()  # the default host: no note
    backends.note_unusable("sage", "failed the check")
    backends.record_use("cudnn")
    note = used_backend_note("sage")
    assert "SageAttention" in note and "failed the check" in note and "PyTorch SDPA (cuDNN)" in note


def test_forge_note_stays_silent_for_libraries_vsf_can_use(monkeypatch):
    from lib_vsf.webui.hosts._forge_sampling import forge_backend_note
    module = types.ModuleType("backend.attention")
    module.attention_pytorch = _named("attention_pytorch")
    package = types.ModuleType("backend")
    package.attention = module
    monkeypatch.setitem(sys.modules, "backend", package)
    monkeypatch.setitem(sys.modules, "backend.attention", module)
    for name, silent in (("attention_xformers", True), ("attention_sage", True), ("attention_split", False)):
        module.attention_function = _named(name)
        assert (forge_backend_note() is None) == silent, name


# -- 5. the bench's --backend rows ---------------------------------------------------------------------------

def test_bench_backend_sdpa_rows_and_unavailable_library(tmp_path, monkeypatch, capsys):
    import json

    from lib_vsf.bench.runner import main
    path = tmp_path / "sdpa.json"
    assert main(["--backend", "sdpa", "--preset", "tiny", "--attention-only", "--repeats", "1",
                 "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert set(data["attention"]) == {"unguided", "cfg", "vsf_fast"}
    assert data["attention_check"]["vsf_fast_vs_reference_max_abs"] < 1e-4
    assert data["attention_check"]["aten_ops"]["compute"] > 0
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    assert main(["--backend", "xformers", "--preset", "tiny", "--attention-only", "--repeats", "1"]) == 2
    assert "'xformers' is not available here" in capsys.readouterr().err


# -- 6. the real libraries, on a GPU -----------------------------------------------------------------------

def _installed(module):
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("library,module", [("flash_attn", "flash_attn"), ("xformers", "xformers.ops"),
                                            ("sage", "sageattention")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cuda_real_library_against_float32_math(library, module, dtype):
    if not _installed(module):
        pytest.skip(f"{module} is not installed")
    fn = backends.FACTORIES[library]()
    assert fn is not None, backends.unavailable_reason(library)
    tol = 3e-2 if library != "sage" else backends.SAGE_TOLERANCE
    for head_dim in (64, 128):
        g = torch.Generator().manual_seed(head_dim)
        q, k, v = (torch.randn(2, 4, n, head_dim, generator=g).to("cuda", dtype) for n in (300, 77, 77))
        out, lse = fn(q, k, v, head_dim ** -0.5)
        s = q.float() @ k.float().transpose(-1, -2) * head_dim ** -0.5
        torch.testing.assert_close(lse, s.logsumexp(-1), rtol=tol, atol=tol)
        torch.testing.assert_close(out.float(), torch.softmax(s, -1) @ v.float(), rtol=tol, atol=tol)
        # preferred by the host, it serves VSF, and VSF equals the float32 reference
        from lib_vsf.attention.reference import vsf_joint_reference
        backends.set_preferred_backend(library)
        attention_fast.reset_backend_cache()
        layout = text_layout(77, 8, offset=1024)
        q, k, v = (torch.randn(1, 4, layout.length, head_dim, generator=g).to("cuda", dtype) for _ in range(3))
        got = vsf_joint(q, k, v, layout, ALPHA, BETA).float()
        assert attention_fast.select_backend(q.device, dtype, head_dim)[0] == library
        want = vsf_joint_reference(q, k, v, layout, ALPHA, BETA).float()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
