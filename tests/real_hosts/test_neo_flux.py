"""Forge Neo Flux and Chroma with the real host classes (tiny, CPU): VSF in every joint attention.

Skips unless VSF_NEO_DIR points at a Forge Neo checkout (branch `neo`). Each test builds the host's
own model, appends a negative to the text stream as the runner does, patches
`backend.nn.flux.attention_function` through `lib_vsf.webui.hosts.neo_flux`, and compares with an
independent computation: the same model with every joint call replaced by `vsf_joint_reference`
(the table of VSF-SPEC "Joint-attention models"). The negative's Flux lambda (paper eq. 10) runs
through Neo's own T5 engine and T5 class, with p0 written out from its definition.
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
from lib_vsf.webui.hosts.neo_flux import NeoFluxAdapter, patch_flux
from lib_vsf.settings import VSFSettings
from lib_vsf.webui.hosts import _negative_text
from spec_equations import check_joint_call
from vsf_host_setup import (Recorder, T5WordTokenizer, heads_last, hf_t5_encoder, host_modules, host_t5, import_host,
                            init_weights, make_run, negative_rows, shared_opts)

CONTEXT_DIM, POSITIVE_LEN = 32, 6


@pytest.fixture(scope="module")
def neo():
    with host_modules("neo"):
        flux = import_host("backend.nn.flux")
        chroma = import_host("backend.nn.chroma")
        yield flux, chroma


def build_flux(flux):
    model = flux.IntegratedFluxTransformer2DModel(
        in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=CONTEXT_DIM, hidden_size=64,
        mlp_ratio=4.0, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000,
        patch_size=2, qkv_bias=True, guidance_embed=True)
    return init_weights(model, seed=3)


def build_chroma(chroma):
    model = chroma.IntegratedChromaTransformer2DModel(
        in_channels=64, out_channels=64, context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=4.0,
        num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
        qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=2, txt_ids_dims=[], vec_in_dim=24)
    return init_weights(model, seed=4)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 16, 8, 8, generator=gen),
        "timestep": torch.rand(batch, generator=gen),
        "context": torch.randn(batch, POSITIVE_LEN, CONTEXT_DIM, generator=gen),
        "y": torch.randn(batch, 24, generator=gen),
        "guidance": torch.full((batch,), 3.5),
    }


def forward(model, kind, inp, context):
    with torch.no_grad():
        if kind == "flux":
            return model(inp["x"], inp["timestep"], context, y=inp["y"], guidance=inp["guidance"], transformer_options={})
        return model(inp["x"], inp["timestep"], context, guidance=None, transformer_options={})  # Chroma: `guidance or zeros`


def reference_patch(flux, run, alpha, beta):
    """Every joint call computed by `vsf_joint_reference` (dense masks, plain softmax)."""
    original = flux.attention_function

    def reference(q, k, v, heads, *args, **kwargs):
        length = q.shape[2]  # Neo Flux passes [B, H, L, D] (skip_reshape=True)
        if run.negative_len == 0 or length <= run.text_len:
            return original(q, k, v, heads, *args, **kwargs)
        layout = text_layout(run.positive_len, run.negative_len, offset=0, total=length,
                             negative_mask=run.negative_mask)
        return heads_last(vsf_joint_reference(q, k, v, layout, alpha, beta))

    return AttributePatch().add(flux, "attention_function", reference)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_patched_model_matches_reference(neo, kind):
    flux, chroma = neo
    model = build_flux(flux) if kind == "flux" else build_chroma(chroma)
    inp = inputs()
    negative = negative_rows([3, 1], CONTEXT_DIM)  # different lengths: padded, masked per sample
    context = append_negative(inp["context"], negative)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)

    with patch_flux(flux, run):
        guided = forward(model, kind, inp, context)
    assert run.calls == 2  # one double-stream and one single-stream block
    with reference_patch(flux, run, 3.3, 0.2):
        expected = forward(model, kind, inp, context)
    unguided = forward(model, kind, inp, inp["context"])
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert (guided - unguided).abs().max() > 1e-3  # the negative changed the output


def test_intercepted_call_matches_joint_reference(neo):
    flux, _ = neo
    model = build_flux(flux)
    inp = inputs()
    negative = negative_rows([4, 2], CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(POSITIVE_LEN, negative, alpha=2.0, beta=0.5)

    with patch_flux(flux, run):
        recorder = Recorder(flux.attention_function)
        with AttributePatch().add(flux, "attention_function", recorder):
            forward(model, "flux", inp, context)
    assert len(recorder.calls) == 2
    q, k, v, args, kwargs, out = recorder.calls[0]
    assert kwargs.get("skip_reshape") is True and q.shape[2] == 16 + POSITIVE_LEN + 4  # text first, then 4x4 image
    layout = text_layout(POSITIVE_LEN, 4, offset=0, total=q.shape[2], negative_mask=run.negative_mask)
    torch.testing.assert_close(out, heads_last(vsf_joint_reference(q, k, v, layout, 2.0, 0.5)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_guided_calls_equal_the_spec_written_out(neo, kind):
    """Each guided call, double- and single-stream, against VSF-SPEC written out in float64
    (`spec_equations`): eq. 7/8 per image query, P rows over I u P, N0 rows over I u N0. Text first:
    `[P (6), N (4 slots; sample 1 has 2 real tokens), I (16)]`, q/k/v after the host's RoPE."""
    flux, chroma = neo
    model = build_flux(flux) if kind == "flux" else build_chroma(chroma)
    inp = inputs(seed=11)
    lengths = [4, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=4)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    with patch_flux(flux, run):
        recorder = Recorder(flux.attention_function)
        with AttributePatch().add(flux, "attention_function", recorder):
            forward(model, kind, inp, append_negative(inp["context"], negative))
    assert len(recorder.calls) == 2
    positive, text = range(POSITIVE_LEN), POSITIVE_LEN + 4
    negatives = [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths]
    for q, k, v, args, kwargs, out in recorder.calls:
        assert q.shape[2] == text + 16
        check_joint_call(q, k, v, out, q.shape[1], range(text, text + 16), positive, negatives, 3.3, 0.2,
                         heads_first=True)


