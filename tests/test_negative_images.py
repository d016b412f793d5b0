"""Negative images (docs/negative-images.md): a picture's latent tokens as negative tokens in one pass.

The joint sequence is `[P, N_txt | N_img, I, R]`: the text negative last in the text stream, the image
negative first in the image stream, one N span. The oracles are written here in plain float64 torch from
the paper's equations (eq. 7/8 per image query, A+ over {I, real P, R}, A- over every real negative token,
text and image), with every token's role spelled out by the test.
"""
import math

import pytest
import torch
from PIL import Image

from lib_vsf import VSFSettings, from_preset
from lib_vsf.attention import Guidance, joint_attention
from lib_vsf.diffusers import UnsupportedPipelineError, VSFGuidance
from lib_vsf.layout import TokenLayout
from tiny_pipelines import flux_pipeline

B, H, D = 2, 2, 8
P, NT, NI, I, R = 4, 3, 5, 6, 4  # positive, text negative (padded), image negative, image, reference
NT_MASK = torch.tensor([[True, True, True], [True, False, False]])  # sample 1: a shorter negative prompt
ALPHA, BETA = 3.3, 0.2


def roles_and_layout():
    roles = ["P"] * P + ["Nt"] * NT + ["Ni"] * NI + ["I"] * I + ["R"] * R
    length = len(roles)
    mask = torch.cat([NT_MASK, torch.ones(B, NI, dtype=torch.bool)], dim=1)
    layout = TokenLayout(length, slice(0, P), slice(P, P + NT + NI), mask, slice(length - R, length))
    return roles, layout


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax_row(q_row, keys, values, bias=None):
    s = keys @ q_row / math.sqrt(q_row.shape[-1])
    if bias is not None:
        s = s + bias
    w = s.exp()
    return (w[:, None] * values).sum(0) / w.sum(), w.sum()


def oracle(q, k, v, roles, alpha=ALPHA, beta=BETA):
    out = torch.full_like(q, float("nan"))
    for b in range(q.shape[0]):
        text_neg = [i for i, r in enumerate(roles) if r == "Nt"]
        real_nt = [i for i, ok in zip(text_neg, NT_MASK[b].tolist()) if ok]
        at = {r: [i for i, x in enumerate(roles) if x == r] for r in ("P", "Ni", "I", "R")}
        negative = real_nt + at["Ni"]
        plus = at["P"] + at["I"] + at["R"]
        n0_keys = at["I"] + at["R"] + negative
        for h in range(q.shape[1]):
            for i, r in enumerate(roles):
                qr = q[b, h, i]
                if r in ("P", "R"):
                    out[b, h, i] = softmax_row(qr, k[b, h, plus], v[b, h, plus])[0]
                elif i in negative:
                    out[b, h, i] = softmax_row(qr, k[b, h, n0_keys], v[b, h, n0_keys])[0]
                elif r == "I":  # eq. 7/8: W = A+/(A+ + A-), Z = W Z+ - alpha (1 - W) Z-
                    z_plus, a_plus = softmax_row(qr, k[b, h, plus], v[b, h, plus])
                    z_minus, a_minus = softmax_row(qr, k[b, h, negative], v[b, h, negative], -beta)
                    w = a_plus / (a_plus + a_minus)
                    out[b, h, i] = w * z_plus - alpha * (1 - w) * z_minus
    return out


def real_rows(roles, b):
    text_neg = [i for i, r in enumerate(roles) if r == "Nt"]
    padded = {i for i, ok in zip(text_neg, NT_MASK[b].tolist()) if not ok}
    return [i for i in range(len(roles)) if i not in padded]


def test_image_negative_span_matches_equations_per_image_query():
    roles, layout = roles_and_layout()
    q, k, v = (rand(B, H, layout.length, D, seed=s) for s in range(3))
    got = joint_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA))
    want = oracle(q, k, v, roles)
    for b in range(B):
        rows = real_rows(roles, b)
        torch.testing.assert_close(got[b][:, rows], want[b][:, rows], rtol=1e-9, atol=1e-9)


