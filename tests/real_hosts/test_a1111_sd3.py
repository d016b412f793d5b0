"""AUTOMATIC1111 1.10 SD3 (`modules/models/sd3/mmdit.py`) with A1111's own MMDiT class, tiny, on CPU.

Skips unless VSF_A1111_DIR points at an A1111 checkout (verified with v1.10.1, 82a973c0). A1111's
`modules.shared` and `modules.sd_hijack` need the whole WebUI; `vsf_host_setup.host_modules("a1111")`
puts minimal stand-ins in their place (a `cmd_opts` parsed by A1111's own `cmd_args` parser with CPU
arguments, the two options the adapter reads) and removes them on exit. The independent computation replaces
`mmdit.attention` by `vsf_joint_reference` on joint calls (text first). The adapter's per-call hook
(`sd_model.apply_model` wrapper) is run on an SD3Inferencer-shaped object, with cond and uncond rows.
"""
from __future__ import annotations

import types

import pytest
import torch

from lib_vsf.attention.reference import vsf_joint_reference
from lib_vsf.layout import text_layout
from lib_vsf.patching import AttributePatch
from lib_vsf.settings import VSFSettings
from lib_vsf.state import GuidanceRun
from lib_vsf.webui.hosts._sai_mmdit import patch_mmdit_module
from lib_vsf.webui.hosts.a1111_sd3 import A1111SD3Adapter
from lib_vsf.webui.hosts.base import SamplingContext, append_negative
from spec_equations import check_joint_call
from vsf_host_setup import Recorder, git_commit, host_modules, import_host, init_weights, make_run, negative_rows

CONTEXT_DIM, POSITIVE_LEN, IMAGE_TOKENS = 48, 7, 16


@pytest.fixture(scope="module")
def a1111():
    with host_modules("a1111") as root:  # stand-ins for `modules.shared` / `modules.sd_hijack`: see there
        mmdit = import_host("modules.models.sd3.mmdit")
        print(f"A1111 checkout {root} at {git_commit(root)}")
        yield mmdit


def test_stand_ins_keep_a1111_devices_on_cpu(a1111):
    """`cmd_opts` is A1111's own parse of the CPU arguments: A1111's `modules.devices` imports and
    puts every module on the CPU; the `sd_hijack` stand-in refuses clearly."""
    devices = import_host("modules.devices")
    assert devices.get_device_for("sd") == devices.get_optimal_device() == torch.device("cpu")
    import modules.sd_hijack as sd_hijack  # type: ignore[import-not-found]
    with pytest.raises(AttributeError, match="test stand-in"):
        sd_hijack.TextualInversionEmbeddings  # noqa: B018


def build(mmdit, seed=0):
    model = mmdit.MMDiT(input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None, pos_embed_max_size=16,
                        patch_size=2, in_channels=16, depth=2, num_patches=256, adm_in_channels=32,
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
                        device="cpu", dtype=torch.float32)
    return init_weights(model, seed=seed)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 8, 8, generator=gen), "t": torch.rand(batch, generator=gen) * 1000,
            "context": torch.randn(batch, POSITIVE_LEN, CONTEXT_DIM, generator=gen),
            "y": torch.randn(batch, 32, generator=gen)}


def forward(model, inp, context, rows=slice(None)):
    with torch.no_grad():
        return model(inp["x"][rows], inp["t"][rows], y=inp["y"][rows], context=context)