@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_alpha_zero_beta_inf_equals_unpatched(neo, kind):
    """alpha = 0, beta = +inf: image and positive rows never see the negative (VSF-SPEC invariant)."""
    flux, chroma = neo
    model = build_flux(flux) if kind == "flux" else build_chroma(chroma)
    inp = inputs(seed=5)
    negative = negative_rows([5, 3], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative, guidance=Guidance("vsf", 0.0, math.inf))
    with patch_flux(flux, run):
        guided = forward(model, kind, inp, append_negative(inp["context"], negative))
    unpatched = forward(model, kind, inp, inp["context"])
    assert run.calls == 2
    torch.testing.assert_close(guided, unpatched, rtol=1e-4, atol=1e-5)


def test_empty_negative_and_restore_are_exact(neo):
    flux, _ = neo
    model = build_flux(flux)
    inp = inputs(seed=7)
    original = flux.attention_function
    unpatched = forward(model, "flux", inp, inp["context"])

    empty = negative_rows([0, 0], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, empty)
    with patch_flux(flux, run):
        assert flux.attention_function is not original
        same = forward(model, "flux", inp, inp["context"])
    assert run.calls == 0
    assert torch.equal(same, unpatched)

    negative = negative_rows([3, 3], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative)
    patch = patch_flux(flux, run).apply()
    try:
        forward(model, "flux", inp, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert flux.attention_function is original
    assert torch.equal(forward(model, "flux", inp, inp["context"]), unpatched)


def test_refuses_changed_host_without_patching(neo, monkeypatch):
    flux, _ = neo
    original = flux.attention_function
    monkeypatch.setattr(flux, "attention_function", lambda q, k, v: None)  # a re-signed host function
    run = make_run(POSITIVE_LEN, negative_rows([2], CONTEXT_DIM))
    with pytest.raises(PatchError):
        patch_flux(flux, run)
    assert flux.attention_function is not original and flux.attention_function.__code__.co_argcount == 3
    monkeypatch.delattr(flux, "attention")
    with pytest.raises(PatchError):
        NeoFluxAdapter(None).check()


def test_adapter_matches_neo_models_only(neo):
    flux, chroma = neo

    class Holder:  # the shape of a WebUI model: sd_model.forge_objects.unet.model.diffusion_model
        def __init__(self, inner):
            self.forge_objects = type("F", (), {"unet": type("U", (), {"model": type("M", (), {"diffusion_model": inner})()})()})()

    assert NeoFluxAdapter.matches(Holder(build_flux(flux)))
    assert NeoFluxAdapter.matches(Holder(build_chroma(chroma)))
    # "Model default" follows the family: Flux's lambda rule for Flux, Chroma's own default (no lambda)
    assert NeoFluxAdapter(Holder(build_flux(flux))).family == "flux"
    assert NeoFluxAdapter(Holder(build_chroma(chroma))).family == "chroma"
    assert not NeoFluxAdapter.matches(Holder(torch.nn.Linear(2, 2)))
    assert not NeoFluxAdapter.matches(object())


def test_batch_with_different_negatives_equals_each_image_alone(neo):
    """VSF-SPEC: per-sample negatives of different lengths (padded, masked) give each image's own result."""
    flux, _ = neo
    model = build_flux(flux)
    inp = inputs(seed=9)
    negative = negative_rows([4, 1], CONTEXT_DIM, seed=5)
    run = make_run(POSITIVE_LEN, negative)
    with patch_flux(flux, run):
        batched = forward(model, "flux", inp, append_negative(inp["context"], negative))
    for i, n in enumerate((4, 1)):
        alone_inp = {k: v[i:i + 1] for k, v in inp.items()}
        alone_negative = type(negative)(negative.embeds[i:i + 1, :n], negative.mask[i:i + 1, :n])
        alone_run = make_run(POSITIVE_LEN, alone_negative)
        with patch_flux(flux, alone_run):
            alone = forward(model, "flux", alone_inp, append_negative(alone_inp["context"], alone_negative))
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)


