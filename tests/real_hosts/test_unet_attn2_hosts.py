"""SD1.5/SDXL-style UNets of Forge Neo, Forge and reForge with the real host classes (tiny, CPU):
VSF in every attn2 (paper eq. 9), attn1 untouched.

Each host skips unless its checkout is named: VSF_NEO_DIR, VSF_FORGE_DIR, VSF_REFORGE_DIR. The
independent computation replaces each transformer block's `attn2.forward` *on the instance* by a few
lines that project with the block's own layers and call `vsf_cross_reference`; the adapter instead
patches the module-level attention name and tells attn2 from attn1 with a call scope. One case makes
the text stream exactly as long as an image level (16 tokens), where counting keys alone would guide
self-attention too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from lib_vsf.attention import Guidance
from lib_vsf.attention.reference import vsf_cross_reference
from lib_vsf.layout import text_layout
from lib_vsf.patching import AttributePatch, PatchError
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.unet_attn2 import (ForgeUNetAdapter, NeoUNetAdapter, ReforgeUNetAdapter,
                                            patch_unet)
from spec_equations import CROSS_BUGS, check_cross_call, cross_expected
from vsf_host_setup import (Recorder, call_sampling_function, heads_first, heads_last, host_modules, import_host, init_weights, make_run,
                            negative_rows)

CONTEXT_DIM, HEADS_CHANNELS = 32, 16


@dataclass
class Host:
    name: str
    unet: ModuleType        # module defining the UNet class
    attention: ModuleType   # module defining CrossAttention and the attention name
    attention_name: str
    adapter: type

    def build(self, seed=0):
        common = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2),
                      num_head_channels=HEADS_CHANNELS, use_spatial_transformer=True, transformer_depth=[1, 1],
                      transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=CONTEXT_DIM,
                      use_linear_in_transformer=True)
        if self.name == "reforge":
            ops = import_host("ldm_patched.modules.ops")
            model = self.unet.UNetModel(image_size=None, operations=ops.disable_weight_init, **common)
        else:
            model = self.unet.IntegratedUNet2DConditionModel(**common)
        return init_weights(model, seed=seed)


@pytest.fixture(scope="module", params=["neo", "forge", "reforge"])
def host(request):
    with host_modules(request.param):
        if request.param == "reforge":
            unet = import_host("ldm_patched.ldm.modules.diffusionmodules.openaimodel")
            attention = import_host("ldm_patched.ldm.modules.attention")
            yield Host("reforge", unet, attention, "optimized_attention", ReforgeUNetAdapter)
        else:
            unet = import_host("backend.nn.unet")
            yield Host(request.param, unet, unet, "attention_function",
                       NeoUNetAdapter if request.param == "neo" else ForgeUNetAdapter)


def inputs(positive_len, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 4, 8, 8, generator=gen),  # attention levels: 64 and 16 tokens
        "t": torch.rand(batch, generator=gen) * 999,
        "context": torch.randn(batch, positive_len, CONTEXT_DIM, generator=gen),
    }


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], timesteps=inp["t"], context=context, transformer_options={})


def attn2_modules(model):
    return [m.attn2 for m in model.modules() if hasattr(m, "attn2") and hasattr(m, "attn1")]


def reference_patch(model, run, alpha, beta):
    """Every block's attn2 computed with `vsf_cross_reference` from its own projections."""
    patch = AttributePatch()
    for attn in attn2_modules(model):
        def reference_forward(x, context=None, *args, _attn=attn, **kwargs):
            q, k, v = (heads_first(t, _attn.heads, False) for t in (_attn.to_q(x), _attn.to_k(context), _attn.to_v(context)))
            layout = text_layout(run.positive_len, run.negative_len, total=k.shape[2], negative_mask=run.negative_mask)
            return _attn.to_out(heads_last(vsf_cross_reference(q, k, v, layout, alpha, beta)))
        patch.add(attn, "forward", reference_forward)
    return patch