def reference_attention(mmdit, negative, alpha, beta):
    original = mmdit.attention

    def attention(q, k, v, heads, mask=None):
        length = q.shape[1]
        if length != POSITIVE_LEN + negative.length + IMAGE_TOKENS:
            return original(q, k, v, heads, mask)
        b, _, width = q.shape
        qh, kh, vh = (t.view(b, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        layout = text_layout(POSITIVE_LEN, negative.length, total=length, negative_mask=negative.mask)
        out = vsf_joint_reference(qh, kh, vh, layout, alpha, beta)
        return out.transpose(1, 2).reshape(b, length, width)

    return AttributePatch().add(mmdit, "attention", attention)


def test_patched_forward_matches_reference(a1111):
    model, inp = build(a1111), inputs()
    negative = negative_rows([5, 2], CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(POSITIVE_LEN, negative, alpha=3.5, beta=0.1)
    with patch_mmdit_module(a1111, run):
        guided = forward(model, inp, context)
    with reference_attention(a1111, negative, 3.5, 0.1):
        expected = forward(model, inp, context)
    assert run.calls == 2
    torch.testing.assert_close(guided, expected, atol=2e-5, rtol=1e-4)
    assert (guided - forward(model, inp, inp["context"])).abs().max() > 1e-3


def test_guided_calls_equal_the_spec_written_out(a1111):
    """Each joint call (A1111's `block_mixing`: context, then x) against VSF-SPEC written out in float64
    (`spec_equations`): eq. 7/8 per image query, P rows over I u P, N0 rows over I u N0.
    `[P (7), N (3 slots; sample 1 has 2 real tokens), I (16)]`, `[B, L, heads*64]`."""
    model, inp = build(a1111, seed=6), inputs(seed=6)
    lengths = [3, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=10)
    run = make_run(POSITIVE_LEN, negative, alpha=3.5, beta=0.1)
    with patch_mmdit_module(a1111, run):
        recorder = Recorder(a1111.attention)
        with AttributePatch().add(a1111, "attention", recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    text = POSITIVE_LEN + 3
    assert [c[0].shape[1] for c in recorder.calls] == [text + IMAGE_TOKENS] * 2
    for q, k, v, args, kwargs, out in recorder.calls:
        check_joint_call(q, k, v, out, args[0], range(text, text + IMAGE_TOKENS), range(POSITIVE_LEN),
                         [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths], 3.5, 0.1)


def test_restore_is_exact_and_bit_for_bit(a1111):
    model, inp = build(a1111), inputs()
    originals = (a1111.attention, a1111.block_mixing)
    before = forward(model, inp, inp["context"])
    negative = negative_rows([3, 3], CONTEXT_DIM)
    with pytest.raises(KeyboardInterrupt):
        with patch_mmdit_module(a1111, make_run(POSITIVE_LEN, negative)):
            forward(model, inp, append_negative(inp["context"], negative))
            raise KeyboardInterrupt
    assert (a1111.attention, a1111.block_mixing) == originals
    assert torch.equal(forward(model, inp, inp["context"]), before)


def inferencer(a1111):
    """An object shaped like A1111's SD3Inferencer (class name and module are what detection reads)."""
    cls = type("SD3Inferencer", (), {"__module__": "modules.models.sd3.sd3_model"})
    sd_model = cls()
    sd_model.model = types.SimpleNamespace(diffusion_model=build(a1111))
    sd_model.apply_model = lambda x, t, cond: sd_model.model.diffusion_model(x, t, y=cond["vector"], context=cond["crossattn"])
    return sd_model


def test_adapter_guides_cond_rows_and_leaves_uncond_rows_alone(a1111):
    sd_model, inp = inferencer(a1111), inputs()
    assert A1111SD3Adapter.matches(sd_model)
    adapter = A1111SD3Adapter(sd_model)
    adapter.check()
    host_apply_model = sd_model.apply_model
    negative = negative_rows([4, 2], CONTEXT_DIM)
    run = GuidanceRun(VSFSettings(alpha=3.3, beta=0.2))
    ctx = SamplingContext(run, negative, single_pass=False)
    uncond = torch.randn_like(inp["context"])
    ctx.host_state["text_uncond"] = {"crossattn": uncond, "vector": inp["y"]}
    p = types.SimpleNamespace(extra_generation_params={})
    adapter.attach(p, ctx)
    patch = adapter.patch(run).apply()
    try:
        rows = torch.cat([inp["context"], uncond])  # A1111 batches [cond rows, uncond rows]
        both = {k: torch.cat([v, v]) for k, v in inp.items() if k != "context"}
        with torch.no_grad():
            out = sd_model.apply_model(both["x"], both["t"], {"crossattn": rows, "vector": both["y"]})
    finally:
        patch.restore()
        for undo in reversed(ctx.undo):
            undo()
    assert sd_model.apply_model is host_apply_model
    with reference_attention(a1111, negative, 3.3, 0.2):
        expected_cond = forward(sd_model.model.diffusion_model, inp, append_negative(inp["context"], negative))
    expected_uncond = forward(sd_model.model.diffusion_model, inp, uncond)
    torch.testing.assert_close(out[:2], expected_cond, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[2:], expected_uncond, atol=2e-5, rtol=1e-4)
