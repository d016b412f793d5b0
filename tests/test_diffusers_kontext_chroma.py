"""Flux Kontext and Chroma under VSFGuidance, on tiny real diffusers pipelines (random weights, no downloads).

End to end, per family: guidance changes the image (VSF, NAG, NASA); an empty negative and alpha = 0 with
beta = +inf give the unguided image bit for bit; a batch with two negatives equals each alone; the pipeline
is restored bit for bit after success and after an exception; a CFG scale given to the guided call still runs
one pass per step; the CLI writes a compare grid (Kontext with `--image`). Oracles written out here in plain
torch: the guided attention of every block equals VSF-SPEC eq. 7/8 with the mask table, including Kontext's
reference rows and columns (R rows attend I, P, R; N0 rows attend I, R, N0; only image rows see N1) and
Chroma's masked positive padding (a masked positive position is a key for nobody).
"""
import math

import pytest
import torch

from lib_vsf import from_preset
from lib_vsf.attention import Guidance
from lib_vsf.diffusers import GuidanceInputError, VSFGuidance
from tiny_pipelines_kontext_chroma import BUILDERS_KC, call_args_kc, reference_image

PROMPT = "a photo of cat"
NEGATIVE = "blurry text watermark"
LONG = "a photo of cat with a red dog and a blue car in the sky"
FAMILIES = ["kontext", "chroma", "chroma-img2img"]
# The pipelines' own single unguided pass: Kontext's true CFG is off by default (its guidance_scale is the
# distilled guidance embedding, 3.5 by default, in both runs); Chroma runs CFG above guidance_scale 1.
UNGUIDED = {"kontext": {}, "chroma": {"guidance_scale": 1.0}, "chroma-img2img": {"guidance_scale": 1.0}}


def boolean_text_mask(pipe):
    """Make `pipe` hand Chroma's text mask to the transformer as bool (as diffusers' fix of issue #12116
    does), so the model's own pass hides the masked padding instead of adding 0/1 to the logits."""
    encode = pipe._get_t5_prompt_embeds

    def boolean(*args, **kwargs):
        embeds, mask = encode(*args, **kwargs)
        return embeds, mask.bool()

    pipe._get_t5_prompt_embeds = boolean
    return pipe


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(name):
        if name not in cache:
            if name == "chroma-bool":
                cache[name] = boolean_text_mask(BUILDERS_KC["chroma"]())
            else:
                cache[name] = BUILDERS_KC[name]()
            cache[name].set_progress_bar_config(disable=True)
        return cache[name]

    return get


def family_of(name):
    return "chroma" if name == "chroma-bool" else name


def generators(prompt, seed):
    if isinstance(prompt, str):
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(len(prompt))]


def plain(pipe, name, prompt=PROMPT, seed=0, **extra):
    return pipe(prompt=prompt, generator=generators(prompt, seed), output_type="pt",
                **{**call_args_kc(family_of(name)), **UNGUIDED[family_of(name)], **extra}).images


def guided(pipe, name, negative=NEGATIVE, settings=None, prompt=PROMPT, seed=0, guidance=None, **extra):
    with VSFGuidance(pipe, negative, settings or from_preset("VSF Strong")) as vsf:
        if guidance is not None:
            vsf.run.guidance = lambda: guidance
        out = vsf(prompt=prompt, generator=generators(prompt, seed), output_type="pt",
                  **{**call_args_kc(family_of(name)), **extra}).images
        return out, vsf.run.calls


def processor_state(pipe):
    return {name: m.processor for name, m in pipe.transformer.named_modules()
            if hasattr(m, "processor") and hasattr(m, "set_processor")}