def test_reference_rows_never_see_the_image_negative_and_n0_rows_see_reference():
    roles, layout = roles_and_layout()
    q, k, v = (rand(B, H, layout.length, D, seed=s) for s in range(3))
    g = Guidance("vsf", ALPHA, BETA)
    base = joint_attention(q, k, v, layout, g)
    image_neg = [i for i, r in enumerate(roles) if r == "Ni"]
    ref = [i for i, r in enumerate(roles) if r == "R"]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, image_neg] += rand(B, H, NI, D, seed=7)  # other negative-image keys and values (N0 and N1)
    v2[:, :, image_neg] += rand(B, H, NI, D, seed=8)
    moved = joint_attention(q, k2, v2, layout, g)
    assert torch.equal(moved[:, :, ref], base[:, :, ref])  # R rows: untouched, bit for bit
    assert torch.equal(moved[:, :, :P], base[:, :, :P])  # P rows too
    image = [i for i, r in enumerate(roles) if r == "I"]
    assert not torch.allclose(moved[:, :, image], base[:, :, image])  # the image sees N1
    k3 = k.clone()
    k3[:, :, ref] += rand(B, H, R, D, seed=9)  # other reference keys
    seen = joint_attention(q, k3, v, layout, g)
    assert not torch.allclose(seen[:, :, image_neg], base[:, :, image_neg])  # N0-image rows see R


# --- Flux Kontext, end to end --------------------------------------------------------------------------

PROMPT, NEGATIVE = "a photo of cat", "blurry text"
INPUT = Image.new("RGB", (16, 16), (200, 30, 30))
NEG_IMAGE = Image.fromarray((torch.arange(16 * 16 * 3) % 251).reshape(16, 16, 3).to(torch.uint8).numpy())
KONTEXT_ARGS = dict(image=INPUT, height=16, width=16, max_area=256, _auto_resize=False, num_inference_steps=2,
                    max_sequence_length=32, output_type="pt")


@pytest.fixture(scope="module")
def kontext():
    from diffusers import FluxKontextPipeline

    flux = flux_pipeline(guidance_embeds=True)
    pipe = FluxKontextPipeline(scheduler=flux.scheduler, vae=flux.vae, text_encoder=flux.text_encoder,
                               tokenizer=flux.tokenizer, text_encoder_2=flux.text_encoder_2,
                               tokenizer_2=flux.tokenizer_2, transformer=flux.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kontext_plain(pipe, image=INPUT):
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **{**KONTEXT_ARGS, "image": image}).images


def kontext_guided(pipe, negative=NEGATIVE, settings=None, negative_image=NEG_IMAGE):
    with VSFGuidance(pipe, negative, settings or from_preset("VSF Strong"), negative_image=negative_image) as vsf:
        out = vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **KONTEXT_ARGS).images
        return out, vsf.run.calls


class Capture:
    """Forward pre-hook after the guidance's own: the kwargs the transformer really gets."""

    def __init__(self, model, keys=("hidden_states", "img_ids", "encoder_hidden_states")):
        self.calls, self.keys = [], keys
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: kwargs[k] for k in self.keys})


def test_kontext_negative_image_tokens_are_the_pipelines_reference_encoding(kontext):
    """N_img = the latents the pipeline itself makes of that picture as its input image, placed first in
    the image stream, with the input image's ids at the next reference index (2)."""
    cap = Capture(kontext.transformer)
    try:
        kontext_plain(kontext, image=NEG_IMAGE)  # the pipeline's own encoding of the picture as reference
    finally:
        cap.handle.remove()
    as_reference = cap.calls[0]
    with VSFGuidance(kontext, NEGATIVE, negative_image=NEG_IMAGE) as vsf:
        cap = Capture(kontext.transformer)  # runs after the guidance's own pre-hook
        try:
            vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **KONTEXT_ARGS)
        finally:
            cap.handle.remove()
    guided_call = cap.calls[0]
    ids = as_reference["img_ids"]
    ref_rows = ids[:, 0] == 1
    n_img = int(ref_rows.sum())
    assert n_img == 16  # a 16x16 picture: 8x8 latents, 2x2 packed
    ref_tokens = as_reference["hidden_states"][:, ref_rows]
    torch.testing.assert_close(guided_call["hidden_states"][:, :n_img], ref_tokens, rtol=0, atol=0)
    want_ids = ids[ref_rows].clone()
    want_ids[:, 0] = 2
    assert torch.equal(guided_call["img_ids"][:n_img], want_ids)
    # then the image and the input image as the pipeline gives them
    assert torch.equal(guided_call["img_ids"][n_img:], ids)


