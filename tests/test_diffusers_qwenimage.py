"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-Plus under VSFGuidance, on tiny real diffusers pipelines
(random weights, no downloads).

End to end: guidance changes the image (VSF, NAG, NASA); an empty negative and alpha = 0 with beta = +inf
give the unguided image bit for bit; a batch with two negatives equals each alone; the pipeline is
restored bit for bit after success and after an exception; a CFG scale given still runs one pass; the CLI
writes a compare grid (with `--image` for the Edit pipelines). Oracles, against the pipeline's own CFG
pass: the negative tokens are the negative pass's text tokens, and one double-stream block's joint
attention equals VSF-SPEC eq. 7/8 and the mask table written out here in plain torch, with N0 at the
negative pass's MSRoPE positions, the positive's padding masked and the Edit pipelines' reference latents
as R tokens. Directly on the model's attention: R rows never see N, N0 sees R but not P, and the
positive's padded positions are keys for nobody.
"""
import math

import pytest
import torch

from lib_vsf import from_preset
from lib_vsf.attention import Guidance
from lib_vsf.diffusers import GuidanceInputError, VSFGuidance
from tiny_pipelines_qwen import BUILDERS_QWEN, CALL_ARGS_QWEN, input_images

PROMPT = "a photo of cat"
NEGATIVE = "blurry text watermark"
LONG = "a photo of cat with a red dog and a blue car in the text of a watermark"
FAMILIES = ["qwen-image", "qwen-image-edit", "qwen-image-edit-plus"]
EDIT = FAMILIES[1:]


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BUILDERS_QWEN[name]()
            cache[name].set_progress_bar_config(disable=True)
        return cache[name]

    return get


def call_args(name, **extra):
    args = dict(CALL_ARGS_QWEN[name])
    if name == "qwen-image-edit":
        args["image"] = input_images(1)[0]
    elif name == "qwen-image-edit-plus":
        args["image"] = input_images(2)
    return {**args, **extra}


def generators(seed, count):
    return torch.Generator().manual_seed(seed) if count == 1 else [torch.Generator().manual_seed(seed + i)
                                                                   for i in range(count)]


def plain(pipe, name, prompt=PROMPT, seed=0, **extra):
    return pipe(prompt=prompt, true_cfg_scale=1.0, generator=generators(seed, 1), output_type="pt",
                **call_args(name, **extra)).images


def guided(pipe, name, negative=NEGATIVE, settings=None, prompt=PROMPT, seed=0, guidance=None, images=1, **extra):
    count = images * (1 if isinstance(prompt, str) else len(prompt))
    with VSFGuidance(pipe, negative, settings or from_preset("VSF Strong")) as vsf:
        if guidance is not None:
            vsf.run.guidance = lambda: guidance
        out = vsf(prompt=prompt, generator=generators(seed, count), output_type="pt",
                  **call_args(name, **extra)).images
        return out, vsf.run.calls


def processor_state(pipe):
    return dict(pipe.transformer.attn_processors)


def hooks_left(model):
    return [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


def assert_restored(pipe, name, before, unguided):
    after = processor_state(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not hooks_left(pipe.transformer), "hooks left behind"
    assert torch.equal(plain(pipe, name), unguided), "pipeline output changed after guidance"


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_guidance_changes_the_image_and_restores_exactly(pipes, name):
    pipe = pipes(name)
    before = processor_state(pipe)
    unguided = plain(pipe, name)
    for preset in ("VSF Strong", "NAG", "NASA"):
        out, calls = guided(pipe, name, settings=from_preset(preset))
        assert calls == len(pipe.transformer.transformer_blocks) * CALL_ARGS_QWEN[name]["num_inference_steps"]
        assert torch.isfinite(out).all()
        assert not torch.equal(out, unguided), f"{preset} changed nothing"
    assert_restored(pipe, name, before, unguided)


@pytest.mark.parametrize("name", FAMILIES)
def test_empty_negative_and_zero_alpha_infinite_beta_are_the_unguided_image_bit_for_bit(pipes, name):
    pipe = pipes(name)
    unguided = plain(pipe, name)
    out, calls = guided(pipe, name, negative="  ")
    assert calls == 0 and torch.equal(out, unguided)
    out, calls = guided(pipe, name, guidance=Guidance("vsf", 0.0, math.inf))
    assert calls > 0
    assert torch.equal(out, unguided)


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_with_two_negatives_equals_each_alone(pipes, name):
    """Negatives of different lengths (padded N with a mask). Qwen-Image: two prompts of different lengths
    (the pipeline pads the shorter and masks it); the Edit pipelines take one prompt (Edit Plus refuses
    more), so two images of that prompt, one negative each."""
    pipe = pipes(name)
    negatives = ["blurry", "text watermark, low quality, ugly, bad hands"]
    if name == "qwen-image":
        prompts = [PROMPT, LONG]
        both, _ = guided(pipe, name, negative=negatives, prompt=prompts, seed=3)
        alone = [guided(pipe, name, negative=n, prompt=p, seed=3 + i)[0] for i, (p, n) in enumerate(zip(prompts, negatives))]
    else:
        both, _ = guided(pipe, name, negative=negatives, seed=3, images=2, num_images_per_prompt=2)
        alone = [guided(pipe, name, negative=n, seed=3 + i)[0] for i, n in enumerate(negatives)]
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], alone[i], rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("name", FAMILIES)
def test_cfg_scale_is_dropped_to_one_pass(pipes, name):
    """true_cfg_scale > 1 with a negative would run a second (negative) pass per step: with VSF it is one
    conditional pass per step, warned; the distilled guidance_scale is left alone."""
    pipe = pipes(name)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape[0], k["guidance"])), with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="VSF replaces CFG"):
            guided(pipe, name, true_cfg_scale=4.0, negative_prompt="ugly")
    finally:
        hook.remove()
    assert seen == [(1, None)] * CALL_ARGS_QWEN[name]["num_inference_steps"]


def test_edit_pipelines_refuse_direct_calls_clearly(pipes):
    """The Edit negative needs the call's image: direct denoiser calls are refused, nothing is left."""
    pipe = pipes("qwen-image-edit")
    before = processor_state(pipe)
    model = pipe.transformer
    with VSFGuidance(pipe, NEGATIVE) as vsf, vsf.direct_calls(0, 1):
        with pytest.raises(GuidanceInputError, match="image"):
            model(hidden_states=torch.randn(1, 4, 16), encoder_hidden_states=torch.randn(1, 3, 32),
                  timestep=torch.ones(1), img_shapes=[[(1, 2, 2)]])
    assert processor_state(pipe) == before and not hooks_left(model)