def hooks_left(model):
    return [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


def assert_restored(pipe, name, before, unguided):
    after = processor_state(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not hooks_left(pipe.transformer), "hooks left behind"
    assert torch.equal(plain(pipe, name), unguided), "pipeline output changed after guidance"


def transformer_calls(pipe, store):
    return pipe.transformer.register_forward_pre_hook(lambda m, a, k: store.append(dict(k)), with_kwargs=True)


def guided_transformer_calls(pipe, name, settings=None, **extra):
    """The transformer's kwargs of each call of a guided run, as the guidance hands them over (the
    recording hook is registered after the guidance's own)."""
    calls = []
    with VSFGuidance(pipe, NEGATIVE, settings or from_preset("VSF Strong")) as vsf:
        hook = transformer_calls(pipe, calls)
        try:
            vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                **{**call_args_kc(family_of(name)), **extra})
        finally:
            hook.remove()
    return calls


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_guidance_changes_the_image_and_restores_exactly(pipes, name):
    pipe = pipes(name)
    before = processor_state(pipe)
    unguided = plain(pipe, name)
    for preset in ("VSF Strong", "NAG", "NASA"):
        out, calls = guided(pipe, name, settings=from_preset(preset))
        assert calls > 0 and torch.isfinite(out).all()
        assert not torch.equal(out, unguided), f"{preset} changed nothing"
    assert_restored(pipe, name, before, unguided)


@pytest.mark.parametrize("name", ["kontext", "chroma-bool"])
def test_empty_negative_and_zero_alpha_infinite_beta_are_the_unguided_image_bit_for_bit(pipes, name):
    """Chroma with the boolean text mask: with diffusers' float mask its own pass adds 0/1 to the logits
    (a soft mask) while the guided pass hides masked padding, so only the empty negative is exact there."""
    pipe = pipes(name)
    unguided = plain(pipe, name)
    out, calls = guided(pipe, name, negative="  ")
    assert calls == 0 and torch.equal(out, unguided)
    out, calls = guided(pipe, name, guidance=Guidance("vsf", 0.0, math.inf))
    assert calls > 0
    assert torch.equal(out, unguided)


def test_chroma_with_diffusers_float_mask_empty_negative_is_exact(pipes):
    pipe = pipes("chroma")
    out, calls = guided(pipe, "chroma", negative="")
    assert calls == 0 and torch.equal(out, plain(pipe, "chroma"))


@pytest.mark.parametrize("name", ["kontext", "chroma-bool", "chroma"])
def test_batch_with_two_negatives_equals_each_alone(pipes, name):
    """Negatives of different lengths (padded N with a mask) and, for Chroma, prompts of different
    lengths (a different positive padding mask per sample)."""
    pipe = pipes(name)
    prompts, negatives = [PROMPT, LONG], ["blurry", "text watermark, low quality, ugly, bad hands"]
    both, _ = guided(pipe, name, negative=negatives, prompt=prompts, seed=3)
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        alone, _ = guided(pipe, name, negative=negative, prompt=prompt, seed=3 + i)
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_restored_after_an_exception(pipes, name):
    pipe = pipes(name)
    before = processor_state(pipe)
    unguided = plain(pipe, name)

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt("interrupted mid-run")

    with pytest.raises(KeyboardInterrupt):
        guided(pipe, name, callback_on_step_end=boom)
    assert_restored(pipe, name, before, unguided)


@pytest.mark.parametrize("name,cfg", [("kontext", dict(true_cfg_scale=4.0, negative_prompt="ugly")),
                                      ("chroma", dict(guidance_scale=5.0, negative_prompt="ugly"))])
def test_cfg_scale_is_dropped_to_one_pass(pipes, name, cfg):
    pipe = pipes(name)
    calls = []
    hook = transformer_calls(pipe, calls)
    try:
        with pytest.warns(UserWarning, match="VSF replaces CFG"):
            guided(pipe, name, **cfg)
    finally:
        hook.remove()
    steps = call_args_kc(name)["num_inference_steps"]
    assert [c["hidden_states"].shape[0] for c in calls] == [1] * steps


def test_kontext_distilled_guidance_stays_the_users(pipes):
    pipe = pipes("kontext")
    calls = []
    hook = transformer_calls(pipe, calls)
    try:
        guided(pipe, "kontext", guidance_scale=2.5)
    finally:
        hook.remove()
    assert len(calls) == call_args_kc("kontext")["num_inference_steps"]
    assert all(torch.equal(c["guidance"], torch.full((1,), 2.5)) for c in calls)


def test_chroma_refuses_the_flux_lambda_rule_and_leaves_nothing(pipes):
    pipe = pipes("chroma")
    before = processor_state(pipe)
    unguided = plain(pipe, "chroma")
    with pytest.raises(GuidanceInputError, match="lambda"):
        guided(pipe, "chroma", settings=from_preset("VSF Strong", flux_lambda=8.0))
    assert_restored(pipe, "chroma", before, unguided)


def test_kontext_applies_the_flux_lambda_rule(pipes):
    """The Flux lambda rule pushes Kontext's negative as for Flux dev: another image than lambda 0."""
    pipe = pipes("kontext")
    plain_lambda, _ = guided(pipe, "kontext", settings=from_preset("VSF Strong"))
    pushed, _ = guided(pipe, "kontext", settings=from_preset("VSF Strong", flux_lambda=8.0))
    assert not torch.equal(plain_lambda, pushed)


# -- what the transformer is given ---------------------------------------------------------------------
def t5_alone(pipe, tokenizer, encoder, text):
    ids = tokenizer(text, return_tensors="pt").input_ids  # tokens + EOS, no padding
    assert tokenizer.pad_token_id not in ids[0].tolist()
    with torch.no_grad():
        return encoder(ids, attention_mask=torch.ones_like(ids))[0][0]


def test_chroma_keeps_the_positive_padding_mask_and_the_negative_is_unpadded(pipes):
    pipe = pipes("chroma")
    want = t5_alone(pipe, pipe.tokenizer, pipe.text_encoder, NEGATIVE)
    n, positive_len = want.shape[0], call_args_kc("chroma")["max_sequence_length"]
    real = len(pipe.tokenizer(PROMPT).input_ids)  # tokens + EOS
    unguided = []
    hook = transformer_calls(pipe, unguided)
    try:
        plain(pipe, "chroma")
    finally:
        hook.remove()
    calls = guided_transformer_calls(pipe, "chroma")
    text, mask = calls[0]["encoder_hidden_states"], calls[0]["attention_mask"]
    assert text.shape[1] == n + positive_len
    torch.testing.assert_close(text[0, :n], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(text[0, n:], unguided[0]["encoder_hidden_states"][0])
    assert bool((mask[0, :n] > 0).all()), "the negative is masked"
    assert torch.equal(mask[:, n:], unguided[0]["attention_mask"]), "the positive padding mask changed"
    assert int((mask[0, n:n + positive_len] > 0).sum()) == real + 1  # tokens, EOS and one pad token
    assert torch.equal(calls[0]["txt_ids"][:n], torch.zeros(n, 3))


def test_kontext_negative_is_unpadded_t5_and_references_stay_after_the_image(pipes):
    pipe = pipes("kontext")
    want = t5_alone(pipe, pipe.tokenizer_2, pipe.text_encoder_2, NEGATIVE)
    n = want.shape[0]
    kwargs = guided_transformer_calls(pipe, "kontext", from_preset("VSF Strong", flux_lambda=0.0))[0]
    torch.testing.assert_close(kwargs["encoder_hidden_states"][0, :n], want, rtol=1e-5, atol=1e-5)
    ids = kwargs["img_ids"]
    assert ids.shape[0] == kwargs["hidden_states"].shape[1] == 32
    assert torch.equal(ids[:16, 0], torch.zeros(16)) and torch.equal(ids[16:, 0], torch.ones(16))


# -- the spec written out: eq. 7/8 and the mask table, with R and a masked positive ------------------------
def spec_attention(q, k, v, image, positive, reference, negative, alpha, beta):
    """VSF-SPEC joint attention of one sample, float64. q/k/v `[H, L, D]`; index lists of the roles (only the
    real positive and negative tokens: a masked position is a key for nobody).
    I rows: A+ over {I, P, R}, A- over N1 (logits - beta), W = A+ / (A+ + A-), Z = W Z+ - alpha (1 - W) Z-.
    P and R rows: plain attention over {I, P, R}. N0 rows: over {I, R, N0}."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    ipr, irn = image + positive + reference, image + reference + negative
    out = torch.full_like(q, float("nan"))
    si = s[:, image]
    log_a_plus = torch.logsumexp(si[:, :, ipr], -1)
    log_a_minus = torch.logsumexp(si[:, :, negative] - beta, -1)
    w = torch.sigmoid(log_a_plus - log_a_minus)[..., None]
    z_plus = torch.softmax(si[:, :, ipr], -1) @ v[:, ipr]
    z_minus = torch.softmax(si[:, :, negative], -1) @ v[:, negative]
    out[:, image] = w * z_plus - alpha * (1 - w) * z_minus
    for rows in (positive, reference):
        if rows:
            out[:, rows] = torch.softmax(s[:, rows][:, :, ipr], -1) @ v[:, ipr]
    out[:, negative] = torch.softmax(s[:, negative][:, :, irn], -1) @ v[:, irn]
    return out


def flux_rope(x, cos, sin):
    """Flux's real-valued RoPE (channel pairs interleaved) on `[L, H, D]` with `[L, D]` cos / sin."""
    x = x.double()
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(-2)
    return x * cos.double()[:, None] + rotated * sin.double()[:, None]


def capture(module, store):
    return module.register_forward_hook(lambda m, a, k, out: store.append((a, k, out)), with_kwargs=True)


def heads(t, attn):
    return t.unflatten(-1, (-1, attn.head_dim))


def qkv_double(attn, hidden, context):
    q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(context), attn)), attn.norm_q(heads(attn.to_q(hidden), attn))])
    k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(context), attn)), attn.norm_k(heads(attn.to_k(hidden), attn))])
    v = torch.cat([heads(attn.add_v_proj(context), attn), heads(attn.to_v(hidden), attn)])
    return q, k, v