@pytest.mark.parametrize("positive_len", [77, 13])  # 13 + 3 negative = 16 = the second level's image tokens
def test_patched_model_matches_reference(host, positive_len):
    model = host.build()
    inp = inputs(positive_len)
    negative = negative_rows([3, 2], CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(positive_len, negative, alpha=3.0, beta=0.2)
    with patch_unet(host.attention, host.attention_name, run):
        guided = forward(model, inp, context)
    assert run.calls == len(attn2_modules(model)) == 7  # 2 down, 1 middle, 4 up; attn1 never
    with reference_patch(model, run, 3.0, 0.2):
        expected = forward(model, inp, context)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert (guided - forward(model, inp, inp["context"])).abs().max() > 1e-4


def test_attn2_calls_equal_eq9_written_out(host):
    """Each attn2 call against paper eq. 9 written out in float64 (`spec_equations`): keys
    `[P (77), N (4 slots; sample 0 has 3 real tokens)]`, `[B, L, heads*16]` at both levels."""
    model = host.build(seed=3)
    inp = inputs(77, seed=3)
    lengths = [3, 4]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=3)
    run = make_run(77, negative, alpha=3.0, beta=0.2)
    with patch_unet(host.attention, host.attention_name, run):
        recorder = Recorder(getattr(host.attention, host.attention_name))
        with AttributePatch().add(host.attention, host.attention_name, recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    cross = [c for c in recorder.calls if c[1].shape[1] == 81]
    assert len(cross) == 7
    for q, k, v, args, kwargs, out in cross:
        check_cross_call(q, k, v, out, q.shape[-1] // HEADS_CHANNELS, range(77),
                         [range(77, 77 + n) for n in lengths], 3.0, 0.2)


def test_intercepted_calls(host):
    """attn2 calls equal vsf_cross_reference; attn1 calls are the host's own, bit for bit."""
    model = host.build(seed=1)
    inp = inputs(77, seed=1)
    negative = negative_rows([4, 4], CONTEXT_DIM)
    run = make_run(77, negative, alpha=2.0, beta=0.5)
    with patch_unet(host.attention, host.attention_name, run):
        recorder = Recorder(getattr(host.attention, host.attention_name))
        with AttributePatch().add(host.attention, host.attention_name, recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    cross = [c for c in recorder.calls if c[1].shape[1] == 81]
    self_calls = [c for c in recorder.calls if c[1].shape[1] != 81]
    assert len(cross) == 7 and len(self_calls) == 7
    heads = 32 // HEADS_CHANNELS  # first level: 32 channels / 16 per head
    q, k, v, args, kwargs, out = cross[0]
    expected = vsf_cross_reference(*(heads_first(t, heads, False) for t in (q, k, v)), text_layout(77, 4), 2.0, 0.5)
    torch.testing.assert_close(out, heads_last(expected), rtol=1e-4, atol=1e-5)
    original = getattr(host.attention, host.attention_name)
    for q, k, v, args, kwargs, out in self_calls:
        assert torch.equal(out, original(q, k, v, *args, **kwargs))


def test_alpha_zero_beta_inf_equals_unpatched(host):
    model = host.build(seed=2)
    inp = inputs(77, seed=2)
    negative = negative_rows([6, 1], CONTEXT_DIM)
    run = make_run(77, negative, guidance=Guidance("vsf", 0.0, math.inf))
    with patch_unet(host.attention, host.attention_name, run):
        guided = forward(model, inp, append_negative(inp["context"], negative))
    assert run.calls == 7
    torch.testing.assert_close(guided, forward(model, inp, inp["context"]), rtol=1e-4, atol=1e-5)


def test_empty_negative_and_restore_are_exact(host):
    model = host.build(seed=3)
    inp = inputs(77, seed=3)
    originals = (getattr(host.attention, host.attention_name), host.attention.CrossAttention.__dict__["forward"])
    unpatched = forward(model, inp, inp["context"])
    run = make_run(77, negative_rows([0, 0], CONTEXT_DIM))
    with patch_unet(host.attention, host.attention_name, run):
        assert torch.equal(forward(model, inp, inp["context"]), unpatched)
    assert run.calls == 0
    negative = negative_rows([2, 5], CONTEXT_DIM)
    run = make_run(77, negative)
    patch = patch_unet(host.attention, host.attention_name, run).apply()
    try:
        forward(model, inp, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert run.calls == 7
    assert (getattr(host.attention, host.attention_name), host.attention.CrossAttention.__dict__["forward"]) == originals
    assert torch.equal(forward(model, inp, inp["context"]), unpatched)


def test_refuses_changed_host_without_patching(host, monkeypatch):
    original = getattr(host.attention, host.attention_name)
    monkeypatch.setattr(host.attention.CrossAttention, "forward", lambda self, x: x)  # host re-signed
    with pytest.raises(PatchError):
        patch_unet(host.attention, host.attention_name, make_run(77, negative_rows([2], CONTEXT_DIM)))
    assert getattr(host.attention, host.attention_name) is original
    with pytest.raises(PatchError):
        host.adapter(None).check()


def test_adapter_matches(host):
    holder = type("SD", (), {})()
    holder.forge_objects = type("F", (), {})()
    holder.forge_objects.unet = type("U", (), {})()
    holder.forge_objects.unet.model = type("M", (), {})()
    holder.forge_objects.unet.model.diffusion_model = host.build()
    matching = [cls.__name__ for cls in (NeoUNetAdapter, ForgeUNetAdapter, ReforgeUNetAdapter) if cls.matches(holder)]
    if host.name == "reforge":
        assert matching == ["ReforgeUNetAdapter"]
    else:
        # Forge vs Neo is told apart by modules_forge/forge_version.py, importable here from the checkout.
        assert matching == ["NeoUNetAdapter" if host.name == "neo" else "ForgeUNetAdapter"]


# -- the host's own sampling code with the adapter's per-pass hook (Forge, Neo) ------------------------------

def make_p(host):
    """A WebUI model object around the tiny UNet, sampled through the host's UnetPatcher/KModel."""
    from vsf_host_setup import stub_webui_shared

    if host.name == "neo":
        args = import_host("backend.args")
        if args.dynamic_args.get("ops") is None:  # set by Neo's loader for a real checkpoint
            args.dynamic_args["ops"] = ""
        stub_webui_shared()
    unet_patcher = import_host("backend.patcher.unet")
    k_prediction = import_host("backend.modules.k_prediction")
    model = host.build(seed=9)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = model.offload_device = model.initial_device = torch.device("cpu")
    config = type("Config", (), {"sampling_settings": {"shift": 3.0}, "memory_usage_factor": 1.0})()
    if host.name == "neo":
        predictor = k_prediction.PredictionDiscreteFlow(config)
    else:
        predictor = k_prediction.PredictionDiscreteFlow(shift=3.0)
    unet = unet_patcher.UnetPatcher.from_model(model, diffusers_scheduler=None, config=config, k_predictor=predictor)
    p = type("P", (), {})()
    p.sd_model = type("Engine", (), {})()
    p.sd_model.forge_objects = type("F", (), {})()
    p.sd_model.forge_objects.unet = unet
    return p


def sample_step(p, inp, cond_scale, uncond_context):
    """One denoiser evaluation through the host's real `sampling_function`."""
    sampling = import_host("backend.sampling.sampling_function")
    return call_sampling_function(sampling, p.sd_model, inp["x"], inp["context"], uncond_context, cond_scale)


@pytest.mark.parametrize("single_pass", [True, False])
def test_host_sampling_appends_negative_to_conditional_rows(host, single_pass):
    if host.name == "reforge":
        pytest.skip("reForge's sampler imports the WebUI (gradio); its UNet attention is covered above")
    from lib_vsf.settings import VSFSettings
    from lib_vsf.state import GuidanceRun
    from lib_vsf.webui.hosts.base import SamplingContext

    p, inp = make_p(host), inputs(77, seed=10)
    negative = negative_rows([3, 6], CONTEXT_DIM)
    run = GuidanceRun(VSFSettings(alpha=3.0, beta=0.2))
    run.set_step(0, 4)
    host.adapter(p.sd_model).attach(p, SamplingContext(run, negative, single_pass=single_pass))
    unet = p.sd_model.forge_objects.unet
    uncond_context = torch.randn_like(inp["context"])
    with patch_unet(host.attention, host.attention_name, run):
        denoised, sigma = sample_step(p, inp, 4.0, uncond_context)
    assert run.negative_len == 0
    reference_run = make_run(77, negative, 3.0, 0.2)
    with torch.no_grad():
        with reference_patch(unet.model.diffusion_model, reference_run, 3.0, 0.2):
            cond = unet.model.apply_model(inp["x"], sigma, c_crossattn=append_negative(inp["context"], negative),
                                          transformer_options={})
        if single_pass:
            expected = cond
        else:  # CFG kept: uncond rows run exactly unguided
            uncond = unet.model.apply_model(inp["x"], sigma, c_crossattn=uncond_context, transformer_options={})
            expected = uncond + (cond - uncond) * 4.0
    torch.testing.assert_close(denoised, expected, atol=1e-4, rtol=1e-4)


# -- AUTOMATIC1111: ldm (SD1/SD2) and sgm (SDXL) CrossAttention ---------------------------------------------

@pytest.fixture(scope="module", params=["ldm", "sgm"])
def a1111(request):
    """A1111's UNet model code from its `repositories/` (VSF_A1111_REPOS_DIR); yields (unet module,
    attention module). The test uses the classes' own `forward`: A1111 swaps in an optimised one with
    the same signature, and the patch wraps whichever is there."""
    with host_modules("a1111-repos"):
        unet = import_host(f"{request.param}.modules.diffusionmodules.openaimodel")
        attention = import_host(f"{request.param}.modules.attention")
        yield request.param, unet, attention


def build_a1111(a1111, seed=0):
    kind, unet, _ = a1111
    common = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, attention_resolutions=[1, 2],
                  channel_mult=(1, 2), num_head_channels=HEADS_CHANNELS, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=CONTEXT_DIM, use_linear_in_transformer=True, legacy=False)
    model = unet.UNetModel(image_size=8, **common) if kind == "ldm" else unet.UNetModel(**common)
    return init_weights(model, seed=seed)


def a1111_forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], timesteps=inp["t"], context=context)


