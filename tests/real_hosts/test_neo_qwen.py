"""Forge Neo Qwen-Image and Qwen-Image-Edit with the real host class (tiny, CPU): VSF in every joint
attention, the negative at its negative-pass MSRoPE ids, Edit reference latents as R tokens.

Skips unless VSF_NEO_DIR points at a Forge Neo checkout. The model is Neo's own
`backend.nn.qwen.QwenImageTransformer2DModel`; Edit references are set where Neo's engine puts them
(`backend.args.dynamic_args["ref_latents"]`, read by the model's `forward`). The runner's part is played as
it plays it: the negative appended to the text context, the run told the text stream. Expected values:
VSF-SPEC eq. 7/8 and the mask table written out in float64 (`spec_equations`), and the host's own passes
(the unguided pass, each sample's negative pass), which need no oracle at all.
"""
from __future__ import annotations

import math
import os
import types

import pytest
import torch

from lib_vsf.attention import Guidance
from lib_vsf.patching import AttributePatch, PatchError
from lib_vsf.settings import VSFSettings
from lib_vsf.state import GuidanceRun
from lib_vsf.webui.hosts.base import SamplingContext, append_negative
from lib_vsf.webui.hosts.neo_qwen import NeoQwenImageAdapter
from spec_equations import check_joint_call
from vsf_host_setup import (Recorder, call_sampling_function, git_commit, host_modules, import_host, init_weights,
                            make_run, negative_rows, shared_opts, stub_webui_shared)

TEXT_DIM, HEADS, POSITIVE_LEN, IMAGE = 32, 4, 7, 16  # 8x8 latent, patch 2: 16 image tokens
QWEN_TOKENIZER = "backend/huggingface/Qwen/Qwen-Image/tokenizer"


@pytest.fixture(scope="module")
def neo():
    with host_modules("neo") as root:
        yield types.SimpleNamespace(qwen=import_host("backend.nn.qwen"), root=root, commit=git_commit(root))


@pytest.fixture
def edit(neo, monkeypatch):
    """One Qwen-Image-Edit reference latent (batch 1, as Neo's engine encodes it): 16 R tokens."""
    reference = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(21))
    monkeypatch.setitem(neo.qwen.dynamic_args, "ref_latents", [reference])
    return reference


def build(qwen, seed=3):
    model = qwen.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                             attention_head_dim=16, num_attention_heads=HEADS,
                                             joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))
    return init_weights(model, seed=seed)


def holder(inner, engine=None):
    """The shape of a WebUI model: sd_model.forge_objects.unet.model.diffusion_model (+ Neo's engine)."""
    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=inner))
    return types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet), text_processing_engine_qwen=engine)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 1, 8, 8, generator=gen), "timesteps": torch.rand(batch, generator=gen),
            "context": torch.randn(batch, POSITIVE_LEN, TEXT_DIM, generator=gen)}


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], inp["timesteps"], context, transformer_options={})


def calls_of(qwen, model, inp, context, patch=None):
    """Every attention call (q, k, v, args, kwargs, out) of one forward, optionally patched."""
    with patch or AttributePatch():
        recorder = Recorder(qwen.attention_function)
        with AttributePatch().add(qwen, "attention_function", recorder):
            forward(model, inp, context)
    return recorder.calls


@pytest.mark.parametrize("kind", ["qwen-image", "qwen-image-edit"])
def test_guided_calls_equal_the_spec_written_out(neo, kind, request):
    """Each block's joint call, `[P (7), N (slots), I (16)(, R (16))]` `[B, L, H*D]` after MSRoPE, against
    VSF-SPEC in float64: I rows eq. 7/8, P and R rows over I u P u R, N0 rows over I u R u N0."""
    edit_run = kind == "qwen-image-edit"
    if edit_run:
        request.getfixturevalue("edit")
    model = build(neo.qwen)
    lengths = [3] if edit_run else [4, 2]
    inp = inputs(batch=len(lengths), seed=11)
    negative = negative_rows(lengths, TEXT_DIM, seed=4)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    calls = calls_of(neo.qwen, model, inp, append_negative(inp["context"], negative),
                     NeoQwenImageAdapter(holder(model)).patch(run))
    assert len(calls) == 2 and run.calls == 2  # one joint call per block
    text = POSITIVE_LEN + max(lengths)
    reference = range(text + IMAGE, text + 2 * IMAGE) if edit_run else ()
    negatives = [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths]
    for q, k, v, args, kwargs, out in calls:
        assert q.shape[1] == text + IMAGE + len(reference) and args == (HEADS, None)  # Neo passes heads, mask=None
        check_joint_call(q, k, v, out, HEADS, range(text, text + IMAGE), range(POSITIVE_LEN), negatives, 3.3, 0.2,
                         reference=reference)