# -- Flux Kontext: reference latents appended after the image tokens are R tokens ----------------------------

def holder(inner):
    """The shape of a WebUI model: sd_model.forge_objects.unet.model.diffusion_model."""
    import types

    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=inner))
    return types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet))


@pytest.fixture
def kontext(neo, monkeypatch):
    """Neo's Flux with one Kontext reference latent, set where Neo's Flux engine puts it
    (`backend.args.dynamic_args["ref_latents"]`, read by the model's own `forward`)."""
    flux, _ = neo
    gen = torch.Generator().manual_seed(21)
    reference = torch.randn(1, 16, 8, 8, generator=gen)  # 4x4 = 16 reference tokens after the 16 image tokens
    monkeypatch.setitem(flux.dynamic_args, "ref_latents", [reference])
    return flux, build_flux(flux), reference


def first_call(flux, model, inp, context, patch=None):
    """q, k, v and output of the first joint call (double block) of one forward, optionally patched."""
    patch = patch or AttributePatch()
    with patch:
        recorder = Recorder(flux.attention_function)
        with AttributePatch().add(flux, "attention_function", recorder):
            forward(model, "flux", inp, context)
    return recorder.calls


KONTEXT_IMAGE, KONTEXT_REFERENCE = 16, 16


def test_kontext_guided_calls_equal_the_spec_with_reference_rows(kontext):
    """Every joint call of a Kontext model, `[P (6), N (4 slots), I (16), R (16)]`, against VSF-SPEC
    written out in float64: R rows over I u P u R (never N1), N0 rows over I u R u N0, I rows eq. 7/8
    with A+ over I u P u R. The oracle tells the output from R treated as image tokens."""
    flux, model, _ = kontext
    inp = inputs(seed=13)
    lengths = [4, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=6)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    calls = first_call(flux, model, inp, append_negative(inp["context"], negative),
                       NeoFluxAdapter(holder(model)).patch(run))
    assert len(calls) == 2 and run.calls == 2
    text = POSITIVE_LEN + 4
    image = range(text, text + KONTEXT_IMAGE)
    reference = range(text + KONTEXT_IMAGE, text + KONTEXT_IMAGE + KONTEXT_REFERENCE)
    negatives = [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths]
    for q, k, v, args, kwargs, out in calls:
        assert q.shape[2] == reference.stop
        check_joint_call(q, k, v, out, q.shape[1], image, range(POSITIVE_LEN), negatives, 3.3, 0.2,
                         heads_first=True, reference=reference)


