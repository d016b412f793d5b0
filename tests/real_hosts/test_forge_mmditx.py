"""Forge SD3/SD3.5 (`backend/nn/mmditx.py`) with Forge's own classes, tiny, on CPU.

Skips unless VSF_FORGE_DIR points at a Forge checkout (verified with lllyasviel/stable-diffusion-webui-
forge dfdcbab6). The tiny MMDiTX is SD3.5-Medium-shaped: block 0 has the extra image-only
self-attention, which must stay unguided. The independent computation replaces `mmditx.attention` by
`vsf_joint_reference` for calls whose length is text + image tokens (known here from the latent size),
text first. Also runs Forge's real sampling code (`sampling_function_inner` on a `UnetPatcher`) with
the adapter's per-pass hook: negative into `c_crossattn`, one conditional pass, uncond rows unguided.
"""
from __future__ import annotations

import pytest
import torch

from lib_vsf.attention.reference import nag_reference, nasa_reference, vsf_joint_reference
from lib_vsf.layout import text_layout
from lib_vsf.patching import AttributePatch, PatchError
from lib_vsf.settings import VSFSettings
from lib_vsf.state import GuidanceRun
from lib_vsf.webui.hosts._sai_mmdit import patch_mmdit_module
from lib_vsf.webui.hosts.base import SamplingContext, append_negative
from lib_vsf.webui.hosts.forge_mmditx import ForgeMMDiTAdapter
from spec_equations import check_joint_call
from vsf_host_setup import Recorder, call_sampling_function, git_commit, host_modules, import_host, init_weights, make_run, negative_rows

CONTEXT_DIM, POSITIVE_LEN, IMAGE_TOKENS = 48, 7, 16  # 8x8 latent, patch 2


@pytest.fixture(scope="module")
def forge():
    with host_modules("forge") as root:
        mmditx = import_host("backend.nn.mmditx")
        print(f"Forge checkout {root} at {git_commit(root)}")
        yield mmditx


def build(mmditx, seed=0):
    model = mmditx.MMDiTX(
        input_size=None, patch_size=2, in_channels=16, depth=2, adm_in_channels=32,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
        pos_embed_max_size=16, num_patches=256, qk_norm="rms", x_block_self_attn_layers=[0])
    return init_weights(model, seed=seed)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 8, 8, generator=gen), "t": torch.rand(batch, generator=gen),
            "context": torch.randn(batch, POSITIVE_LEN, CONTEXT_DIM, generator=gen),
            "y": torch.randn(batch, 32, generator=gen)}


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], inp["t"], y=inp["y"], context=context, control=None, transformer_options={})


