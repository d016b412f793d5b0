"""Forge Neo Wan 2.1/2.2 (T2V and I2V) with the real host classes (tiny, CPU): VSF in text cross-attention.

Skips unless VSF_NEO_DIR points at a Forge Neo checkout. The independent computation replaces the
host's cross-attention `forward` methods by a few lines that project q/k/v with the block's own layers
and call `vsf_cross_reference` (paper eq. 9) on the text keys; Wan 2.1 I2V adds the untouched
attention over the 257 image-conditioning tokens, as the host does.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_vsf.attention import Guidance
from lib_vsf.attention.reference import vsf_cross_reference
from lib_vsf.layout import text_layout
from lib_vsf.patching import AttributePatch, PatchError
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.neo_wan import NeoWanAdapter, patch_wan
from spec_equations import check_cross_call
from vsf_host_setup import (Recorder, call_sampling_function, heads_first, heads_last, host_modules, import_host, init_weights, make_run,
                            negative_rows, stub_webui_shared)

TEXT_DIM, HEADS, IMAGE_TOKENS = 48, 4, 257


@pytest.fixture(scope="module")
def wan():
    with host_modules("neo"):
        yield import_host("backend.nn.wan")


def build(wan, kind):
    model = wan.WanModel(model_type=kind, patch_size=(1, 2, 2), in_dim=16 if kind == "t2v" else 36, dim=64,
                         ffn_dim=128, freq_dim=32, text_dim=TEXT_DIM, out_dim=16, num_heads=HEADS, num_layers=2)
    return init_weights(model, seed=11 if kind == "t2v" else 12)


def inputs(kind, positive_len, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inp = {
        "x": torch.randn(batch, 16 if kind == "t2v" else 36, 2, 8, 8, generator=gen),  # 2 x 4 x 4 = 32 tokens
        "timestep": torch.rand(batch, generator=gen) * 1000,
        "context": torch.randn(batch, positive_len, TEXT_DIM, generator=gen),
    }
    inp["clip_fea"] = torch.randn(batch, IMAGE_TOKENS, 1280, generator=gen) if kind == "i2v" else None
    return inp


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], inp["timestep"], context, clip_fea=inp["clip_fea"], transformer_options={})


def reference_patch(wan, run, alpha, beta):
    """Cross-attention computed from the block's own layers with `vsf_cross_reference`."""

    def text_part(self, x, context):
        q = heads_first(self.norm_q(self.q(x)), HEADS, False)
        k = heads_first(self.norm_k(self.k(context)), HEADS, False)
        v = heads_first(self.v(context), HEADS, False)
        layout = text_layout(run.positive_len, run.negative_len, total=k.shape[2], negative_mask=run.negative_mask)
        return heads_last(vsf_cross_reference(q, k, v, layout, alpha, beta))

    def t2v_forward(self, x, context, **kwargs):
        return self.o(text_part(self, x, context))

    def i2v_forward(self, x, context, context_img_len):
        image, text = context[:, :context_img_len], context[:, context_img_len:]
        q = heads_first(self.norm_q(self.q(x)), HEADS, False)
        k_img = heads_first(self.norm_k_img(self.k_img(image)), HEADS, False)
        v_img = heads_first(self.v_img(image), HEADS, False)
        image_out = heads_last(F.scaled_dot_product_attention(q, k_img, v_img))
        return self.o(text_part(self, x, text) + image_out)

    return (AttributePatch().add(wan.WanT2VCrossAttention, "forward", t2v_forward)
            .add(wan.WanI2VCrossAttention, "forward", i2v_forward))


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("positive_len", [10, 29])  # 29 + 3 negative = 32 = the video's token count
def test_patched_model_matches_reference(wan, kind, positive_len):
    model = build(wan, kind)
    inp = inputs(kind, positive_len)
    negative = negative_rows([3, 2], TEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(positive_len, negative, alpha=1.7, beta=0.2)

    with patch_wan(wan, run):
        guided = forward(model, inp, context)
    assert run.calls == 2  # one text cross-attention per block; self-attention and image tokens untouched
    with reference_patch(wan, run, 1.7, 0.2):
        expected = forward(model, inp, context)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert (guided - forward(model, inp, inp["context"])).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_text_calls_equal_eq9_written_out(wan, kind):
    """Each text cross-attention call against paper eq. 9 written out in float64 (`spec_equations`):
    keys `[P (10), N (4 slots; sample 1 has 2 real tokens)]`, `[B, L, heads*16]`."""
    model = build(wan, kind)
    inp = inputs(kind, 10, seed=6)
    lengths = [4, 2]
    negative = negative_rows(lengths, TEXT_DIM, seed=7)
    run = make_run(10, negative, alpha=1.7, beta=0.2)
    with patch_wan(wan, run):
        recorder = Recorder(wan.attention_function)
        with AttributePatch().add(wan, "attention_function", recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    text_calls = [c for c in recorder.calls if c[1].shape[1] == 14]
    assert len(text_calls) == 2  # one per block
    for q, k, v, args, kwargs, out in text_calls:
        check_cross_call(q, k, v, out, kwargs.get("heads", HEADS), range(10),
                         [range(10, 10 + n) for n in lengths], 1.7, 0.2)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_intercepted_text_call_matches_cross_reference(wan, kind):
    model = build(wan, kind)
    inp = inputs(kind, 10, seed=2)
    negative = negative_rows([4, 1], TEXT_DIM)
    run = make_run(10, negative, alpha=2.5, beta=0.3)
    with patch_wan(wan, run):
        recorder = Recorder(wan.attention_function)
        with AttributePatch().add(wan, "attention_function", recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    key_counts = [c[1].shape[1] for c in recorder.calls]
    per_block = [32, 14] if kind == "t2v" else [32, IMAGE_TOKENS, 14]  # self, (image,) text
    assert key_counts == per_block * 2
    q, k, v, args, kwargs, out = recorder.calls[len(per_block) - 1]
    layout = text_layout(10, 4, total=14, negative_mask=run.negative_mask)
    expected = heads_last(vsf_cross_reference(heads_first(q, HEADS, False), heads_first(k, HEADS, False),
                                              heads_first(v, HEADS, False), layout, 2.5, 0.3))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if kind == "i2v":  # the image-token call is the host's own attention, bit for bit
        q, k, v, args, kwargs, out = recorder.calls[1]
        assert torch.equal(out, wan.attention_function(q, k, v, *args, **kwargs))


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_alpha_zero_beta_inf_equals_unpatched(wan, kind):
    model = build(wan, kind)
    inp = inputs(kind, 10, seed=3)
    negative = negative_rows([5, 2], TEXT_DIM)
    run = make_run(10, negative, guidance=Guidance("vsf", 0.0, math.inf))
    with patch_wan(wan, run):
        guided = forward(model, inp, append_negative(inp["context"], negative))
    assert run.calls == 2
    torch.testing.assert_close(guided, forward(model, inp, inp["context"]), rtol=1e-4, atol=1e-5)


def test_empty_negative_restore_and_expert_swap(wan):
    """Empty negative: exact unguided output. A second model instance (Wan 2.2's low-noise expert,
    loaded mid-sampling) is guided by the same patch. After restore: the original names, bit for bit."""
    high, low = build(wan, "t2v"), init_weights(build(wan, "t2v"), seed=21)
    inp = inputs("t2v", 10, seed=4)
    originals = (wan.attention_function, wan.WanT2VCrossAttention.__dict__["forward"],
                 wan.WanI2VCrossAttention.__dict__["forward"])
    unpatched = forward(high, inp, inp["context"])

    run = make_run(10, negative_rows([0, 0], TEXT_DIM))
    with patch_wan(wan, run):
        assert torch.equal(forward(high, inp, inp["context"]), unpatched)
    assert run.calls == 0

    negative = negative_rows([3, 3], TEXT_DIM)
    run = make_run(10, negative)
    with patch_wan(wan, run):
        forward(high, inp, append_negative(inp["context"], negative))
        forward(low, inp, append_negative(inp["context"], negative))  # the swapped-in expert
    assert run.calls == 4
    assert (wan.attention_function, wan.WanT2VCrossAttention.__dict__["forward"],
            wan.WanI2VCrossAttention.__dict__["forward"]) == originals
    assert torch.equal(forward(high, inp, inp["context"]), unpatched)


def test_refuses_changed_host_without_patching(wan, monkeypatch):
    run = make_run(10, negative_rows([2], TEXT_DIM))
    original = wan.attention_function
    monkeypatch.setattr(wan.WanI2VCrossAttention, "forward", lambda self, x, context: x)  # host re-signed
    with pytest.raises(PatchError):
        patch_wan(wan, run)
    assert wan.attention_function is original
    monkeypatch.undo()
    monkeypatch.delattr(wan, "attention_function")
    with pytest.raises(PatchError):
        NeoWanAdapter(None).check()


def test_adapter_matches_wan_only(wan):
    holder = type("SD", (), {})()
    holder.forge_objects = type("F", (), {})()
    holder.forge_objects.unet = type("U", (), {})()
    holder.forge_objects.unet.model = type("M", (), {})()
    holder.forge_objects.unet.model.diffusion_model = build(wan, "t2v")
    assert NeoWanAdapter.matches(holder)
    holder.forge_objects.unet.model.diffusion_model = torch.nn.Linear(2, 2)
    assert not NeoWanAdapter.matches(holder)


# -- Neo's own sampling code with the adapter's per-pass hook --------------------------------------------

def make_p(wan, kind="t2v"):
    """A WebUI model object around a tiny Wan, sampled through Neo's UnetPatcher/KModel."""
    args = import_host("backend.args")
    if args.dynamic_args.get("ops") is None:  # set by Neo's loader for a real checkpoint
        args.dynamic_args["ops"] = ""
    stub_webui_shared()
    unet_patcher = import_host("backend.patcher.unet")
    k_prediction = import_host("backend.modules.k_prediction")
    model = build(wan, kind)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = model.offload_device = model.initial_device = torch.device("cpu")
    config = type("Config", (), {"sampling_settings": {"shift": 3.0}, "memory_usage_factor": 1.0})()
    unet = unet_patcher.UnetPatcher.from_model(model, diffusers_scheduler=None, config=config,
                                               k_predictor=k_prediction.PredictionDiscreteFlow(config))
    p = type("P", (), {})()
    p.sd_model = type("Engine", (), {})()
    p.sd_model.forge_objects = type("F", (), {})()
    p.sd_model.forge_objects.unet = unet
    return p


def sample_step(p, inp, cond_scale, uncond_context):
    """One denoiser evaluation through Neo's real `sampling_function`."""
    stub_webui_shared()
    sampling = import_host("backend.sampling.sampling_function")
    return call_sampling_function(sampling, p.sd_model, inp["x"], inp["context"], uncond_context, cond_scale)


def test_neo_sampling_single_pass_appends_negative(wan):
    from lib_vsf.settings import VSFSettings
    from lib_vsf.state import GuidanceRun
    from lib_vsf.webui.hosts.base import SamplingContext

    p, inp = make_p(wan), inputs("t2v", 10)
    negative = negative_rows([3, 5], TEXT_DIM)
    run = GuidanceRun(VSFSettings(alpha=1.7, beta=0.2))
    run.set_step(0, 4)
    ctx = SamplingContext(run, negative, single_pass=True)
    original_unet = p.sd_model.forge_objects.unet
    NeoWanAdapter(p.sd_model).attach(p, ctx)
    unet = p.sd_model.forge_objects.unet
    assert unet is not original_unet
    with patch_wan(wan, run):
        denoised, sigma = sample_step(p, inp, 5.0, torch.zeros_like(inp["context"]))
    assert run.calls == 2 and run.negative_len == 0  # one cond-only model call; text stream cleared after it
    with reference_patch(wan, make_run(10, negative, 1.7, 0.2), 1.7, 0.2), torch.no_grad():
        expected = unet.model.apply_model(inp["x"], sigma, c_crossattn=append_negative(inp["context"], negative),
                                          transformer_options={})
    torch.testing.assert_close(denoised, expected, atol=2e-5, rtol=1e-4)


def test_neo_sampling_outside_the_window_is_the_plain_pass(wan):
    from lib_vsf.settings import VSFSettings
    from lib_vsf.state import GuidanceRun
    from lib_vsf.webui.hosts.base import SamplingContext

    p, inp = make_p(wan), inputs("t2v", 10, seed=6)
    plain, _ = sample_step(p, inp, 1.0, inp["context"])
    run = GuidanceRun(VSFSettings(start=0.5, end=1.0))
    run.set_step(1, 4)
    NeoWanAdapter(p.sd_model).attach(p, SamplingContext(run, negative_rows([3, 3], TEXT_DIM), single_pass=True))
    with patch_wan(wan, run):
        out, _ = sample_step(p, inp, 1.0, inp["context"])
    assert torch.equal(out, plain) and run.calls == 0


def test_refiner_reloaded_as_a_new_model_keeps_the_negative(wan):
    """Wan 2.2: Neo may load the low-noise expert as a new model in `apply_refiner`; the adapter installs
    the same per-pass hook on it, so its steps stay guided (and single-pass)."""
    import types

    from lib_vsf.settings import VSFSettings
    from lib_vsf.state import GuidanceRun
    from lib_vsf.webui.hosts.base import SamplingContext
    from lib_vsf.webui.hosts.neo_wan import _has_vsf_hook, follow_refiner

    high, low = make_p(wan), make_p(wan)
    init_weights(low.sd_model.forge_objects.unet.model.diffusion_model, seed=31)
    loaded = {"model": high.sd_model}
    common = types.ModuleType("sd_samplers_common_stand_in")

    def apply_refiner(cfg_denoiser, x, sigma):  # Neo's reload path: a new model object becomes current
        loaded["model"] = low.sd_model
        return True

    common.apply_refiner = apply_refiner
    negative = negative_rows([3, 4], TEXT_DIM)
    run = GuidanceRun(VSFSettings(alpha=1.7, beta=0.2))
    run.set_step(2, 4)
    ctx = SamplingContext(run, negative, single_pass=True)
    NeoWanAdapter(high.sd_model).attach(high, ctx)
    follow_refiner(common, high.sd_model, ctx, loaded_model=lambda fallback: loaded["model"])
    assert not _has_vsf_hook(low.sd_model)
    assert common.apply_refiner(None, None, None) is True
    assert _has_vsf_hook(low.sd_model) and _has_vsf_hook(high.sd_model)

    inp = inputs("t2v", 10, seed=8)
    with patch_wan(wan, run):
        denoised, sigma = sample_step(low, inp, 5.0, torch.zeros_like(inp["context"]))
    assert run.calls == 2
    with reference_patch(wan, make_run(10, negative, 1.7, 0.2), 1.7, 0.2), torch.no_grad():
        expected = low.sd_model.forge_objects.unet.model.apply_model(
            inp["x"], sigma, c_crossattn=append_negative(inp["context"], negative), transformer_options={})
    torch.testing.assert_close(denoised, expected, atol=2e-5, rtol=1e-4)
    for undo in reversed(ctx.undo):
        undo()
    assert common.apply_refiner is apply_refiner