def qkv_single(attn, hidden):
    return (attn.norm_q(heads(attn.to_q(hidden), attn)), attn.norm_k(heads(attn.to_k(hidden), attn)),
            heads(attn.to_v(hidden), attn))


def check_blocks(pipe, name, settings, roles_of, prompt=PROMPT, **extra):
    """Run guided, capture the first double and single block's attention, and compare every row that the
    spec defines with `spec_attention` (roles from `roles_of(sample, length)`)."""
    model = pipe.transformer
    double, single = [], []
    hooks = [capture(model.transformer_blocks[0].attn, double), capture(model.single_transformer_blocks[0].attn, single)]
    try:
        guided(pipe, name, settings=settings, prompt=prompt, **extra)
    finally:
        for h in hooks:
            h.remove()
    steps = call_args_kc(family_of(name))["num_inference_steps"]
    assert len(double) == len(single) == steps

    def expected(q, k, v, cos, sin, b):
        length = q.shape[0]
        image, positive, reference, negative = roles_of(b, length)
        q, k = flux_rope(q, cos, sin), flux_rope(k, cos, sin)
        z = spec_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), image, positive, reference,
                           negative, settings.alpha, settings.beta)
        defined = sorted(image + positive + reference + negative)
        return z.transpose(0, 1).flatten(1).float(), defined

    for _, kwargs, (image_out, text_out) in double:
        attn = model.transformer_blocks[0].attn
        cos, sin = kwargs["image_rotary_emb"]
        for b in range(kwargs["hidden_states"].shape[0]):
            h, c = kwargs["hidden_states"][b], kwargs["encoder_hidden_states"][b]
            z, defined = expected(*qkv_double(attn, h, c), cos, sin, b)
            text_len = c.shape[0]
            rows_t = [i for i in defined if i < text_len]
            rows_i = [i - text_len for i in defined if i >= text_len]
            torch.testing.assert_close(image_out[b, rows_i], attn.to_out[0](z[text_len:])[rows_i], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(text_out[b, rows_t], attn.to_add_out(z[:text_len])[rows_t], rtol=1e-4, atol=1e-4)
    for _, kwargs, out in single:
        attn = model.single_transformer_blocks[0].attn
        cos, sin = kwargs["image_rotary_emb"]
        for b in range(kwargs["hidden_states"].shape[0]):
            z, defined = expected(*qkv_single(attn, kwargs["hidden_states"][b]), cos, sin, b)
            torch.testing.assert_close(out[b, defined], z[defined], rtol=1e-4, atol=1e-4)
    return double, single


def kontext_negative_len(pipe, negative=NEGATIVE):
    return len(pipe.tokenizer_2(negative).input_ids)


def test_kontext_attention_is_the_spec_with_reference_rows_and_columns(pipes):
    """[N0, P, I, R]: R rows attend I, P, R and never N; N0 rows attend I, R, N0; I rows see N1. Fails if
    the reference tokens were taken for image tokens (R rows would see N1)."""
    pipe = pipes("kontext")
    n, positive_len, image_len = kontext_negative_len(pipe), call_args_kc("kontext")["max_sequence_length"], 16

    def roles(b, length):
        assert length == n + positive_len + 2 * image_len
        text = n + positive_len
        return (list(range(text, text + image_len)), list(range(n, text)),
                list(range(text + image_len, length)), list(range(n)))

    check_blocks(pipe, "kontext", from_preset("VSF Strong"), roles)


def chroma_roles(pipe, prompts, negatives, positive_len):
    # tokens, EOS and one kept pad token; a prompt cut at max_sequence_length keeps all its positions
    real_pos = [min(len(pipe.tokenizer(p).input_ids) + 1, positive_len) for p in prompts]
    real_neg = [len(pipe.tokenizer(x).input_ids) for x in negatives]
    n = max(real_neg)

    def roles(b, length):
        assert length == n + positive_len + 16
        text = n + positive_len
        assert n + real_pos[b] <= text, "real positive tokens past the positive span"
        return list(range(text, length)), list(range(n, n + real_pos[b])), [], list(range(real_neg[b]))

    return roles


@pytest.mark.parametrize("name", ["chroma", "chroma-bool"])
def test_chroma_attention_is_the_spec_with_the_masked_positive_padding(pipes, name):
    """Chroma's masked positive padding is a key for nobody (a masked pad position of P is in no row's key
    set); batch of two prompts and two negatives of different lengths."""
    pipe = pipes(name)
    prompts, negatives = [PROMPT, LONG], ["blurry", NEGATIVE]
    roles = chroma_roles(pipe, prompts, negatives, call_args_kc("chroma")["max_sequence_length"])
    check_blocks(pipe, name, from_preset("VSF Strong"), roles, prompt=prompts, negative=negatives)


# -- checked directly on the model -------------------------------------------------------------------------
def test_kontext_on_the_model_reference_rows_never_see_the_negative_and_n0_rows_see_the_reference(pipes):
    pipe = pipes("kontext")
    model = pipe.transformer
    records = []
    hook = capture(model.transformer_blocks[0].attn, records)
    try:
        with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Strong")) as vsf:
            vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **call_args_kc("kontext"))
            _, kwargs, (image_out, text_out) = records[0]
            n, image_len = kontext_negative_len(pipe), 16
            attn = model.transformer_blocks[0].attn
            vsf.run.set_step(0, 1)
            context, hidden = kwargs["encoder_hidden_states"], kwargs["hidden_states"]
            with torch.no_grad():
                other_negative = context.clone()
                other_negative[:, :n] = torch.randn_like(context[:, :n])
                img_n, txt_n = attn(**{**kwargs, "encoder_hidden_states": other_negative})
                other_reference = hidden.clone()
                other_reference[:, image_len:] = torch.randn_like(hidden[:, image_len:])
                img_r, txt_r = attn(**{**kwargs, "hidden_states": other_reference})
    finally:
        hook.remove()
    assert torch.equal(img_n[:, image_len:], image_out[:, image_len:]), "R rows saw the negative (N0 / N1)"
    assert torch.equal(txt_n[:, n:], text_out[:, n:]), "P rows saw the negative"
    assert not torch.equal(img_n[:, :image_len], image_out[:, :image_len]), "image rows do not see N1"
    assert not torch.equal(txt_r[:, :n], text_out[:, :n]), "N0 rows do not see R"