@pytest.mark.parametrize("kind", ["qwen-image", "qwen-image-edit"])
def test_negative_rows_are_the_negative_pass_and_reference_rows_the_unguided_pass(neo, kind, request):
    """Oracle-free, from the host's own passes. In the first block q/k/v are per token after MSRoPE, so
    each sample's N0 rows equal the text rows of its negative pass (the negative alone as the context:
    MSRoPE ids s + j, keys I, R and itself), and R rows equal the unguided pass's R rows."""
    edit_run = kind == "qwen-image-edit"
    if edit_run:
        request.getfixturevalue("edit")
    model = build(neo.qwen, seed=5)
    lengths = [5] if edit_run else [5, 2]
    inp = inputs(batch=len(lengths), seed=13)
    negative = negative_rows(lengths, TEXT_DIM, seed=7)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    guided = calls_of(neo.qwen, model, inp, append_negative(inp["context"], negative),
                      NeoQwenImageAdapter(holder(model)).patch(run))[0][-1]
    unguided = calls_of(neo.qwen, model, inp, inp["context"])[0][-1]
    text = POSITIVE_LEN + max(lengths)
    torch.testing.assert_close(guided[:, :POSITIVE_LEN], unguided[:, :POSITIVE_LEN], rtol=1e-4, atol=1e-5)  # P
    assert (guided[:, text:text + IMAGE] - unguided[:, POSITIVE_LEN:POSITIVE_LEN + IMAGE]).abs().max() > 1e-3
    if edit_run:
        assert guided.shape[1] == text + 2 * IMAGE
        torch.testing.assert_close(guided[:, text + IMAGE:], unguided[:, POSITIVE_LEN + IMAGE:], rtol=1e-4, atol=1e-5)
    for b, n in enumerate(lengths):
        alone = {key: value[b:b + 1] for key, value in inp.items()}
        negative_pass = calls_of(neo.qwen, model, alone, negative.embeds[b:b + 1, :n])[0][-1]
        torch.testing.assert_close(guided[b:b + 1, POSITIVE_LEN:POSITIVE_LEN + n], negative_pass[:, :n],
                                   rtol=1e-4, atol=1e-5)


