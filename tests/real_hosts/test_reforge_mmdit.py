"""reForge SD3.5 (ComfyUI MMDiT port) with the real host classes (tiny, CPU): VSF in every joint attention.

Skips unless VSF_REFORGE_DIR points at a reForge checkout. The tiny model is SD3.5-Medium-shaped (an
extra image-only self-attention in block 0, which must stay unguided). The independent computation
replaces `mmdit.optimized_attention` by `vsf_joint_reference` for calls whose length is text + image
tokens (known here from the latent size), text first.
"""
from __future__ import annotations

import math

import pytest
import torch

from lib_vsf.attention import Guidance
from lib_vsf.attention.reference import vsf_joint_reference
from lib_vsf.layout import text_layout
from lib_vsf.patching import AttributePatch, PatchError
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.reforge_mmdit import ReforgeMMDiTAdapter, patch_mmdit
from spec_equations import check_joint_call
from vsf_host_setup import (Recorder, heads_first, heads_last, host_modules, import_host, init_weights, make_run,
                            negative_rows)

CONTEXT_DIM, POSITIVE_LEN, IMAGE_TOKENS, HEADS = 48, 7, 16, 2  # 8x8 latent, patch 2 -> 16 tokens; depth 2 -> 2 heads


@pytest.fixture(scope="module")
def reforge():
    with host_modules("reforge"):
        mmdit = import_host("ldm_patched.ldm.modules.diffusionmodules.mmdit")
        ops = import_host("ldm_patched.modules.ops")
        yield mmdit, ops


def build(reforge, seed=0):
    mmdit, ops = reforge
    model = mmdit.OpenAISignatureMMDITWrapper(
        patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=32,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
        pos_embed_max_size=16, num_patches=256, qk_norm="rms", x_block_self_attn_layers=[0],
        operations=ops.disable_weight_init)
    return init_weights(model, seed=seed)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 16, 8, 8, generator=gen),
        "t": torch.rand(batch, generator=gen),
        "context": torch.randn(batch, POSITIVE_LEN, CONTEXT_DIM, generator=gen),
        "y": torch.randn(batch, 32, generator=gen),
    }


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], inp["t"], context=context, y=inp["y"], transformer_options={})


def reference_patch(mmdit, run, alpha, beta):
    original = mmdit.optimized_attention

    def reference(q, k, v, heads, *args, **kwargs):
        if run.negative_len == 0 or q.shape[1] != run.text_len + IMAGE_TOKENS:
            return original(q, k, v, heads, *args, **kwargs)
        layout = text_layout(run.positive_len, run.negative_len, offset=0, total=q.shape[1],
                             negative_mask=run.negative_mask)
        q, k, v = (heads_first(t, heads, False) for t in (q, k, v))
        return heads_last(vsf_joint_reference(q, k, v, layout, alpha, beta))

    return AttributePatch().add(mmdit, "optimized_attention", reference)