def test_kontext_reference_rows_ignore_the_negative_and_negative_rows_see_the_reference(kontext):
    """Oracle-free, from the host's own passes. In the first block every token's q/k/v is per token
    (Flux.1 text ids are zero), so: the R rows of the guided call equal the R rows of the unguided pass
    (R never sees N0/N1), and each sample's N0 rows equal the text rows of its negative pass with the
    same reference (N0 sees I, R and itself)."""
    flux, model, reference = kontext
    inp = inputs(seed=17)
    lengths = [3, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=8)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    guided = first_call(flux, model, inp, append_negative(inp["context"], negative),
                        NeoFluxAdapter(holder(model)).patch(run))[0][-1]
    unguided = first_call(flux, model, inp, inp["context"])[0][-1]
    text = POSITIVE_LEN + 3
    r_guided = guided[:, text + KONTEXT_IMAGE:]
    r_plain = unguided[:, POSITIVE_LEN + KONTEXT_IMAGE:]
    assert r_guided.shape[1] == KONTEXT_REFERENCE
    torch.testing.assert_close(r_guided, r_plain, rtol=1e-4, atol=1e-5)
    assert (guided[:, text:text + KONTEXT_IMAGE] - unguided[:, POSITIVE_LEN:POSITIVE_LEN + KONTEXT_IMAGE]).abs().max() > 1e-3
    for b, n in enumerate(lengths):
        alone = {key: value[b:b + 1] for key, value in inp.items()}
        negative_pass = first_call(flux, model, alone, negative.embeds[b:b + 1, :n])[0][-1]
        torch.testing.assert_close(guided[b:b + 1, POSITIVE_LEN:POSITIVE_LEN + n], negative_pass[:, :n],
                                   rtol=1e-4, atol=1e-5)
    # ... and those N0 rows do depend on the reference: another reference latent moves them
    flux.dynamic_args["ref_latents"] = [reference.flip(-1)]
    other = first_call(flux, model, inp, append_negative(inp["context"], negative),
                       NeoFluxAdapter(holder(model)).patch(make_run(POSITIVE_LEN, negative, 3.3, 0.2)))[0][-1]
    assert (other[0, POSITIVE_LEN:POSITIVE_LEN + 3] - guided[0, POSITIVE_LEN:POSITIVE_LEN + 3]).abs().max() > 1e-3


def test_kontext_alpha_zero_beta_inf_equals_unpatched_and_restore_is_exact(kontext):
    flux, model, _ = kontext
    inp = inputs(seed=19)
    original, forward_before = flux.attention_function, model.forward
    unpatched = forward(model, "flux", inp, inp["context"])
    negative = negative_rows([5, 3], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative, guidance=Guidance("vsf", 0.0, math.inf))
    with NeoFluxAdapter(holder(model)).patch(run):
        assert "forward" in model.__dict__
        guided = forward(model, "flux", inp, append_negative(inp["context"], negative))
    assert run.calls == 2
    torch.testing.assert_close(guided, unpatched, rtol=1e-4, atol=1e-5)
    assert flux.attention_function is original and "forward" not in model.__dict__
    assert model.forward == forward_before
    assert torch.equal(forward(model, "flux", inp, inp["context"]), unpatched)


# -- Flux Kontext with a negative image (docs/negative-images.md) ------------------------------------------
#
# The runner's part, played as it plays it: the picture's latent (here a random one of another size than
# the reference, 6x8 -> 3x4 = 12 tokens) is the run's `negative_image`, and the model call is marked with
# its tokens (`set_text(..., negative_image_len=)`), as the Forge wrapper marks guided COND calls. Neo's own
# `forward` then appends it as the next reference: the host's sequence is `[P, N_txt, I, R, N_img]`.
# (Kept before the T5 fixture below, which opens its own copy of the host's modules for its tests.)

NEG_IMAGE = 12


def negative_image(seed=31):
    from lib_vsf.webui.hosts._reference_tokens import ReferenceLatent

    latent = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(seed))
    return ReferenceLatent(latent, NEG_IMAGE)


def image_run(negative, image, alpha=3.3, beta=0.2, guidance=None, rows=None):
    run = make_run(POSITIVE_LEN, negative, alpha, beta, guidance=guidance)
    run.negative_image = image
    run.set_text(POSITIVE_LEN, negative, negative_image_len=image.length, negative_image_rows=rows)
    return run