def test_kontext_joint_attention_matches_the_oracle_with_text_and_image_negative(kontext, monkeypatch):
    """The first double block's attention: the roles by count ([P, N_txt | N_img, I, R]) and eq. 7/8."""
    import lib_vsf.diffusers.flux as flux_module

    seen = []
    real = flux_module.joint_attention

    def record(q, k, v, layout, guidance, **kw):
        seen.append((q, k, v, layout, guidance))
        return real(q, k, v, layout, guidance, **kw)

    monkeypatch.setattr(flux_module, "joint_attention", record)
    kontext_guided(kontext)
    q, k, v, layout, g = seen[0]
    n_text = len(kontext.tokenizer_2(NEGATIVE).input_ids)  # tokens + EOS, no padding
    roles = ["P"] * 32 + ["Nt"] * n_text + ["Ni"] * 16 + ["I"] * 16 + ["R"] * 16
    assert_block_is_the_oracle(real, q, k, v, layout, g, roles)


def assert_block_is_the_oracle(attention, q, k, v, layout, g, roles):
    """One captured joint-attention call against eq. 7/8 and the table, roles given by the test."""
    assert q.shape[2] == len(roles)
    out = attention(q.double(), k.double(), v.double(), layout, g)
    q, k, v = q.double(), k.double(), v.double()
    want = torch.full_like(q, float("nan"))
    at = {r: [i for i, x in enumerate(roles) if x == r] for r in ("P", "Nt", "Ni", "I", "R")}
    negative, plus = at["Nt"] + at["Ni"], at["P"] + at["I"] + at["R"]
    for h in range(q.shape[1]):
        for i, r in enumerate(roles):
            qr = q[0, h, i]
            if r in ("P", "R"):
                want[0, h, i] = softmax_row(qr, k[0, h, plus], v[0, h, plus])[0]
            elif r in ("Nt", "Ni"):
                keys = at["I"] + at["R"] + negative
                want[0, h, i] = softmax_row(qr, k[0, h, keys], v[0, h, keys])[0]
            else:
                z_plus, a_plus = softmax_row(qr, k[0, h, plus], v[0, h, plus])
                z_minus, a_minus = softmax_row(qr, k[0, h, negative], v[0, h, negative], -g.beta)
                w = a_plus / (a_plus + a_minus)
                want[0, h, i] = w * z_plus - g.alpha * (1 - w) * z_minus
    torch.testing.assert_close(out[0], want[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_kontext_negative_image_changes_the_edit_and_restores_exactly(kontext, negative):
    before = dict(kontext.transformer.attn_processors)
    unguided = kontext_plain(kontext)
    out, calls = kontext_guided(kontext, negative=negative)
    assert calls == 2 * 2  # 2 steps x (1 double + 1 single block)
    assert out.shape == unguided.shape and torch.isfinite(out).all()
    assert (out - unguided).abs().max() > 1e-3
    after = dict(kontext.transformer.attn_processors)
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    assert not kontext.transformer._forward_hooks and not kontext.transformer._forward_pre_hooks
    assert torch.equal(kontext_plain(kontext), unguided)


def test_kontext_negative_image_and_text_differ_from_text_alone(kontext):
    text_only, _ = kontext_guided(kontext, negative_image=None)
    both, _ = kontext_guided(kontext)
    assert (both - text_only).abs().max() > 1e-4


def test_kontext_alpha_zero_huge_beta_is_the_plain_edit(kontext):
    unguided = kontext_plain(kontext)
    settings = VSFSettings("vsf", alpha=0.0, beta=10.0)
    object.__setattr__(settings, "beta", 1e4)  # beyond the UI range: N1 weighs exactly nothing
    out, calls = kontext_guided(kontext, settings=settings)
    assert calls == 4
    torch.testing.assert_close(out, unguided, rtol=1e-5, atol=1e-5)


def test_kontext_restored_after_an_exception(kontext):
    unguided = kontext_plain(kontext)
    before = dict(kontext.transformer.attn_processors)

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted mid-run")

    with pytest.raises(KeyboardInterrupt):
        with VSFGuidance(kontext, NEGATIVE, negative_image=NEG_IMAGE) as vsf:
            vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), callback_on_step_end=boom,
                **KONTEXT_ARGS)
    after = dict(kontext.transformer.attn_processors)
    assert all(before[n] is after[n] for n in before)
    assert not kontext.transformer._forward_hooks and not kontext.transformer._forward_pre_hooks
    assert torch.equal(kontext_plain(kontext), unguided)