def test_patched_model_matches_reference(reforge):
    mmdit, _ = reforge
    model = build(reforge)
    inp = inputs()
    negative = negative_rows([4, 2], CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    with patch_mmdit(mmdit, run):
        guided = forward(model, inp, context)
    assert run.calls == 2  # one joint call per block; block 0's image-only attention unguided
    with reference_patch(mmdit, run, 3.3, 0.2):
        expected = forward(model, inp, context)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert (guided - forward(model, inp, inp["context"])).abs().max() > 1e-4


def test_guided_calls_equal_the_spec_written_out(reforge):
    """Each joint call against VSF-SPEC written out in float64 (`spec_equations`): eq. 7/8 per image
    query, P rows over I u P, N0 rows over I u N0. Text first: `[P (7), N (4 slots; sample 0 has 1
    real token), I (16)]`, `[B, L, heads*64]`."""
    mmdit, _ = reforge
    model = build(reforge, seed=5)
    inp = inputs(seed=5)
    lengths = [1, 4]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=9)
    run = make_run(POSITIVE_LEN, negative, alpha=3.8, beta=0.2)
    with patch_mmdit(mmdit, run):
        recorder = Recorder(mmdit.optimized_attention)
        with AttributePatch().add(mmdit, "optimized_attention", recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    text = POSITIVE_LEN + 4
    joint = [c for c in recorder.calls if c[0].shape[1] == text + IMAGE_TOKENS]
    assert len(joint) == 2
    for q, k, v, args, kwargs, out in joint:
        check_joint_call(q, k, v, out, HEADS, range(text, text + IMAGE_TOKENS), range(POSITIVE_LEN),
                         [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths], 3.8, 0.2)


def test_intercepted_calls(reforge):
    """The joint call equals vsf_joint_reference; the image-only call is the host's own, bit for bit."""
    mmdit, _ = reforge
    model = build(reforge, seed=1)
    inp = inputs(seed=1)
    negative = negative_rows([3, 3], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative, alpha=2.0, beta=0.4)
    with patch_mmdit(mmdit, run):
        recorder = Recorder(mmdit.optimized_attention)
        with AttributePatch().add(mmdit, "optimized_attention", recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    lengths = [c[0].shape[1] for c in recorder.calls]
    joint = POSITIVE_LEN + 3 + IMAGE_TOKENS
    assert lengths == [joint, IMAGE_TOKENS, joint]
    q, k, v, args, kwargs, out = recorder.calls[0]
    layout = text_layout(POSITIVE_LEN, 3, total=joint)
    expected = vsf_joint_reference(*(heads_first(t, HEADS, False) for t in (q, k, v)), layout, 2.0, 0.4)
    torch.testing.assert_close(out, heads_last(expected), rtol=1e-4, atol=1e-5)
    q, k, v, args, kwargs, out = recorder.calls[1]
    assert torch.equal(out, mmdit.optimized_attention(q, k, v, *args, **kwargs))


def test_alpha_zero_beta_inf_equals_unpatched(reforge):
    mmdit, _ = reforge
    model = build(reforge, seed=2)
    inp = inputs(seed=2)
    negative = negative_rows([5, 1], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative, guidance=Guidance("vsf", 0.0, math.inf))
    with patch_mmdit(mmdit, run):
        guided = forward(model, inp, append_negative(inp["context"], negative))
    assert run.calls == 2
    torch.testing.assert_close(guided, forward(model, inp, inp["context"]), rtol=1e-4, atol=1e-5)


def test_empty_negative_and_restore_are_exact(reforge):
    mmdit, _ = reforge
    model = build(reforge, seed=3)
    inp = inputs(seed=3)
    originals = (mmdit.optimized_attention, mmdit._block_mixing)
    unpatched = forward(model, inp, inp["context"])
    run = make_run(POSITIVE_LEN, negative_rows([0, 0], CONTEXT_DIM))
    with patch_mmdit(mmdit, run):
        assert torch.equal(forward(model, inp, inp["context"]), unpatched)
    assert run.calls == 0
    negative = negative_rows([2, 4], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative)
    patch = patch_mmdit(mmdit, run).apply()
    try:
        forward(model, inp, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert run.calls == 2
    assert (mmdit.optimized_attention, mmdit._block_mixing) == originals
    assert torch.equal(forward(model, inp, inp["context"]), unpatched)


def test_refuses_changed_host_without_patching(reforge, monkeypatch):
    mmdit, _ = reforge
    original = mmdit.optimized_attention
    monkeypatch.setattr(mmdit, "_block_mixing", lambda context, x: None)  # host re-signed
    with pytest.raises(PatchError):
        patch_mmdit(mmdit, make_run(POSITIVE_LEN, negative_rows([2], CONTEXT_DIM)))
    assert mmdit.optimized_attention is original
    with pytest.raises(PatchError):
        ReforgeMMDiTAdapter(None).check()


def test_adapter_matches_mmdit_only(reforge):
    holder = type("SD", (), {})()
    holder.forge_objects = type("F", (), {})()
    holder.forge_objects.unet = type("U", (), {})()
    holder.forge_objects.unet.model = type("M", (), {})()
    holder.forge_objects.unet.model.diffusion_model = build(reforge)
    assert ReforgeMMDiTAdapter.matches(holder)
    holder.forge_objects.unet.model.diffusion_model = torch.nn.Linear(2, 2)
    assert not ReforgeMMDiTAdapter.matches(holder)