@pytest.mark.parametrize("positive_len", [77, 13])
def test_a1111_patched_unet_matches_reference(a1111, positive_len):
    from lib_vsf.webui.hosts.unet_attn2 import patch_a1111

    _, _, attention = a1111
    model = build_a1111(a1111)
    inp = inputs(positive_len, seed=11)
    negative = negative_rows([3, 2], CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(positive_len, negative, alpha=3.0, beta=0.2)
    original = attention.CrossAttention.__dict__["forward"]
    unpatched = a1111_forward(model, inp, inp["context"])
    with patch_a1111([attention.CrossAttention], run):
        guided = a1111_forward(model, inp, context)
    assert run.calls == len(attn2_modules(model)) == 7
    with reference_patch(model, run, 3.0, 0.2):
        expected = a1111_forward(model, inp, context)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert attention.CrossAttention.__dict__["forward"] is original
    assert torch.equal(a1111_forward(model, inp, inp["context"]), unpatched)


def test_a1111_attn2_calls_equal_eq9_written_out(a1111):
    """Each attn2 call of A1111's CrossAttention against paper eq. 9 written out in float64
    (`spec_equations`), from the block's own projections: `to_out(eq9(to_q(x), to_k(c), to_v(c)))`
    with keys `[P (77), N (5 slots; sample 1 has 2 real tokens)]`."""
    from lib_vsf.webui.hosts.unet_attn2 import patch_a1111

    _, _, attention = a1111
    model = build_a1111(a1111, seed=4)
    inp = inputs(77, seed=4)
    lengths = [5, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=4)
    run = make_run(77, negative, alpha=3.0, beta=0.2)
    calls = []
    with patch_a1111([attention.CrossAttention], run):
        patched = attention.CrossAttention.forward

        def recording_forward(self, x, context=None, *args, **kwargs):
            out = patched(self, x, context, *args, **kwargs)
            if context is not None:
                calls.append((self, x.detach().clone(), context.detach().clone(), out.detach().clone()))
            return out

        with AttributePatch().add(attention.CrossAttention, "forward", recording_forward):
            a1111_forward(model, inp, append_negative(inp["context"], negative))
    assert len(calls) == 7

    def project(linear, t):
        bias = None if linear.bias is None else linear.bias.double()
        return torch.nn.functional.linear(t.double(), linear.weight.double(), bias)

    for attn, x, context, out in calls:
        q, k, v = (project(layer, t).reshape(2, t.shape[1], attn.heads, -1).transpose(1, 2)
                   for layer, t in ((attn.to_q, x), (attn.to_k, context), (attn.to_v, context)))

        def expected(bug=None):
            z = cross_expected(q, k, v, range(77), [range(77, 77 + n) for n in lengths], 3.0, 0.2, bug=bug)
            return project(attn.to_out[0], z.transpose(1, 2).reshape(out.shape))

        torch.testing.assert_close(out.double(), expected(), atol=2e-5, rtol=1e-4)
        for bug in CROSS_BUGS:
            assert (out.double() - expected(bug)).abs().max() > 1e-3, bug


def test_a1111_alpha_zero_beta_inf_and_empty_negative(a1111):
    from lib_vsf.webui.hosts.unet_attn2 import patch_a1111

    _, _, attention = a1111
    model = build_a1111(a1111, seed=1)
    inp = inputs(77, seed=12)
    unpatched = a1111_forward(model, inp, inp["context"])
    negative = negative_rows([4, 1], CONTEXT_DIM)
    run = make_run(77, negative, guidance=Guidance("vsf", 0.0, math.inf))
    with patch_a1111([attention.CrossAttention], run):
        guided = a1111_forward(model, inp, append_negative(inp["context"], negative))
    torch.testing.assert_close(guided, unpatched, rtol=1e-4, atol=1e-5)
    empty = make_run(77, negative_rows([0, 0], CONTEXT_DIM))
    with patch_a1111([attention.CrossAttention], empty):
        assert torch.equal(a1111_forward(model, inp, inp["context"]), unpatched)
    assert empty.calls == 0


def test_a1111_adapter_matches_and_checks(a1111):
    from lib_vsf.webui.hosts.unet_attn2 import A1111UNetAdapter, check_a1111_class

    _, _, attention = a1111
    check_a1111_class(attention.CrossAttention)
    sd_model = type("LatentDiffusion", (), {"apply_model": lambda self, x_noisy, t, cond: x_noisy})()
    sd_model.model = type("Wrapper", (), {})()
    sd_model.model.diffusion_model = build_a1111(a1111)
    assert A1111UNetAdapter.matches(sd_model)
    sd_model.forge_objects = object()  # a Forge-family model is never A1111's
    assert not A1111UNetAdapter.matches(sd_model)


def test_a1111_adapter_patches_every_cross_attention_class(a1111):
    """sgm builds MemoryEfficientCrossAttention for SDXL's "softmax-xformers" blocks (xformers
    installed); the adapter wraps it too, and both restore exactly."""
    from lib_vsf.webui.hosts.unet_attn2 import A1111UNetAdapter

    kind, _, attention = a1111
    adapter = A1111UNetAdapter(type("LatentDiffusion", (), {"apply_model": lambda self, x, t, c: x})())
    classes = [c for c in adapter._classes() if c.__module__ == attention.__name__]
    assert attention.CrossAttention in classes and attention.MemoryEfficientCrossAttention in classes
    originals = [c.__dict__["forward"] for c in classes]
    with adapter.patch(make_run(77, negative_rows([2], CONTEXT_DIM))):
        assert all(c.__dict__["forward"].__vsf_original__ is o for c, o in zip(classes, originals))
    assert [c.__dict__["forward"] for c in classes] == originals


def test_batch_with_different_negatives_equals_each_image_alone(host):
    model = host.build(seed=4)
    inp = inputs(77, seed=13)
    negative = negative_rows([5, 2], CONTEXT_DIM, seed=6)
    run = make_run(77, negative)
    with patch_unet(host.attention, host.attention_name, run):
        batched = forward(model, inp, append_negative(inp["context"], negative))
    for i, n in enumerate((5, 2)):
        alone_inp = {k: v[i:i + 1] for k, v in inp.items()}
        alone_negative = type(negative)(negative.embeds[i:i + 1, :n], negative.mask[i:i + 1, :n])
        with patch_unet(host.attention, host.attention_name, make_run(77, alone_negative)):
            alone = forward(model, alone_inp, append_negative(alone_inp["context"], alone_negative))
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)