def test_negative_image_on_a_pipeline_without_references_is_refused_before_anything_changes():
    pipe = flux_pipeline()
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(UnsupportedPipelineError, match="negative images"):
        VSFGuidance(pipe, NEGATIVE, negative_image=NEG_IMAGE)
    after = dict(pipe.transformer.attn_processors)
    assert all(before[n] is after[n] for n in before)


# --- Qwen-Image-Edit, end to end -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_edit():
    from tiny_pipelines_qwen import BUILDERS_QWEN

    pipe = BUILDERS_QWEN["qwen-image-edit"]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_args(image=None):
    from tiny_pipelines_qwen import CALL_ARGS_QWEN, input_images

    inputs = input_images(2)
    return {**CALL_ARGS_QWEN["qwen-image-edit"], "image": inputs[0] if image is None else image,
            "output_type": "pt"}, inputs[1]


def qwen_plain(pipe, image=None):
    args, _ = qwen_args(image)
    return pipe(prompt=PROMPT, true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), **args).images


def qwen_guided(pipe, negative=NEGATIVE, settings=None, with_image=True, capture=None):
    args, negative_picture = qwen_args()
    with VSFGuidance(pipe, negative, settings or from_preset("VSF Strong"),
                     negative_image=negative_picture if with_image else None) as vsf:
        cap = Capture(pipe.transformer, ("hidden_states", "img_shapes")) if capture is not None else None
        try:
            out = vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **args).images
        finally:
            if cap is not None:
                cap.handle.remove()
                capture.extend(cap.calls)
        return out, vsf.run.calls


def test_qwen_edit_negative_image_tokens_are_the_pipelines_reference_encoding(qwen_edit):
    _, negative_picture = qwen_args()
    cap = Capture(qwen_edit.transformer, ("hidden_states", "img_shapes"))
    try:
        qwen_plain(qwen_edit, image=negative_picture)  # the pipeline's own encoding of it as input image
    finally:
        cap.handle.remove()
    as_reference = cap.calls[0]
    image_shape, ref_shape = as_reference["img_shapes"][0]
    n_image, n_ref = math.prod(image_shape), math.prod(ref_shape)
    calls = []
    qwen_guided(qwen_edit, capture=calls)
    got = calls[0]
    torch.testing.assert_close(got["hidden_states"][:, :n_ref], as_reference["hidden_states"][:, n_image:],
                               rtol=0, atol=0)
    assert [list(s) for s in got["img_shapes"]] == [[image_shape, ref_shape, ref_shape]]  # the next image


def test_qwen_edit_negative_image_changes_the_edit_and_restores_exactly(qwen_edit):
    before = dict(qwen_edit.transformer.attn_processors)
    unguided = qwen_plain(qwen_edit)
    out, calls = qwen_guided(qwen_edit)
    image_only, _ = qwen_guided(qwen_edit, negative="")
    text_only, _ = qwen_guided(qwen_edit, with_image=False)
    assert calls > 0 and out.shape == unguided.shape and torch.isfinite(out).all()
    assert (out - unguided).abs().max() > 1e-4 and (image_only - unguided).abs().max() > 1e-4
    assert (out - text_only).abs().max() > 1e-5
    after = dict(qwen_edit.transformer.attn_processors)
    assert all(before[n] is after[n] for n in before)
    assert not qwen_edit.transformer._forward_hooks and not qwen_edit.transformer._forward_pre_hooks
    assert torch.equal(qwen_plain(qwen_edit), unguided)


def test_qwen_edit_alpha_zero_huge_beta_is_the_plain_edit(qwen_edit):
    settings = VSFSettings("vsf", alpha=0.0, beta=10.0)
    object.__setattr__(settings, "beta", 1e4)  # beyond the UI range: N1 weighs exactly nothing
    unguided = qwen_plain(qwen_edit)
    out, calls = qwen_guided(qwen_edit, settings=settings)
    assert calls > 0
    torch.testing.assert_close(out, unguided, rtol=1e-5, atol=1e-5)