# -- the pipeline's own CFG pass as the reference -----------------------------------------------------------
def record(module, store):
    """Forward hook recording (args, kwargs, output) of every call of `module`."""
    return module.register_forward_hook(lambda m, a, k, out: store.append((a, k, out)), with_kwargs=True)


def cfg_pass(pipe, name, prompt, negative):
    """One step of the pipeline's own CFG: (transformer kwargs, block-0 attention kwargs) of the
    conditional and of the negative pass."""
    model, calls, attn = pipe.transformer, [], []
    hooks = [model.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True),
             record(model.transformer_blocks[0].attn, attn)]
    try:
        pipe(prompt=prompt, negative_prompt=negative, true_cfg_scale=2.0, generator=generators(0, 1),
             output_type="latent", **call_args(name, num_inference_steps=1))
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == len(attn) == 2
    return (calls[0], attn[0][1]), (calls[1], attn[1][1])


def guided_step(pipe, name, prompt, negative, settings, probe=None):
    """One guided step: (transformer kwargs, block-0 attention (args, kwargs, output)). `probe(attn, kwargs)`
    runs inside the block-0 attention call, while the step is guided."""
    model, calls, attn = pipe.transformer, [], []
    with VSFGuidance(pipe, negative, settings) as vsf:
        def on_attention(m, a, k, out):
            attn.append((a, k, out))
            if probe is not None:
                probe(m, k)

        hooks = [model.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True),
                 model.transformer_blocks[0].attn.register_forward_hook(on_attention, with_kwargs=True)]
        try:
            vsf(prompt=prompt, generator=generators(0, 1 if isinstance(prompt, str) else len(prompt)),
                output_type="latent", **call_args(name, num_inference_steps=1))
        finally:
            for h in hooks:
                h.remove()
    assert len(calls) == len(attn) == 1
    return calls[0], attn[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_negative_tokens_are_the_negative_pass_text(pipes, name):
    """N0 = the text tokens of the pipeline's own negative pass (Edit: encoded with the input image, as
    that pass encodes it), unpadded, before P; P and the image stream are the conditional pass's."""
    pipe = pipes(name)
    (cond, _), (uncond, _) = cfg_pass(pipe, name, PROMPT, NEGATIVE)
    kwargs, _ = guided_step(pipe, name, PROMPT, NEGATIVE, from_preset("VSF Strong"))
    negative = uncond["encoder_hidden_states"]
    n = negative.shape[1]
    assert uncond["encoder_hidden_states_mask"] is None  # one negative: no padding to strip
    text = kwargs["encoder_hidden_states"]
    assert text.shape[1] == n + cond["encoder_hidden_states"].shape[1]
    torch.testing.assert_close(text[:, :n], negative, rtol=1e-5, atol=1e-5)
    assert torch.equal(text[:, n:], cond["encoder_hidden_states"])
    assert torch.equal(kwargs["hidden_states"], cond["hidden_states"])
    assert kwargs["img_shapes"] == cond["img_shapes"]
    if name in EDIT:  # the image is part of the negative's encoding: without it the tokens differ
        text_only = pipe.tokenizer(pipe.prompt_template_encode.format(NEGATIVE)).input_ids
        assert n > len(text_only) - pipe.prompt_template_encode_start_idx


def spec_attention(q, k, v, image, positive, reference, negative, alpha, beta):
    """VSF-SPEC joint attention for one sample, float64. q/k/v `[H, L, D]`; index lists of the roles (padded
    positive positions left out of `positive`: keys for nobody). Mask table: I rows: W = A+ / (A+ + A-),
    Z = W Z+ - alpha (1 - W) Z- over {I, P, R} and N1 (eq. 7/8); P and R rows over {I, P, R}; N0 rows over
    {I, R, N0}."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    ipr, irn = image + positive + reference, image + reference + negative
    out = torch.zeros_like(q)
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


def qwen_rope(x, freqs):
    """Qwen-Image's RoPE on `[L, H, D]`: channel pairs as complex numbers times `freqs` `[L, D/2]`."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.to(torch.complex128)[:, None]).flatten(-2)


def projections(attn, hidden, text, img_freqs, txt_freqs):
    """q, k, v `[H, L, D]` of one sample's joint sequence `[text, image stream]`, RoPE applied."""
    def heads(t):
        return t.unflatten(-1, (attn.heads, -1))

    q = torch.cat([qwen_rope(attn.norm_added_q(heads(attn.add_q_proj(text))), txt_freqs),
                   qwen_rope(attn.norm_q(heads(attn.to_q(hidden))), img_freqs)])
    k = torch.cat([qwen_rope(attn.norm_added_k(heads(attn.add_k_proj(text))), txt_freqs),
                   qwen_rope(attn.norm_k(heads(attn.to_k(hidden))), img_freqs)])
    v = torch.cat([heads(attn.add_v_proj(text)), heads(attn.to_v(hidden))]).double()
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


@pytest.mark.parametrize("name", FAMILIES)
def test_block_attention_is_the_spec_at_the_negative_pass_positions(pipes, name):
    """One double-stream block, every sample: the guided joint attention equals the spec, with N0's MSRoPE
    rotations those of the pipeline's own negative pass and P's those of its conditional pass. Qwen-Image
    runs two prompts of different lengths: the shorter one's padding is masked as the pipeline masks it.
    Edit: the reference latents (after the image tokens, `img_shapes[1:]`) are R tokens."""
    pipe = pipes(name)
    settings = from_preset("VSF Strong")
    prompt = [PROMPT, LONG] if name == "qwen-image" else PROMPT
    negative = [NEGATIVE] * len(prompt) if name == "qwen-image" else NEGATIVE
    (cond, cond_attn), (_, uncond_attn) = cfg_pass(pipe, name, prompt, negative)
    _, (args, kwargs, (image_out, text_out)) = guided_step(pipe, name, prompt, NEGATIVE, settings)
    attn = pipe.transformer.transformer_blocks[0].attn
    img_freqs, positive_freqs = cond_attn["image_rotary_emb"]
    negative_freqs = uncond_attn["image_rotary_emb"][1]
    n, lp = negative_freqs.shape[0], positive_freqs.shape[0]
    shapes = cond["img_shapes"][0]
    image_len = math.prod(shapes[0])
    stream_len = kwargs["hidden_states"].shape[1]
    assert stream_len == sum(math.prod(s) for s in shapes) and (name == "qwen-image") == (stream_len == image_len)
    mask = cond["encoder_hidden_states_mask"]
    if name == "qwen-image":
        assert mask is not None and not bool(mask[0].all())  # the short prompt is padded
    text_freqs = torch.cat([negative_freqs, positive_freqs])
    for b in range(kwargs["hidden_states"].shape[0]):
        real = [j for j in range(lp) if mask is None or bool(mask[b, j])]
        q, k, v = projections(attn, kwargs["hidden_states"][b], kwargs["encoder_hidden_states"][b], img_freqs, text_freqs)
        start = n + lp
        z = spec_attention(q, k, v, list(range(start, start + image_len)), [n + j for j in real],
                           list(range(start + image_len, start + stream_len)), list(range(n)),
                           settings.alpha, settings.beta)
        z = z.transpose(0, 1).flatten(1).float()
        torch.testing.assert_close(image_out[b], attn.to_out[0](z[start:]), rtol=1e-4, atol=1e-4)
        rows = list(range(n)) + [n + j for j in real]  # padded P rows are the model's don't-care
        torch.testing.assert_close(text_out[b, rows], attn.to_add_out(z[rows]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_who_sees_whom_on_the_models_attention(pipes, name):
    """Directly on block 0's attention with guidance active: changing N leaves R rows (and P rows) as they
    are and moves the image rows; changing R moves N0 rows; changing P leaves N0 rows as they are; changing a
    padded positive position (Qwen-Image, the short prompt) changes nothing at all."""
    pipe = pipes(name)
    prompt = [PROMPT, LONG] if name == "qwen-image" else PROMPT
    found = {}

    def probe(attn, kwargs):
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        n = attn.processor.run.negative_len
        image_len = attn.processor.adapter.image_tokens

        def run(hidden_states=hidden, encoder_hidden_states=text):
            return attn.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  encoder_hidden_states_mask=kwargs["encoder_hidden_states_mask"],
                                  image_rotary_emb=kwargs["image_rotary_emb"])

        def changed(t, span):
            t = t.clone()
            t[:, span] += torch.randn(t[:, span].shape, generator=torch.Generator().manual_seed(5))
            return t

        found["n"], found["image_len"], found["mask"] = n, image_len, kwargs["encoder_hidden_states_mask"]
        found["base"] = run()
        found["neg"] = run(encoder_hidden_states=changed(text, slice(0, n)))
        found["pos"] = run(encoder_hidden_states=changed(text, slice(n, text.shape[1])))
        if hidden.shape[1] > image_len:
            found["ref"] = run(hidden_states=changed(hidden, slice(image_len, hidden.shape[1])))
        mask = kwargs["encoder_hidden_states_mask"]
        if mask is not None:
            pads = [j for j in range(text.shape[1]) if not bool(mask[0, j])]
            found["pad"] = run(encoder_hidden_states=changed(text, pads))

    guided_step(pipe, name, prompt, NEGATIVE, from_preset("VSF Strong"), probe=probe)
    n, image_len = found["n"], found["image_len"]
    (img0, txt0), (img_n, txt_n), (img_p, txt_p) = found["base"], found["neg"], found["pos"]
    assert not torch.allclose(img_n[:, :image_len], img0[:, :image_len]), "image rows do not see N1"
    torch.testing.assert_close(img_n[:, image_len:], img0[:, image_len:], rtol=0, atol=1e-6)  # R never sees N
    torch.testing.assert_close(txt_n[:, n:], txt0[:, n:], rtol=0, atol=1e-6)  # P never sees N
    torch.testing.assert_close(txt_p[:, :n], txt0[:, :n], rtol=0, atol=1e-6)  # N0 never sees P
    if name in EDIT:
        img_r, txt_r = found["ref"]
        assert not torch.allclose(txt_r[:, :n], txt0[:, :n]), "N0 does not see R"
        assert not torch.allclose(txt_r[:, n:], txt0[:, n:]), "P does not see R"
    else:
        img_pad, txt_pad = found["pad"]
        real = found["mask"][0].bool()
        torch.testing.assert_close(img_pad[0], img0[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(txt_pad[0, real], txt0[0, real], rtol=0, atol=1e-6)


# -- CLI ------------------------------------------------------------------------------------------------
def _grid_panels(path, size, count=4):
    from PIL import Image

    with Image.open(path) as grid:
        column = grid.width // count
        assert column >= size and grid.width == count * column
        top, left = grid.height - size, (column - size) // 2
        return [torch.tensor(list(grid.crop((column * i + left, top, column * i + left + size, top + size)).getdata()))
                for i in range(count)]


def test_cli_generates_a_compare_grid(pipes, tmp_path):
    from lib_vsf.cli import main
    from lib_vsf.output import read_png_infotext

    pipes("qwen-image").save_pretrained(tmp_path / "qwen")
    out = tmp_path / "grid.png"
    code = main(["generate", "--model", str(tmp_path / "qwen"), "--prompt", PROMPT, "--negative", "blurry",
                 "--steps", "2", "--width", "64", "--height", "64", "--max-sequence-length", "64", "--compare",
                 "--out", str(out)])
    assert code == 0
    panels = _grid_panels(out, 64)
    assert not torch.equal(panels[0], panels[1]), "the VSF panel equals the unguided one"
    assert "Compare: unguided | VSF a=3.3 b=0.2 | NAG" in read_png_infotext(out)


@pytest.mark.parametrize("name", EDIT)
def test_cli_image_flag_feeds_the_edit_pipelines(pipes, name, tmp_path, monkeypatch):
    """`--image` (repeated for Edit Plus) reaches the pipeline: the grid's unguided panel is the pipeline's
    own image for that input. The pipelines are handed over in memory (their processor's saved form needs
    torchvision to load)."""
    import numpy as np

    from lib_vsf import cli

    pipe = pipes(name)
    monkeypatch.setattr(cli, "_load", lambda args: (pipe, "cpu"))
    paths = []
    for i, image in enumerate(input_images(2 if name == "qwen-image-edit-plus" else 1)):
        paths += ["--image", str(tmp_path / f"in{i}.png")]
        image.save(paths[-1])
    out = tmp_path / "grid.png"
    code = cli.main(["generate", "--model", name, "--prompt", PROMPT, "--negative", "blurry", "--steps", "2",
                     "--width", "128", "--height", "128", *paths, "--compare", "--out", str(out)])
    assert code == 0
    panels = _grid_panels(out, 128)
    assert not torch.equal(panels[0], panels[1]), "the VSF panel equals the unguided one"
    want = pipe(prompt=PROMPT, true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0),
                **call_args(name, num_inference_steps=2)).images[0]
    assert torch.equal(panels[0], torch.tensor(np.asarray(want).reshape(-1, 3)))


def test_cli_image_flag_is_refused_for_a_pipeline_without_image(pipes, tmp_path, monkeypatch, capsys):
    from lib_vsf import cli

    monkeypatch.setattr(cli, "_load", lambda args: (pipes("qwen-image"), "cpu"))
    input_images(1)[0].save(tmp_path / "in.png")
    code = cli.main(["generate", "--model", "qwen", "--prompt", PROMPT, "--negative", "blurry", "--image",
                     str(tmp_path / "in.png"), "--out", str(tmp_path / "x.png")])
    assert code == 2 and "takes no input image" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