def test_kontext_negative_image_calls_equal_eq78_per_image_query(kontext):
    """Every joint call of a Kontext model with a text and an image negative, as the host passes it,
    `[P (6), N_txt (4 slots), I (16), R (16), N_img (12)]`, against VSF-SPEC written out in float64: each
    image query eq. 7/8 with A+ over I u P u R and A- over the sample's real text negative *and* the image
    negative's tokens; R and P rows over I u P u R (never the negative image); N0 rows (text and image)
    over I u R u N. The oracle tells the output from a negative image that was ignored or taken as R."""
    from spec_equations import assert_bugs_are_caught, bhld, joint_expected

    flux, model, reference = kontext
    inp = inputs(seed=23)
    lengths = [4, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=10)
    image = negative_image()
    run = image_run(negative, image)
    calls = first_call(flux, model, inp, append_negative(inp["context"], negative),
                       NeoFluxAdapter(holder(model)).patch(run))
    assert len(calls) == 2 and run.calls == 2
    assert flux.dynamic_args["ref_latents"] == [reference]  # the host's list is back, unchanged
    text = POSITIVE_LEN + 4
    image_rows = range(text, text + KONTEXT_IMAGE)
    ref_rows = range(image_rows.stop, image_rows.stop + KONTEXT_REFERENCE)
    neg_image_rows = list(range(ref_rows.stop, ref_rows.stop + NEG_IMAGE))
    negatives = [list(range(POSITIVE_LEN, POSITIVE_LEN + n)) + neg_image_rows for n in lengths]
    for q, k, v, args, kwargs, out in calls:
        assert q.shape[2] == ref_rows.stop + NEG_IMAGE  # Neo appended the negative image after R
        check_joint_call(q, k, v, out, q.shape[1], image_rows, range(POSITIVE_LEN), negatives, 3.3, 0.2,
                         heads_first=True, reference=ref_rows)
        q, k, v = (bhld(t, q.shape[1], True) for t in (q, k, v))
        ignored, _ = joint_expected(q, k, v, image_rows, range(POSITIVE_LEN),
                                    [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths], 3.3, 0.2,
                                    reference=ref_rows)
        as_reference, _ = joint_expected(q, k, v, image_rows, range(POSITIVE_LEN),
                                         [range(POSITIVE_LEN, POSITIVE_LEN + n) for n in lengths], 3.3, 0.2,
                                         reference=list(ref_rows) + neg_image_rows)
        _, defined = joint_expected(q, k, v, image_rows, range(POSITIVE_LEN), negatives, 3.3, 0.2, reference=ref_rows)
        rows = defined.clone()
        rows[:, neg_image_rows] = False  # compare the rows both readings define: I, P, R and N_txt
        assert_bugs_are_caught(bhld(out, q.shape[1], False), {"negative image ignored": ignored,
                                                              "negative image as R": as_reference}, rows)