def test_edit_negative_rows_depend_on_the_reference(neo, edit):
    model = build(neo.qwen, seed=6)
    inp = inputs(batch=1, seed=15)
    negative = negative_rows([4], TEXT_DIM, seed=9)
    context = append_negative(inp["context"], negative)
    first = calls_of(neo.qwen, model, inp, context,
                     NeoQwenImageAdapter(holder(model)).patch(make_run(POSITIVE_LEN, negative)))[0][-1]
    neo.qwen.dynamic_args["ref_latents"] = [edit.flip(-1)]
    other = calls_of(neo.qwen, model, inp, context,
                     NeoQwenImageAdapter(holder(model)).patch(make_run(POSITIVE_LEN, negative)))[0][-1]
    n0 = slice(POSITIVE_LEN, POSITIVE_LEN + 4)
    assert (other[:, n0] - first[:, n0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["qwen-image", "qwen-image-edit"])
def test_alpha_zero_and_empty_negative_are_unguided_and_restore_is_exact(neo, kind, request):
    """alpha 0 with beta = +inf: the unguided output (I and P never see the negative); an empty negative:
    the host's own calls, bit for bit; after a run that raised mid-forward every name is back and the model
    gives the same output bit for bit."""
    if kind == "qwen-image-edit":
        request.getfixturevalue("edit")
    qwen = neo.qwen
    model = build(qwen, seed=8)
    batch = 1 if kind == "qwen-image-edit" else 2
    inp = inputs(batch=batch, seed=17)
    original, embedder = qwen.attention_function, model.pe_embedder
    unpatched = forward(model, inp, inp["context"])

    negative = negative_rows([5, 3][:batch], TEXT_DIM)
    run = make_run(POSITIVE_LEN, negative, guidance=Guidance("vsf", 0.0, math.inf))
    with NeoQwenImageAdapter(holder(model)).patch(run):
        zero = forward(model, inp, append_negative(inp["context"], negative))
    assert run.calls == 2
    torch.testing.assert_close(zero, unpatched, rtol=1e-4, atol=1e-5)

    run = make_run(POSITIVE_LEN, negative_rows([0, 0][:batch], TEXT_DIM))
    with NeoQwenImageAdapter(holder(model)).patch(run):
        assert qwen.attention_function is not original and "forward" in model.__dict__
        assert "forward" in embedder.__dict__
        same = forward(model, inp, inp["context"])
    assert run.calls == 0 and torch.equal(same, unpatched)

    negative = negative_rows([2, 2][:batch], TEXT_DIM)
    patch = NeoQwenImageAdapter(holder(model)).patch(make_run(POSITIVE_LEN, negative)).apply()
    try:
        with pytest.raises(RuntimeError):  # an exception mid-forward (a latent the patchify cannot take)
            forward(model, {**inp, "x": inp["x"][:, :3]}, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert qwen.attention_function is original and model.pe_embedder is embedder
    assert "forward" not in model.__dict__ and "forward" not in embedder.__dict__
    assert torch.equal(forward(model, inp, inp["context"]), unpatched)


def test_batch_with_different_negatives_equals_each_image_alone(neo):
    model = build(neo.qwen, seed=9)
    inp = inputs(seed=19)
    lengths = [4, 1]
    negative = negative_rows(lengths, TEXT_DIM, seed=5)
    with NeoQwenImageAdapter(holder(model)).patch(make_run(POSITIVE_LEN, negative)):
        batched = forward(model, inp, append_negative(inp["context"], negative))
    for i, n in enumerate(lengths):
        alone_inp = {k: v[i:i + 1] for k, v in inp.items()}
        alone = type(negative)(negative.embeds[i:i + 1, :n], negative.mask[i:i + 1, :n])
        with NeoQwenImageAdapter(holder(model)).patch(make_run(POSITIVE_LEN, alone)):
            single = forward(model, alone_inp, append_negative(alone_inp["context"], alone))
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-4, atol=1e-5)


def test_matches_qwen_image_only_and_refuses_softly(neo, monkeypatch):
    from lib_vsf.webui.hosts import find_adapter

    qwen = neo.qwen
    model = build(qwen)
    engine = lambda prompts: [torch.zeros(1, TEXT_DIM) for _ in prompts]  # noqa: E731 - only its presence is checked
    assert NeoQwenImageAdapter.matches(holder(model)) and isinstance(find_adapter(holder(model)), NeoQwenImageAdapter)
    assert not NeoQwenImageAdapter.matches(holder(torch.nn.Linear(2, 2))) and not NeoQwenImageAdapter.matches(object())
    NeoQwenImageAdapter(holder(model, engine)).check()  # the real classes pass
    with pytest.raises(PatchError, match="Qwen text engine"):
        NeoQwenImageAdapter(holder(model, None)).check()
    original = qwen.attention_function
    monkeypatch.setattr(qwen, "attention_function", lambda q, k, v: None)  # a re-signed host function
    with pytest.raises(PatchError):
        NeoQwenImageAdapter(holder(model, engine)).patch(make_run(POSITIVE_LEN, negative_rows([2, 2], TEXT_DIM)))
    monkeypatch.undo()
    assert qwen.attention_function is original and "forward" not in model.__dict__  # nothing was replaced
    monkeypatch.delattr(type(model), "forward")
    with pytest.raises(PatchError, match="forward"):
        NeoQwenImageAdapter(holder(model, engine)).check()


class CausalEncoder(torch.nn.Module):
    """A stand-in for Neo's Qwen2.5-VL text model with its call signature (embeds in, `(z, extra)` out):
    position i depends on the tokens 0..i the mask allows. Records each call's length."""

    def __init__(self, vocab, width=TEXT_DIM):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.lengths = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, x=None, embeds=None, attention_mask=None, num_tokens=None, embeds_info=None):
        self.lengths.append(embeds.shape[1])
        mask = attention_mask[..., None].to(embeds.dtype)
        prefix = torch.cumsum(embeds * mask, 1) / torch.cumsum(mask, 1).clamp(min=1)
        return torch.tanh(2 * prefix), None