def reference_attention(mmditx, negative, alpha, beta, method="vsf", tau=2.5):
    """An independent stand-in for `mmditx.attention`: the dense-mask reference on joint calls."""
    original = mmditx.attention
    calls = []

    def attention(q, k, v, heads, mask=None):
        length = q.shape[1]
        if length != POSITIVE_LEN + negative.length + IMAGE_TOKENS:
            return original(q, k, v, heads, mask)
        b, _, width = q.shape
        qh, kh, vh = (t.view(b, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        layout = text_layout(POSITIVE_LEN, negative.length, offset=0, total=length, negative_mask=negative.mask)
        calls.append(length)
        if method == "vsf":
            out = vsf_joint_reference(qh, kh, vh, layout, alpha, beta)
        elif method == "nag":
            out = nag_reference(qh, kh, vh, layout, alpha, beta, tau, cross=False)
        else:
            out = nasa_reference(qh, kh, vh, layout, alpha, cross=False)
        return out.transpose(1, 2).reshape(b, length, width)

    return AttributePatch().add(mmditx, "attention", attention), calls


def test_patched_forward_matches_reference_with_per_sample_negatives(forge):
    model, inp = build(forge), inputs()
    negative = negative_rows([3, 5], CONTEXT_DIM)  # different lengths: padded, masked per sample
    context = append_negative(inp["context"], negative)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    with patch_mmdit_module(forge, run):
        guided = forward(model, inp, context)
    ref_patch, ref_calls = reference_attention(forge, negative, 3.3, 0.2)
    with ref_patch:
        expected = forward(model, inp, context)
    assert run.calls == 2 and len(ref_calls) == 2  # one joint call per block; image-only attention unguided
    torch.testing.assert_close(guided, expected, atol=2e-5, rtol=1e-4)
    plain = forward(model, inp, inp["context"])
    assert (guided - plain).abs().max() > 1e-3  # guidance changed the result


def test_guided_calls_equal_the_spec_written_out(forge):
    """Each joint call against VSF-SPEC written out in float64 (`spec_equations`): eq. 7/8 per image
    query, P rows over I u P, N0 rows over I u N0. Text first: `[P (7), N (5 slots; sample 1 has 2
    real tokens), I (16)]`, `[B, L, heads*64]`; block 0's image-only self-attention is the host's own."""
    model, inp = build(forge, seed=4), inputs(seed=4)
    lengths = [5, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=8)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    with patch_mmdit_module(forge, run):
        recorder = Recorder(forge.attention)
        with AttributePatch().add(forge, "attention", recorder):
            forward(model, inp, append_negative(inp["context"], negative))
    text = POSITIVE_LEN + 5
    joint = [c for c in recorder.calls if c[0].shape[1] == text + IMAGE_TOKENS]
    image_only = [c for c in recorder.calls if c[0].shape[1] == IMAGE_TOKENS]
    assert len(joint) == 2 and len(image_only) == 1 and len(recorder.calls) == 3
    for q, k, v, args, kwargs, out in joint:
        heads = args[0]
        check_joint_call(q, k, v, out, heads, range(text, text + IMAGE_TOKENS), range(POSITIVE_LEN),
                         [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths], 3.3, 0.2)
    q, k, v, args, kwargs, out = image_only[0]
    qh, kh, vh = (t.double().reshape(2, IMAGE_TOKENS, args[0], -1).transpose(1, 2) for t in (q, k, v))
    plain = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1) @ vh
    torch.testing.assert_close(out.double(), plain.transpose(1, 2).reshape(out.shape), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["NAG Strong", "NASA"])
def test_baseline_methods_match_their_references(forge, preset):
    from lib_vsf.settings import from_preset

    settings = from_preset(preset)
    model, inp = build(forge), inputs()
    negative = negative_rows([2, 5], CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = GuidanceRun(settings)
    run.set_text(POSITIVE_LEN, negative)
    with patch_mmdit_module(forge, run):
        guided = forward(model, inp, context)
    ref_patch, _ = reference_attention(forge, negative, settings.alpha, settings.beta, settings.method, settings.tau)
    with ref_patch:
        expected = forward(model, inp, context)
    torch.testing.assert_close(guided, expected, atol=5e-5, rtol=1e-4)


def test_batched_sample_equals_running_it_alone(forge):
    model, inp = build(forge), inputs()
    negative = negative_rows([2, 6], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative)
    with patch_mmdit_module(forge, run):
        batched = forward(model, inp, append_negative(inp["context"], negative))
    alone_negative = negative_rows([2, 6], CONTEXT_DIM)
    alone_negative.embeds, alone_negative.mask = alone_negative.embeds[:1, :2], alone_negative.mask[:1, :2]
    single = {k: v[:1] for k, v in inp.items()}
    run_alone = make_run(POSITIVE_LEN, alone_negative)
    with patch_mmdit_module(forge, run_alone):
        alone = forward(model, single, append_negative(single["context"], alone_negative))
    torch.testing.assert_close(batched[:1], alone, atol=2e-5, rtol=1e-4)


def test_restore_is_exact_and_bit_for_bit(forge):
    model, inp = build(forge), inputs()
    originals = (forge.attention, forge.block_mixing)
    before = forward(model, inp, inp["context"])
    negative = negative_rows([4, 4], CONTEXT_DIM)
    patch = patch_mmdit_module(forge, make_run(POSITIVE_LEN, negative)).apply()
    try:
        assert forge.attention is not originals[0]
        forward(model, inp, append_negative(inp["context"], negative))
        with pytest.raises(RuntimeError):  # an exception mid-forward ...
            with torch.no_grad():
                model(inp["x"], inp["t"], y=inp["y"], context=append_negative(inp["context"], negative)[:, :3])
    finally:
        patch.restore()
    assert (forge.attention, forge.block_mixing) == originals  # ... and the originals are back
    assert "attention" in vars(forge) and vars(forge)["attention"] is originals[0]
    assert torch.equal(forward(model, inp, inp["context"]), before)


def test_no_negative_runs_the_host_function_unchanged(forge):
    model, inp = build(forge), inputs()
    before = forward(model, inp, inp["context"])
    run = GuidanceRun(VSFSettings())
    run.set_text(POSITIVE_LEN, None)
    with patch_mmdit_module(forge, run):
        assert torch.equal(forward(model, inp, inp["context"]), before)
    assert run.calls == 0


def test_changed_host_signature_is_refused_softly(forge, monkeypatch):
    monkeypatch.setattr(forge, "attention", lambda q, k, v: q)
    with pytest.raises(PatchError, match="heads"):
        patch_mmdit_module(forge, make_run(POSITIVE_LEN, negative_rows([2], CONTEXT_DIM)))


def test_adapter_detects_forge_sd3_models_only(forge):
    class Engine:  # Forge's StableDiffusion3 engine, as far as detection looks
        is_sd3 = True

    def engine_with(model):
        engine = Engine()
        engine.forge_objects = type("F", (), {})()
        engine.forge_objects.unet = type("U", (), {})()
        engine.forge_objects.unet.model = type("K", (), {})()
        engine.forge_objects.unet.model.diffusion_model = model
        return engine

    assert ForgeMMDiTAdapter.matches(engine_with(build(forge)))
    assert not ForgeMMDiTAdapter.matches(engine_with(torch.nn.Linear(2, 2)))
    ForgeMMDiTAdapter(engine_with(build(forge))).check()


# -- Forge's own sampling code with the adapter's per-pass hook ----------------------------------------------

@pytest.fixture(scope="module")
def forge_sampling(forge):
    sampling = import_host("backend.sampling.sampling_function")
    condition = import_host("backend.sampling.condition")
    unet_patcher = import_host("backend.patcher.unet")
    k_prediction = import_host("backend.modules.k_prediction")
    return sampling, condition, unet_patcher, k_prediction


def make_p(forge, forge_sampling):
    _, _, unet_patcher, k_prediction = forge_sampling
    model = build(forge)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = model.offload_device = model.initial_device = torch.device("cpu")
    unet = unet_patcher.UnetPatcher.from_model(model, diffusers_scheduler=None, config=None,
                                               k_predictor=k_prediction.PredictionDiscreteFlow(shift=3.0))
    p = type("P", (), {})()
    p.sd_model = type("Engine", (), {"is_sd3": True})()
    p.sd_model.forge_objects = type("F", (), {})()
    p.sd_model.forge_objects.unet = unet
    return p


class BatchCond(dict):
    """A cond dict that Forge's `compile_weighted_conditions` can index (as its DictWithShape)."""

    def advanced_indexing(self, index):
        return {k: v[index] for k, v in self.items()}


def sample_step(forge_sampling, p, inp, cond_scale, uncond_context):
    """One denoiser evaluation through Forge's real `sampling_function`."""
    return call_sampling_function(forge_sampling[0], p.sd_model, inp["x"],
                                  BatchCond(crossattn=inp["context"], vector=inp["y"]),
                                  BatchCond(crossattn=uncond_context, vector=inp["y"]), cond_scale)


def test_forge_sampling_single_pass_appends_negative_and_drops_uncond(forge, forge_sampling):
    p, inp = make_p(forge, forge_sampling), inputs()
    negative = negative_rows([3, 5], CONTEXT_DIM)
    run = GuidanceRun(VSFSettings(alpha=3.3, beta=0.2))
    run.set_step(0, 4)
    ctx = SamplingContext(run, negative, single_pass=True)
    seen = []
    original_unet = p.sd_model.forge_objects.unet
    original_unet.set_model_unet_function_wrapper(  # another extension's wrapper must still run
        lambda apply_model, args: seen.append(args["c"]["c_crossattn"].shape) or
        apply_model(args["input"], args["timestep"], **args["c"]))
    original_unet.lora_patches = {("lora.safetensors", 1.0, 1.0, False, None): {"w": []}}  # a LoRA-patched model
    ForgeMMDiTAdapter(p.sd_model).attach(p, ctx)
    unet = p.sd_model.forge_objects.unet
    assert unet is not original_unet  # a clone: Forge's own patcher object is untouched
    assert unet.lora_patches == original_unet.lora_patches  # LoRA patches carry over to the clone
    assert "model_function_wrapper" in unet.model_options and "conditioning_modifiers" not in original_unet.model_options
    with patch_mmdit_module(forge, run):
        denoised, sigma = sample_step(forge_sampling, p, inp, 5.0, torch.zeros_like(inp["context"]))
    assert seen == [torch.Size([2, POSITIVE_LEN + 5, CONTEXT_DIM])]  # one call, cond rows only
    assert run.negative_len == 0  # text stream cleared after the call
    ref_patch, _ = reference_attention(forge, negative, 3.3, 0.2)
    with ref_patch, torch.no_grad():
        expected = unet.model.apply_model(inp["x"], sigma, c_crossattn=append_negative(inp["context"], negative),
                                          y=inp["y"], transformer_options={})
    torch.testing.assert_close(denoised, expected, atol=2e-5, rtol=1e-4)


def test_forge_sampling_with_cfg_keeps_uncond_rows_unguided(forge, forge_sampling):
    p, inp = make_p(forge, forge_sampling), inputs()
    negative = negative_rows([4, 2], CONTEXT_DIM)
    run = GuidanceRun(VSFSettings(alpha=3.0, beta=0.1))
    ctx = SamplingContext(run, negative, single_pass=False)
    ForgeMMDiTAdapter(p.sd_model).attach(p, ctx)
    unet = p.sd_model.forge_objects.unet
    uncond_context = torch.randn_like(inp["context"])
    with patch_mmdit_module(forge, run):
        denoised, sigma = sample_step(forge_sampling, p, inp, 4.0, uncond_context)
    ref_patch, _ = reference_attention(forge, negative, 3.0, 0.1)
    with torch.no_grad():
        with ref_patch:
            cond = unet.model.apply_model(inp["x"], sigma, c_crossattn=append_negative(inp["context"], negative),
                                          y=inp["y"], transformer_options={})
        uncond = unet.model.apply_model(inp["x"], sigma, c_crossattn=uncond_context, y=inp["y"],
                                        transformer_options={})
    torch.testing.assert_close(denoised, uncond + (cond - uncond) * 4.0, atol=1e-4, rtol=1e-4)


def test_forge_sampling_outside_the_step_window_is_the_plain_pass(forge, forge_sampling):
    p, inp = make_p(forge, forge_sampling), inputs()
    plain, _ = sample_step(forge_sampling, p, inp, 1.0, inp["context"])
    run = GuidanceRun(VSFSettings(start=0.5, end=1.0))
    run.set_step(1, 4)  # 0.25: before the window
    ctx = SamplingContext(run, negative_rows([3, 3], CONTEXT_DIM), single_pass=True)
    ForgeMMDiTAdapter(p.sd_model).attach(p, ctx)
    with patch_mmdit_module(forge, run):
        out, _ = sample_step(forge_sampling, p, inp, 1.0, inp["context"])
    assert torch.equal(out, plain) and run.calls == 0