def test_kontext_reference_rows_never_see_the_negative_image_and_its_rows_are_the_negative_pass(kontext):
    """Oracle-free, from the host's own passes (first block: q/k/v per token, Flux.1 text ids zero): R rows of
    the guided call equal the R rows of the plain edit (R sees neither N0 nor N1 of the negative image); each
    sample's N0 rows, text and image, equal the rows of its negative pass, the negative prompt alone with the
    negative image as one more reference (N0 sees I, R and all of N); and those rows move with R."""
    flux, model, reference = kontext
    inp = inputs(seed=29)
    lengths = [3, 2]
    negative = negative_rows(lengths, CONTEXT_DIM, seed=12)
    image = negative_image(seed=33)
    patch = NeoFluxAdapter(holder(model)).patch(image_run(negative, image))
    guided = first_call(flux, model, inp, append_negative(inp["context"], negative), patch)[0][-1]
    plain = first_call(flux, model, inp, inp["context"])[0][-1]
    text = POSITIVE_LEN + 3
    r_guided = guided[:, text + KONTEXT_IMAGE:text + KONTEXT_IMAGE + KONTEXT_REFERENCE]
    torch.testing.assert_close(r_guided, plain[:, POSITIVE_LEN + KONTEXT_IMAGE:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, :POSITIVE_LEN], plain[:, :POSITIVE_LEN], rtol=1e-4, atol=1e-5)  # P
    for b, n in enumerate(lengths):
        alone = {key: value[b:b + 1] for key, value in inp.items()}
        flux.dynamic_args["ref_latents"] = [reference, image.latent]  # the negative pass: one more reference
        negative_pass = first_call(flux, model, alone, negative.embeds[b:b + 1, :n])[0][-1]
        flux.dynamic_args["ref_latents"] = [reference]
        torch.testing.assert_close(guided[b:b + 1, -NEG_IMAGE:], negative_pass[:, -NEG_IMAGE:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guided[b:b + 1, POSITIVE_LEN:POSITIVE_LEN + n], negative_pass[:, :n],
                                   rtol=1e-4, atol=1e-5)
    flux.dynamic_args["ref_latents"] = [reference.flip(-1)]  # another reference moves the N0-image rows
    other = first_call(flux, model, inp, append_negative(inp["context"], negative),
                       NeoFluxAdapter(holder(model)).patch(image_run(negative, image)))[0][-1]
    assert (other[:, -NEG_IMAGE:] - guided[:, -NEG_IMAGE:]).abs().max() > 1e-3


def test_kontext_unguided_rows_of_the_batch_see_no_negative_image(kontext):
    """CFG kept: the batch's uncond row (no text negative, `negative_image_rows` False) is the plain edit's
    row; the cond row is guided by the image alone when its text negative is empty."""
    from lib_vsf.state import NegativeText

    flux, model, _ = kontext
    inp = inputs(seed=37)
    image = negative_image(seed=35)
    empty = NegativeText(torch.zeros(2, 0, CONTEXT_DIM), torch.zeros(2, 0, dtype=torch.bool))
    run = image_run(empty, image, rows=torch.tensor([True, False]))
    assert run.text_len == POSITIVE_LEN and run.negative_len == NEG_IMAGE
    with NeoFluxAdapter(holder(model)).patch(run):
        guided = forward(model, "flux", inp, inp["context"])
    plain = forward(model, "flux", inp, inp["context"])
    assert run.calls == 2 and guided.shape == plain.shape  # the negative image's output rows are dropped
    torch.testing.assert_close(guided[1], plain[1], rtol=1e-4, atol=1e-5)
    assert (guided[0] - plain[0]).abs().max() > 1e-3


def test_kontext_negative_image_alpha_zero_is_the_plain_edit_and_restore_is_exact(kontext):
    """alpha 0, beta +inf with a text and an image negative: the plain edit. After the patch, also after an
    exception mid-forward, every name is back, the host's reference list is the same object holding the same
    latents, and the model's output is the unpatched one bit for bit."""
    flux, model, reference = kontext
    inp = inputs(seed=41)
    references = flux.dynamic_args["ref_latents"]
    original, forward_before = flux.attention_function, model.forward
    unpatched = forward(model, "flux", inp, inp["context"])
    negative = negative_rows([5, 3], CONTEXT_DIM)
    image = negative_image(seed=39)
    run = image_run(negative, image, guidance=Guidance("vsf", 0.0, math.inf))
    with NeoFluxAdapter(holder(model)).patch(run):
        zero = forward(model, "flux", inp, append_negative(inp["context"], negative))
    assert run.calls == 2
    torch.testing.assert_close(zero, unpatched, rtol=1e-4, atol=1e-5)
    patch = NeoFluxAdapter(holder(model)).patch(image_run(negative, image)).apply()
    try:
        with pytest.raises(RuntimeError):  # an exception inside the model, with the negative image appended
            forward(model, "flux", {**inp, "y": inp["y"][:, :3]}, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert flux.dynamic_args["ref_latents"] is references and references == [reference]
    assert flux.attention_function is original and "forward" not in model.__dict__ and model.forward == forward_before
    assert torch.equal(forward(model, "flux", inp, inp["context"]), unpatched)


def test_negative_image_is_encoded_as_neos_flux_engine_encodes_a_kontext_reference(neo, monkeypatch):
    """Kontext on (Neo's loader flag): the adapter takes a negative image and encodes it as the host's own
    `Flux.encode_first_stage` encodes an img2img input image at the generation's size (what becomes the
    first reference), without touching the engine's references; Chroma and Flux without Kontext refuse."""
    import types

    import numpy as np
    from PIL import Image

    flux, chroma = neo
    with shared_opts():  # the engine module imports the WebUI's settings (gradio) through its imports
        engine_module = import_host("backend.diffusion_engine.flux")

    class StandInVAE:  # the two calls of Neo's VAE patcher the engine makes; a fixed non-trivial map
        def __init__(self):
            self.first_stage_model = types.SimpleNamespace(process_in=lambda z: (z - 0.1159) * 0.3611)

        def encode(self, pixels):  # [B, H, W, 3] in [0, 1] -> [B, 16, H/8, W/8]
            x = pixels.movedim(-1, 1)
            pooled = torch.nn.functional.avg_pool2d(x, 8)
            return torch.cat([pooled * (i + 1) - 0.5 * i for i in range(16)][:16], dim=1)[:, :16]

    vae = StandInVAE()
    sd_model = holder(build_flux(flux))
    sd_model.forge_objects.vae = vae
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    p = types.SimpleNamespace(width=64, height=48)
    monkeypatch.setitem(flux.dynamic_args, "kontext", True)
    adapter = NeoFluxAdapter(sd_model)
    assert adapter.takes_negative_image()
    got = adapter.encode_negative_image(p, picture)
    # the host: img2img resizes its input to width x height ("Just resize": Lanczos), scales to [-1, 1]
    resized = np.asarray(picture.resize((64, 48), resample=Image.LANCZOS), dtype=np.float32) / 255.0
    x = torch.from_numpy(2.0 * resized - 1.0).movedim(-1, 0)[None]
    engine = types.SimpleNamespace(forge_objects=types.SimpleNamespace(vae=vae), ref_latents=[], ini_latent=None)
    monkeypatch.setitem(engine_module.dynamic_args, "is_referencing", False)
    engine_module.Flux.encode_first_stage(engine, x)
    assert got.latent.shape == (1, 16, 6, 8) and got.length == 12
    torch.testing.assert_close(got.latent, engine.ini_latent, rtol=1e-6, atol=1e-6)
    monkeypatch.setitem(flux.dynamic_args, "kontext", False)
    assert not NeoFluxAdapter(sd_model).takes_negative_image()
    monkeypatch.setitem(flux.dynamic_args, "kontext", True)
    assert not NeoFluxAdapter(holder(build_chroma(chroma))).takes_negative_image()


@pytest.fixture(scope="module")
def neo_t5():
    with host_modules("neo"), shared_opts(emphasis="Original"):
        t5_engine = import_host("backend.text_processing.t5_engine")
        t5 = host_t5(import_host("backend.nn.t5"), hf_t5_encoder(seed=5))
        yield t5_engine, t5


def neo_model(engine):
    """Neo's Flux/Chroma `get_learned_conditioning` minus CLIP and model loading: T5 is the crossattn."""
    model = type("Holder", (), {})()
    model.text_processing_engine_t5 = engine
    model.get_learned_conditioning = lambda prompts: {"crossattn": engine(list(prompts))}
    return model


def t5_rows(transformer, ids):
    with torch.no_grad():
        return transformer(input_ids=torch.tensor([ids]))[0].double()


# Neo's engines: Flux pads to 256 (`flux.py`), Chroma pads nothing (`chroma.py`: min_length=1, min_padding=0)
@pytest.mark.parametrize("engine_kwargs, pad_to", [({}, 256), ({"min_length": 1, "min_padding": 0}, 0)])
@pytest.mark.parametrize("words", [3, 300])
def test_flux_lambda_uses_the_empty_prompt_null(neo_t5, engine_kwargs, pad_to, words):
    """p- + lambda (p- - p0), p0 = mean padding encoding of `[EOS, PAD x 255]`, also when the negative
    leaves no padding of its own (300 words; Chroma's engine always)."""
    t5_engine, t5 = neo_t5
    engine = t5_engine.T5TextProcessingEngine(t5, T5WordTokenizer(), **engine_kwargs)
    prompt = " ".join(f"n{i}" for i in range(words))
    ids = T5WordTokenizer()([prompt])["input_ids"][0] + [1]
    plain = t5_rows(t5.transformer, ids + [0] * max(0, pad_to - len(ids)))[:len(ids)]
    null = t5_rows(t5.transformer, [1] + [0] * 255)[1:].mean(dim=0)
    got = NeoFluxAdapter(neo_model(engine)).encode_negative(None, [prompt], VSFSettings(flux_lambda=8.0))
    assert got.length == len(ids)
    torch.testing.assert_close(got.embeds[0].double(), plain + 8.0 * (plain - null), atol=1e-4, rtol=1e-4)  # (1 + lambda) x emphasis ulps
    torch.testing.assert_close(_negative_text.t5_null_embedding(engine).double(), null, atol=1e-6, rtol=1e-6)