def test_chroma_on_the_model_masked_positive_padding_is_no_key_and_the_negative_is_one(pipes):
    pipe = pipes("chroma")
    model = pipe.transformer
    records = []
    hook = capture(model.transformer_blocks[0].attn, records)
    n = len(pipe.tokenizer(NEGATIVE).input_ids)
    kept = len(pipe.tokenizer(PROMPT).input_ids) + 1
    try:
        with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Strong")) as vsf:
            vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **call_args_kc("chroma"))
            _, kwargs, (image_out, text_out) = records[0]
            attn = model.transformer_blocks[0].attn
            vsf.run.set_step(0, 1)
            context = kwargs["encoder_hidden_states"]
            with torch.no_grad():
                pad = context.clone()
                pad[:, n + kept:] = torch.randn_like(pad[:, n + kept:])  # masked positive padding
                img_pad, txt_pad = attn(**{**kwargs, "encoder_hidden_states": pad})
                kept_pad = context.clone()
                kept_pad[:, n + kept - 1] = torch.randn_like(kept_pad[:, n + kept - 1])  # the one kept pad token
                img_kept, _ = attn(**{**kwargs, "encoder_hidden_states": kept_pad})
                last_negative = context.clone()
                last_negative[:, n - 1] = torch.randn_like(last_negative[:, n - 1])  # the negative's EOS
                img_neg, _ = attn(**{**kwargs, "encoder_hidden_states": last_negative})
    finally:
        hook.remove()
    assert torch.equal(img_pad, image_out), "masked positive padding is a key of the image rows"
    assert torch.equal(txt_pad[:, :n + kept], text_out[:, :n + kept]), "masked positive padding is a key of the text"
    assert not torch.equal(img_kept, image_out), "the kept pad token is masked"
    assert not torch.equal(img_neg, image_out), "the negative's last token is masked"