def test_negative_is_neos_qwen_engine_output_one_prompt_at_a_time(neo):
    """Neo's Qwen engine pads nothing and strips its chat template: each negative is encoded alone, as in a
    negative pass (`QwenImage.get_learned_conditioning` for a negative prompt), with emphasis."""
    from transformers import AutoTokenizer

    with shared_opts(emphasis="Original"):
        engine_module = import_host("backend.text_processing.qwen_engine")
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(neo.root, QWEN_TOKENIZER))
        encoder = CausalEncoder(len(tokenizer) + 8)
        engine = engine_module.QwenTextProcessingEngine(text_encoder=encoder, tokenizer=tokenizer)
        prompts = ["blurry, text", "", "a (watermark:1.3) and more words"]
        negative = NeoQwenImageAdapter(holder(build(neo.qwen), engine)).encode_negative(None, prompts, None)
        want = [engine([p])[0] for p in (prompts[0], prompts[2])]
        ids = [list(engine.tokenize_line(p)[0].tokens) for p in (prompts[0], prompts[2])]  # the host's one chunk
    counts = negative.mask.sum(-1).tolist()
    assert counts == [want[0].shape[0], 0, want[1].shape[0]] and max(counts) == negative.length
    assert torch.equal(negative.embeds[0, :counts[0]], want[0]) and torch.equal(negative.embeds[2], want[1])
    assert all(engine.id_pad not in row for row in ids)  # nothing padded
    assert all(0 < c < len(row) for c, row in zip((counts[0], counts[2]), ids))  # template stripped
    assert set(encoder.lengths) == {len(ids[0]), len(ids[1])}  # every encoder call saw one prompt's own tokens


# -- Neo's own sampling code with the adapter's per-pass hook --------------------------------------------

def make_p(neo, seed=3):
    """A WebUI model object around a tiny Qwen-Image, sampled through Neo's UnetPatcher/KModel."""
    args = import_host("backend.args")
    if args.dynamic_args.get("ops") is None:  # set by Neo's loader for a real checkpoint
        args.dynamic_args["ops"] = ""
    stub_webui_shared()
    unet_patcher = import_host("backend.patcher.unet")
    k_prediction = import_host("backend.modules.k_prediction")
    model = build(neo.qwen, seed)
    model.storage_dtype = model.computation_dtype = torch.float32
    model.load_device = model.offload_device = model.initial_device = torch.device("cpu")
    config = type("Config", (), {"sampling_settings": {"shift": 3.1}, "memory_usage_factor": 1.0})()
    unet = unet_patcher.UnetPatcher.from_model(model, diffusers_scheduler=None, config=config,
                                               k_predictor=k_prediction.PredictionDiscreteFlow(config))
    p = types.SimpleNamespace(sd_model=holder(None))
    p.sd_model.forge_objects.unet = unet
    return p


def sample_step(p, inp, cond_scale, uncond_context):
    """One denoiser evaluation through Neo's real `sampling_function`."""
    stub_webui_shared()
    sampling = import_host("backend.sampling.sampling_function")
    return call_sampling_function(sampling, p.sd_model, inp["x"], inp["context"], uncond_context, cond_scale)


