"""Forge Flux (`backend/nn/flux.py`) with Forge's own classes, tiny, on CPU.

Skips unless VSF_FORGE_DIR points at a Forge checkout (verified with lllyasviel/stable-diffusion-webui-
forge dfdcbab6). The replaced name is `backend.nn.flux.attention_function` (after RoPE, `[B, H, L, D]`
in, `[B, L, H*D]` out); on CPU Forge binds its sub-quadratic kernel there, which keeps running every
unguided call. The independent computation replaces the same name by `vsf_joint_reference` for
every call (all Flux attention is joint, text first).
"""
from __future__ import annotations

import pytest
import torch

from lib_vsf.attention.reference import vsf_joint_reference
from lib_vsf.layout import text_layout
from lib_vsf.patching import AttributePatch, PatchError
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.forge_flux import ForgeFluxAdapter, patch_flux_module
from spec_equations import check_joint_call
from vsf_host_setup import Recorder, git_commit, host_modules, import_host, init_weights, make_run, negative_rows

CONTEXT_DIM, POSITIVE_LEN, HEADS = 48, 6, 2


@pytest.fixture(scope="module")
def forge():
    with host_modules("forge") as root:
        flux = import_host("backend.nn.flux")
        print(f"Forge checkout {root} at {git_commit(root)}")
        yield flux


def build(flux, seed=0):
    model = flux.IntegratedFluxTransformer2DModel(
        in_channels=16, vec_in_dim=32, context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=2.0, num_heads=HEADS,
        depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True)
    return init_weights(model, seed=seed)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 8, 8, generator=gen), "t": torch.rand(batch, generator=gen),
            "context": torch.randn(batch, POSITIVE_LEN, CONTEXT_DIM, generator=gen),
            "y": torch.randn(batch, 32, generator=gen), "guidance": torch.full((batch,), 3.5)}


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], inp["t"], context, inp["y"], guidance=inp["guidance"])


def reference_attention(flux, negative, alpha, beta):
    """Independent stand-in for `flux.attention_function`: the dense-mask reference, text first."""
    calls = []

    def attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
        assert skip_reshape
        length = q.shape[2]
        layout = text_layout(POSITIVE_LEN, negative.length, offset=0, total=length, negative_mask=negative.mask)
        calls.append(length)
        out = vsf_joint_reference(q, k, v, layout, alpha, beta)
        b, h, _, d = out.shape
        return out.transpose(1, 2).reshape(b, length, h * d)

    return AttributePatch().add(flux, "attention_function", attention_function), calls


def test_patched_forward_matches_reference_in_double_and_single_blocks(forge):
    model, inp = build(forge), inputs()
    negative = negative_rows([3, 5], CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(POSITIVE_LEN, negative, alpha=6.0, beta=0.2)
    with patch_flux_module(forge, run):
        guided = forward(model, inp, context)
    ref_patch, calls = reference_attention(forge, negative, 6.0, 0.2)
    with ref_patch:
        expected = forward(model, inp, context)
    assert run.calls == 2 and len(calls) == 2  # one double-stream and one single-stream block
    torch.testing.assert_close(guided, expected, atol=2e-5, rtol=1e-4)
    assert (guided - forward(model, inp, inp["context"])).abs().max() > 1e-3


def test_guided_calls_equal_the_spec_written_out(forge):
    """Both guided calls (double- and single-stream) against VSF-SPEC written out in float64
    (`spec_equations`): eq. 7/8 per image query, P rows over I u P, N0 rows over I u N0. Text first:
    `[P (6), N (5 slots; sample 0 has 3 real tokens), I (16)]`, `[B, H, L, D]` after Forge's RoPE."""
    model, inp = build(forge, seed=2), inputs(seed=3)
    lengths = [3, 5]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=6)
    run = make_run(POSITIVE_LEN, negative, alpha=6.0, beta=0.2)
    with patch_flux_module(forge, run):
        recorder = Recorder(forge.attention_function)
        with AttributePatch().add(forge, "attention_function", recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    assert len(recorder.calls) == 2
    text = POSITIVE_LEN + 5
    for q, k, v, args, kwargs, out in recorder.calls:
        assert kwargs.get("skip_reshape") is True and q.shape[1:3] == (HEADS, text + 16)
        check_joint_call(q, k, v, out, HEADS, range(text, text + 16), range(POSITIVE_LEN),
                         [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths], 6.0, 0.2, heads_first=True)


def test_restore_is_exact_and_bit_for_bit(forge):
    model, inp = build(forge), inputs()
    original = forge.attention_function
    before = forward(model, inp, inp["context"])
    negative = negative_rows([4, 1], CONTEXT_DIM)
    with pytest.raises(ValueError):
        with patch_flux_module(forge, make_run(POSITIVE_LEN, negative)):
            forward(model, inp, append_negative(inp["context"], negative))
            raise ValueError("interrupted mid-generation")
    assert forge.attention_function is original
    assert torch.equal(forward(model, inp, inp["context"]), before)


def test_changed_host_signature_is_refused_softly(forge, monkeypatch):
    monkeypatch.setattr(forge, "attention_function", lambda q, k, v: q)
    with pytest.raises(PatchError):
        patch_flux_module(forge, make_run(POSITIVE_LEN, negative_rows([2], CONTEXT_DIM)))


def test_adapter_detects_forge_flux(forge):
    engine = type("Flux", (), {})()
    engine.forge_objects = type("F", (), {})()
    engine.forge_objects.unet = type("U", (), {})()
    engine.forge_objects.unet.model = type("K", (), {})()
    engine.forge_objects.unet.model.diffusion_model = build(forge)
    assert ForgeFluxAdapter.matches(engine)
    ForgeFluxAdapter(engine).check()
    assert "PyTorch SDPA" in (ForgeFluxAdapter(engine).backend_note() or "")  # CPU Forge picks sub-quadratic