# -- CLI ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kontext", "chroma"])
def test_cli_generates_a_compare_grid(pipes, name, tmp_path, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext
    from PIL import Image

    from lib_vsf.cli import main
    from lib_vsf.output import read_png_infotext

    pipes(name).save_pretrained(tmp_path / name)
    out = tmp_path / "grid.png"
    extra = []
    if name == "kontext":
        # Kontext resizes its input to the nearest of its trained resolutions (>= 672 px): a small one here
        monkeypatch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(32, 32)])
        reference_image(32).save(tmp_path / "in.png")
        extra = ["--image", str(tmp_path / "in.png")]
    code = main(["generate", "--model", str(tmp_path / name), "--prompt", PROMPT, "--negative", "blurry", "--steps", "2",
                 "--width", "32", "--height", "32", "--max-sequence-length", "16", "--compare", "--out", str(out),
                 *extra])
    assert code == 0
    with Image.open(out) as grid:
        column = grid.width // 4
        assert column >= 32 and grid.width == 4 * column
        top, left = grid.height - 32, (column - 32) // 2
        panels = [torch.tensor(list(grid.crop((column * i + left, top, column * i + left + 32, top + 32)).getdata()))
                  for i in range(4)]
    assert not torch.equal(panels[0], panels[1]), "the VSF panel equals the unguided one"
    assert "Compare: unguided | VSF" in read_png_infotext(out)