def test_qwen_edit_joint_attention_matches_the_oracle_with_text_and_image_negative(qwen_edit, monkeypatch):
    import lib_vsf.diffusers.qwenimage as qwen_module

    seen, real = [], qwen_module.joint_attention

    def record(q, k, v, layout, guidance, **kw):
        seen.append((q, k, v, layout, guidance))
        return real(q, k, v, layout, guidance, **kw)

    monkeypatch.setattr(qwen_module, "joint_attention", record)
    calls = []
    qwen_guided(qwen_edit, capture=calls)
    shapes = calls[0]["img_shapes"][0]
    n_image, n_ref, n_neg = (math.prod(s) for s in shapes)
    q, k, v, layout, g = seen[0]
    n_text = q.shape[2] - n_image - n_ref - n_neg
    # the positive stream's length from the plain call's text (the negative prompt's own encoding is
    # the rest of the text stream)
    n_positive = layout.positive_len
    roles = ["P"] * n_positive + ["Nt"] * (n_text - n_positive) + ["Ni"] * n_neg + ["I"] * n_image + ["R"] * n_ref
    assert n_text - n_positive > 0 and layout.positive == slice(0, n_positive)
    assert_block_is_the_oracle(real, q, k, v, layout, g, roles)


def test_qwen_edit_negative_image_rope_rows_are_the_next_image_of_the_model(qwen_edit, monkeypatch):
    """The rotary rows applied to the negative image's queries are the model's own MSRoPE rows of a third
    entry of img_shapes (frame index 2), and the image and reference keep theirs."""
    import lib_vsf.diffusers.qwenimage as qwen_module

    applied, real = [], qwen_module._rope

    def record(x, freqs):
        applied.append(freqs)
        return real(x, freqs)

    monkeypatch.setattr(qwen_module, "_rope", record)
    calls = []
    qwen_guided(qwen_edit, capture=calls)
    shapes = [tuple(s) for s in calls[0]["img_shapes"][0]]
    n_image, n_ref, n_neg = (math.prod(s) for s in shapes)
    image_freqs = applied[0]  # the first call rotates the image stream's queries
    model_rows, _ = qwen_edit.transformer.pos_embed([shapes], max_txt_seq_len=8, device=image_freqs.device)
    assert image_freqs.shape[0] == n_neg + n_image + n_ref
    assert torch.equal(image_freqs[:n_neg], model_rows[n_image + n_ref:])
    assert torch.equal(image_freqs[n_neg:], model_rows[:n_image + n_ref])


def test_cli_negative_image_moves_the_kontext_edit(kontext, tmp_path, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext_module

    from lib_vsf.cli import main
    from lib_vsf.output import read_png_infotext

    monkeypatch.setattr(kontext_module, "PREFERRED_KONTEXT_RESOLUTIONS", [(16, 16)])  # a tiny trained size
    kontext.save_pretrained(tmp_path / "kontext")
    INPUT.save(tmp_path / "in.png")
    NEG_IMAGE.save(tmp_path / "avoid.png")
    common = ["generate", "--model", str(tmp_path / "kontext"), "--prompt", PROMPT, "--steps", "2", "--width", "16",
              "--height", "16", "--max-sequence-length", "16", "--image", str(tmp_path / "in.png")]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--negative-image", str(tmp_path / "avoid.png"), "--out", str(tmp_path / "neg.png")]) == 0
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "neg.png") as b:
        assert a.size == b.size and list(a.getdata()) != list(b.getdata())
    text = read_png_infotext(tmp_path / "neg.png")
    assert "Negative image: avoid.png" in text and "VSF method: vsf" in text
    assert "Negative image" not in read_png_infotext(tmp_path / "plain.png")


def test_kontext_batch_with_two_text_negatives_and_one_negative_image_equals_each_alone(kontext):
    """The text negatives pad to the longest (masked), the image negative follows them for every sample."""
    negatives = ["blurry", "a dog wearing a red hat, low quality"]
    prompts = [PROMPT, "a photo of a house"]
    with VSFGuidance(kontext, negatives, from_preset("VSF Strong"), negative_image=NEG_IMAGE) as vsf:
        batch = vsf(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                    **KONTEXT_ARGS).images
    for i in range(2):
        with VSFGuidance(kontext, negatives[i], from_preset("VSF Strong"), negative_image=NEG_IMAGE) as vsf:
            alone = vsf(prompt=prompts[i], generator=torch.Generator().manual_seed(i), **KONTEXT_ARGS).images
        torch.testing.assert_close(batch[i], alone[0], rtol=1e-4, atol=1e-4)


def test_negative_image_on_qwen_edit_plus_is_refused_clearly():
    from tiny_pipelines_qwen import BUILDERS_QWEN

    pipe = BUILDERS_QWEN["qwen-image-edit-plus"]()
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(UnsupportedPipelineError, match="one reference image"):
        VSFGuidance(pipe, NEGATIVE, negative_image=NEG_IMAGE)
    after = dict(pipe.transformer.attn_processors)
    assert all(before[n] is after[n] for n in before)