def test_neo_sampling_single_pass_inside_the_window_and_plain_pass_outside(neo):
    """Through Neo's `sampling_function`: inside the step window one conditional model call (CFG's uncond
    removed) carrying the negative; outside it the plain pass, bit for bit, with nothing guided."""
    p, inp = make_p(neo), inputs(seed=23)
    plain, _ = sample_step(p, inp, 1.0, inp["context"])
    negative = negative_rows([3, 5], TEXT_DIM)
    settings = VSFSettings(alpha=3.3, beta=0.2, start=0.5, end=1.0)

    outside = GuidanceRun(settings)
    outside.set_step(1, 4)
    p_out = make_p(neo)
    NeoQwenImageAdapter(p_out.sd_model).attach(p_out, SamplingContext(outside, negative, single_pass=True))
    with NeoQwenImageAdapter(p_out.sd_model).patch(outside):
        out, _ = sample_step(p_out, inp, 5.0, torch.zeros_like(inp["context"]))
    assert outside.calls == 0
    assert torch.equal(out, plain)  # CFG 5 with a zero uncond would differ: the uncond pass is gone too

    inside = GuidanceRun(settings)
    inside.set_step(2, 4)
    p_in = make_p(neo)
    original_unet = p_in.sd_model.forge_objects.unet
    NeoQwenImageAdapter(p_in.sd_model).attach(p_in, SamplingContext(inside, negative, single_pass=True))
    assert p_in.sd_model.forge_objects.unet is not original_unet  # a per-pass clone, as Forge rebuilds it
    with NeoQwenImageAdapter(p_in.sd_model).patch(inside):
        denoised, sigma = sample_step(p_in, inp, 5.0, torch.zeros_like(inp["context"]))
    assert inside.calls == 2 and inside.negative_len == 0  # one cond-only call; text stream cleared after it
    model = original_unet.model
    with NeoQwenImageAdapter(p_in.sd_model).patch(make_run(POSITIVE_LEN, negative, 3.3, 0.2)), torch.no_grad():
        expected = model.apply_model(inp["x"], sigma, c_crossattn=append_negative(inp["context"], negative),
                                     transformer_options={})
    torch.testing.assert_close(denoised, expected, atol=2e-5, rtol=1e-4)
    assert (denoised - plain).abs().max() > 1e-4


# -- Qwen-Image-Edit with a negative image (docs/negative-images.md) ---------------------------------------
#
# The runner's part, played as it plays it: the picture's latent (a random one of another size than the
# reference, 6x8 -> 12 tokens) is the run's `negative_image` and the call is marked with its tokens; Neo's
# own `forward` appends it as the next reference (MSRoPE frame index 2): `[P, N_txt, I, R, N_img]`.

NEG_IMAGE = 12


def negative_image(seed=31):
    from lib_vsf.webui.hosts._reference_tokens import ReferenceLatent

    return ReferenceLatent(torch.randn(1, 16, 1, 6, 8, generator=torch.Generator().manual_seed(seed)), NEG_IMAGE)


def image_run(negative, image, alpha=3.3, beta=0.2, guidance=None):
    run = make_run(POSITIVE_LEN, negative, alpha, beta, guidance=guidance)
    run.negative_image = image
    run.set_text(POSITIVE_LEN, negative, negative_image_len=image.length)
    return run


def test_edit_negative_image_calls_equal_eq78_per_image_query(neo, edit):
    """Each block's joint call with a text and an image negative, `[P (7), N_txt (3), I (16), R (16),
    N_img (12)]` `[B, L, H*D]` after MSRoPE, against VSF-SPEC in float64: image queries eq. 7/8 with A- over
    the text negative and the image negative's tokens, P and R rows over I u P u R, N0 rows over I u R u N.
    The oracle tells the output from a negative image that was ignored or taken as R."""
    from spec_equations import assert_bugs_are_caught, bhld, joint_expected

    model = build(neo.qwen, seed=10)
    inp = inputs(batch=1, seed=21)
    negative = negative_rows([3], TEXT_DIM, seed=11)
    run = image_run(negative, negative_image())
    calls = calls_of(neo.qwen, model, inp, append_negative(inp["context"], negative),
                     NeoQwenImageAdapter(holder(model)).patch(run))
    assert len(calls) == 2 and run.calls == 2
    assert neo.qwen.dynamic_args["ref_latents"] == [edit]  # the host's list is back, unchanged
    text = POSITIVE_LEN + 3
    image_rows, ref_rows = range(text, text + IMAGE), range(text + IMAGE, text + 2 * IMAGE)
    neg_image_rows = list(range(ref_rows.stop, ref_rows.stop + NEG_IMAGE))
    negatives = [list(range(POSITIVE_LEN, text)) + neg_image_rows]
    for q, k, v, args, kwargs, out in calls:
        assert q.shape[1] == ref_rows.stop + NEG_IMAGE
        check_joint_call(q, k, v, out, HEADS, image_rows, range(POSITIVE_LEN), negatives, 3.3, 0.2, reference=ref_rows)
        q, k, v = (bhld(t, HEADS, False) for t in (q, k, v))
        text_only = [range(POSITIVE_LEN, text)]
        ignored, _ = joint_expected(q, k, v, image_rows, range(POSITIVE_LEN), text_only, 3.3, 0.2, reference=ref_rows)
        as_reference, _ = joint_expected(q, k, v, image_rows, range(POSITIVE_LEN), text_only, 3.3, 0.2,
                                         reference=list(ref_rows) + neg_image_rows)
        _, rows = joint_expected(q, k, v, image_rows, range(POSITIVE_LEN), negatives, 3.3, 0.2, reference=ref_rows)
        rows[:, neg_image_rows] = False
        assert_bugs_are_caught(bhld(out, HEADS, False), {"negative image ignored": ignored,
                                                         "negative image as R": as_reference}, rows)


def test_edit_reference_rows_never_see_the_negative_image_and_its_rows_are_the_negative_pass(neo, edit):
    """Oracle-free (first block: q/k/v per token after MSRoPE): R and P rows equal the plain edit's; the N0
    rows, text and image, equal the rows of the negative pass (the negative prompt alone at ids s + j, the
    negative image as one more reference); and those rows move with R."""
    qwen = neo.qwen
    model = build(qwen, seed=12)
    inp = inputs(batch=1, seed=23)
    negative = negative_rows([4], TEXT_DIM, seed=13)
    image = negative_image(seed=33)
    context = append_negative(inp["context"], negative)
    guided = calls_of(qwen, model, inp, context, NeoQwenImageAdapter(holder(model)).patch(image_run(negative, image)))[0][-1]
    plain = calls_of(qwen, model, inp, inp["context"])[0][-1]
    text = POSITIVE_LEN + 4
    torch.testing.assert_close(guided[:, text + IMAGE:text + 2 * IMAGE], plain[:, POSITIVE_LEN + IMAGE:],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, :POSITIVE_LEN], plain[:, :POSITIVE_LEN], rtol=1e-4, atol=1e-5)
    qwen.dynamic_args["ref_latents"] = [edit, image.latent]
    negative_pass = calls_of(qwen, model, inp, negative.embeds)[0][-1]
    qwen.dynamic_args["ref_latents"] = [edit]
    torch.testing.assert_close(guided[:, -NEG_IMAGE:], negative_pass[:, -NEG_IMAGE:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, POSITIVE_LEN:text], negative_pass[:, :4], rtol=1e-4, atol=1e-5)
    qwen.dynamic_args["ref_latents"] = [edit.flip(-1)]
    other = calls_of(qwen, model, inp, context,
                     NeoQwenImageAdapter(holder(model)).patch(image_run(negative, image)))[0][-1]
    assert (other[:, -NEG_IMAGE:] - guided[:, -NEG_IMAGE:]).abs().max() > 1e-3


def test_edit_negative_image_alone_alpha_zero_is_the_plain_edit_and_restore_is_exact(neo, edit):
    """An image negative without a text negative guides (the output moves); alpha 0 with beta +inf is the
    plain edit; after a run that raised mid-forward the names, the host's reference list and the output are
    back bit for bit."""
    from lib_vsf.state import NegativeText

    qwen = neo.qwen
    model = build(qwen, seed=14)
    inp = inputs(batch=1, seed=25)
    references, original, embedder = qwen.dynamic_args["ref_latents"], qwen.attention_function, model.pe_embedder
    unpatched = forward(model, inp, inp["context"])
    image = negative_image(seed=35)
    empty = NegativeText(torch.zeros(1, 0, TEXT_DIM), torch.zeros(1, 0, dtype=torch.bool))
    run = image_run(empty, image)
    with NeoQwenImageAdapter(holder(model)).patch(run):
        alone = forward(model, inp, inp["context"])
    assert run.calls == 2 and alone.shape == unpatched.shape and (alone - unpatched).abs().max() > 1e-3
    negative = negative_rows([3], TEXT_DIM, seed=15)
    run = image_run(negative, image, guidance=Guidance("vsf", 0.0, math.inf))
    with NeoQwenImageAdapter(holder(model)).patch(run):
        zero = forward(model, inp, append_negative(inp["context"], negative))
    assert run.calls == 2
    torch.testing.assert_close(zero, unpatched, rtol=1e-4, atol=1e-5)
    patch = NeoQwenImageAdapter(holder(model)).patch(image_run(negative, image)).apply()
    try:
        with pytest.raises(RuntimeError):
            forward(model, {**inp, "x": inp["x"][:, :3]}, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert qwen.dynamic_args["ref_latents"] is references and references == [edit]
    assert qwen.attention_function is original and model.pe_embedder is embedder and "forward" not in model.__dict__
    assert torch.equal(forward(model, inp, inp["context"]), unpatched)


@pytest.mark.parametrize("vae_resize", [False, True])
def test_negative_image_is_encoded_as_neos_qwen_engine_encodes_an_input_image(neo, monkeypatch, vae_resize):
    """Edit on (Neo's loader flag): the adapter takes a negative image and encodes it as the host turns an
    img2img input image into a reference latent (`encode_first_stage` keeps the pixels at the generation's
    size, `get_learned_conditioning` runs `encode_vision` on them, with its `qwen_vae_resize` option), without
    touching the engine's references; Qwen-Image without Edit refuses."""
    import numpy as np
    from PIL import Image

    class StandInVAE:  # Neo's Wan VAE patcher as the engine calls it: [B, H, W, 3] -> [B, 16, 1, H/8, W/8]
        def __init__(self):
            self.first_stage_model = types.SimpleNamespace(process_in=lambda z: (z - 0.2) * 1.7)

        def encode(self, pixels):
            pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8)
            return torch.cat([pooled * (i + 1) - 0.3 * i for i in range(6)], dim=1)[:, :16, None].repeat(1, 3, 1, 1, 1)[:, :16]

    with shared_opts():
        engine_module = import_host("backend.diffusion_engine.qwen")
        monkeypatch.setattr(engine_module, "opts", types.SimpleNamespace(qwen_vae_resize=vae_resize))  # bound at import
        vae = StandInVAE()
        engine = types.SimpleNamespace(forge_objects=types.SimpleNamespace(vae=vae), ref_latents=[], ini_latent=None)
        engine.encode_vision = lambda image, i: engine_module.QwenImage.encode_vision(engine, image, i)
        sd_model = holder(build(neo.qwen))
        sd_model.encode_vision = engine.encode_vision
        picture = Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 56, 3), dtype=np.uint8))
        p = types.SimpleNamespace(width=64, height=48)
        monkeypatch.setitem(neo.qwen.dynamic_args, "edit", True)
        adapter = NeoQwenImageAdapter(sd_model)
        assert adapter.takes_negative_image()
        got = adapter.encode_negative_image(p, picture)
        resized = np.asarray(picture.resize((64, 48), resample=Image.LANCZOS), dtype=np.float32) / 255.0
        x = torch.from_numpy(2.0 * resized - 1.0).movedim(-1, 0)[None]
        monkeypatch.setitem(engine_module.dynamic_args, "is_referencing", False)
        engine_module.QwenImage.encode_first_stage(engine, x)  # keeps the input image for the conditioning
        want = engine_module.QwenImage.encode_vision(engine, engine.ini_latent, 0)[1]
    assert engine.ref_latents == [] and got.latent.shape == want.shape
    assert got.length == (want.shape[-2] // 2) * (want.shape[-1] // 2)
    assert (want.shape[-2:] == (6, 8)) is not vae_resize  # the option's ~1 MP resize, or the generation's size
    torch.testing.assert_close(got.latent, want, rtol=1e-4, atol=2e-5)  # the host's [-1, 1] round trip: ulps
    monkeypatch.setitem(neo.qwen.dynamic_args, "edit", False)
    assert not NeoQwenImageAdapter(sd_model).takes_negative_image()
