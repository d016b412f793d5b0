"""Z-Image and Flux.2 Klein under VSFGuidance, on tiny real diffusers pipelines (random weights, no downloads).

End to end: guidance changes the image and NAG / NASA run on the same hooks; an empty negative and
alpha = 0 with beta = +inf give the unguided image bit for bit; a batch with two negatives equals each
alone; the pipeline is restored bit for bit after success and after an exception. Oracles: each
family's guided attention equals VSF-SPEC eq. 7/8 and the mask table written out here in plain torch,
the negative tokens' RoPE positions follow the spec's relative rule, and Z-Image's context refiner
refines the negative as its own prompt.
"""
import math

import pytest
import torch

from lib_vsf import from_preset
from lib_vsf.attention import Guidance
from lib_vsf.diffusers import GuidanceInputError, VSFGuidance
from tiny_pipelines_2026 import BUILDERS_2026, CALL_ARGS_2026

PROMPT = "a photo of cat"
NEGATIVE = "blurry text watermark"
LONG = "a photo of cat with a red dog and a blue car in the text of a watermark"
FAMILIES = ["zimage", "flux2-klein", "flux2-dev"]
# The pipelines' own single unguided pass: Z-Image runs CFG whenever guidance_scale > 0, Klein when > 1;
# Flux.2 dev has no CFG (its guidance_scale is the distilled guidance embedding: its default, 4, here).
UNGUIDED_SCALE = {"zimage": 0.0, "flux2-klein": 1.0, "flux2-dev": 4.0}


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BUILDERS_2026[name]()
            cache[name].set_progress_bar_config(disable=True)
        return cache[name]

    return get


def plain(pipe, name, prompt=PROMPT, seed=0, **extra):
    return pipe(prompt=prompt, guidance_scale=UNGUIDED_SCALE[name], generator=torch.Generator().manual_seed(seed),
                output_type="pt", **{**CALL_ARGS_2026[name], **extra}).images


def guided(pipe, name, negative=NEGATIVE, settings=None, prompt=PROMPT, seed=0, guidance=None, **extra):
    with VSFGuidance(pipe, negative, settings or from_preset("VSF Strong")) as vsf:
        if guidance is not None:
            vsf.run.guidance = lambda: guidance
        # a copy: ZImagePipeline.encode_prompt writes the chat-templated text into the list it is given
        out = vsf(prompt=prompt if isinstance(prompt, str) else list(prompt),
                  generator=torch.Generator().manual_seed(seed) if isinstance(prompt, str)
                  else [torch.Generator().manual_seed(seed + i) for i in range(len(prompt))],
                  output_type="pt", **{**CALL_ARGS_2026[name], **extra}).images
        return out, vsf.run.calls


def attention_modules(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}


def processor_state(pipe):
    return {name: m.processor for name, m in attention_modules(pipe.transformer).items()}


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
        assert calls > 0 and torch.isfinite(out).all()
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
    """Different negative lengths (padded N with a mask) and, for Z-Image, captions of different padded
    lengths (the model's own batch padding: each sample runs over its own length)."""
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


@pytest.mark.parametrize("name", ["zimage", "flux2-klein"])
def test_cfg_scale_is_dropped_to_one_pass(pipes, name):
    """A CFG guidance_scale given to the guided call runs one conditional pass per step, warned."""
    pipe = pipes(name)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: batches.append(len(a[0]) if a else k["hidden_states"].shape[0]), with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="VSF replaces CFG"):
            guided(pipe, name, guidance_scale=5.0)
    finally:
        hook.remove()
    assert batches == [1] * CALL_ARGS_2026[name]["num_inference_steps"]


def test_flux2_dev_distilled_guidance_stays_the_users(pipes):
    """Flux.2 dev's guidance_scale is the guidance embedding, not CFG: VSF passes it through untouched."""
    pipe = pipes("flux2-dev")
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["guidance"].clone()),
                                                      with_kwargs=True)
    try:
        guided(pipe, "flux2-dev", guidance_scale=2.5)
    finally:
        hook.remove()
    assert len(seen) == CALL_ARGS_2026["flux2-dev"]["num_inference_steps"]
    assert all(torch.equal(g, torch.full((1,), 2.5)) for g in seen)


def test_flux2_dev_negative_is_the_unpadded_mistral_encoding(pipes):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    pipe = pipes("flux2-dev")
    messages = format_input(prompts=[NEGATIVE], system_message=pipe.system_message)
    ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                             return_tensors="pt")["input_ids"]
    assert pipe.tokenizer.pad_token_id not in ids[0].tolist()
    with torch.no_grad():
        states = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
    want = torch.cat([states[i][0] for i in (10, 20, 30)], dim=-1)
    seen = []
    with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Strong")) as vsf:
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
        try:
            vsf(prompt=PROMPT, output_type="pt", **CALL_ARGS_2026["flux2-dev"])
        finally:
            hook.remove()
    n = want.shape[0]
    assert seen[0]["encoder_hidden_states"].shape[1] == n + CALL_ARGS_2026["flux2-dev"]["max_sequence_length"]
    torch.testing.assert_close(seen[0]["encoder_hidden_states"][0, :n], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(seen[0]["txt_ids"][0, :n, 3].cpu(), torch.arange(n).to(seen[0]["txt_ids"].dtype))


def test_flux2_reference_images_are_refused_clearly_and_nothing_is_left(pipes):
    from PIL import Image

    pipe = pipes("flux2-klein")
    before = processor_state(pipe)
    unguided = plain(pipe, "flux2-klein")
    with pytest.raises(GuidanceInputError, match="reference images"):
        guided(pipe, "flux2-klein", image=Image.new("RGB", (32, 32)))
    assert_restored(pipe, "flux2-klein", before, unguided)


# -- the spec written out: eq. 7/8 per image query and the mask table ---------------------------------------
def spec_attention(q, k, v, image, positive, negative, alpha, beta):
    """VSF-SPEC joint attention for one sample, float64. q/k/v `[H, L, D]`; index lists of the roles.
    I rows: W = A+ / (A+ + A-), Z = W Z+ - alpha (1 - W) Z- (eq. 7/8); P rows over {I, P}; N0 rows over {I, N0}."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    ip, i_n = image + positive, image + negative
    out = torch.zeros_like(q)
    si = s[:, image]
    log_a_plus = torch.logsumexp(si[:, :, ip], -1)
    log_a_minus = torch.logsumexp(si[:, :, negative] - beta, -1)
    w = torch.sigmoid(log_a_plus - log_a_minus)[..., None]  # A+ / (A+ + A-)
    z_plus = torch.softmax(si[:, :, ip], -1) @ v[:, ip]
    z_minus = torch.softmax(si[:, :, negative], -1) @ v[:, negative]
    out[:, image] = w * z_plus - alpha * (1 - w) * z_minus
    out[:, positive] = torch.softmax(s[:, positive][:, :, ip], -1) @ v[:, ip]
    out[:, negative] = torch.softmax(s[:, negative][:, :, i_n], -1) @ v[:, i_n]
    return out


def padded32(n):
    return n + (-n) % 32


def capture(module, store):
    """Forward hook recording (args, kwargs, output) of every call of `module`."""
    return module.register_forward_hook(lambda m, a, k, out: store.append((a, k, out)), with_kwargs=True)


def zimage_rope(x, rotations):
    """Z-Image's RoPE on `[L, H, D]`: channel pairs as complex numbers times the rotations `[L, D/2]`."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rotations.to(torch.complex128)[:, None]).flatten(-2)


def zimage_rotation(model, ids):
    """RoPE rotations of position ids `[L, 3]` from the model's theta and axes (any sign), complex128."""
    rope, parts = model.rope_embedder, []
    for axis, dim in enumerate(rope.axes_dims):
        freqs = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        parts.append(torch.polar(torch.ones(len(ids), dim // 2, dtype=torch.float64), ids[:, axis, None].double() * freqs))
    return torch.cat(parts, -1)


def zimage_lengths(pipe, prompt, negative, size=None):
    """(image tokens padded, caption padded, negative tokens) from the pipeline's own encodings."""
    caption = pipe.encode_prompt(prompt=[prompt], do_classifier_free_guidance=False)[0][0]
    neg = pipe.encode_prompt(prompt=[negative], do_classifier_free_guidance=False)[0][0]
    h = (size or CALL_ARGS_2026["zimage"]["height"]) // (pipe.vae_scale_factor * 2)
    w = (size or CALL_ARGS_2026["zimage"]["width"]) // (pipe.vae_scale_factor * 2)
    return padded32(h * w), padded32(len(caption)), len(neg), neg


@pytest.mark.parametrize("size", [32, 24], ids=["64-image-tokens", "36-image-tokens-28-pads"])
def test_zimage_attention_is_the_spec_in_every_unified_block(pipes, size):
    pipe = pipes("zimage")
    model = pipe.transformer
    settings = from_preset("VSF Strong")
    x_len, cap_len, n, _ = zimage_lengths(pipe, PROMPT, NEGATIVE, size)
    calls = {i: [] for i in range(len(model.layers))}
    hooks = [capture(layer.attention, calls[i]) for i, layer in enumerate(model.layers)]
    try:
        guided(pipe, "zimage", settings=settings, height=size, width=size)
    finally:
        for h in hooks:
            h.remove()
    image, positive = list(range(x_len)), list(range(x_len, x_len + cap_len))
    negative = list(range(x_len + cap_len, x_len + cap_len + n))
    for i, records in calls.items():
        assert len(records) == CALL_ARGS_2026["zimage"]["num_inference_steps"]
        for args, kwargs, out in records:
            attn, hidden, rot = model.layers[i].attention, args[0][0], kwargs["freqs_cis"][0]
            assert hidden.shape[0] == x_len + cap_len + n and kwargs["attention_mask"] is None
            q, k, v = (proj(hidden).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            q, k = zimage_rope(attn.norm_q(q), rot), zimage_rope(attn.norm_k(k), rot)
            z = spec_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1).double(),
                               image, positive, negative, settings.alpha, settings.beta)
            want = attn.to_out[0](z.transpose(0, 1).flatten(1).float())
            torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt,negative", [(LONG, "blurry"), (PROMPT, LONG + ", ugly, bad hands, low quality")],
                         ids=["caption-longer", "negative-longer"])
def test_zimage_negative_positions_keep_the_negative_pass_offset_to_the_image(pipes, prompt, negative):
    """N0 token j relative to the image's first token has the offset it has in a negative pass (the model's
    own patchify of the negative alone), whichever of caption and negative pads longer."""
    pipe = pipes("zimage")
    model = pipe.transformer
    x_len, cap_len, n, neg_embeds = zimage_lengths(pipe, prompt, negative)
    caption = pipe.encode_prompt(prompt=[prompt], do_classifier_free_guidance=False)[0][0]
    latent = torch.zeros(model.in_channels, 1, 16, 16)
    _, _, _, img_ids, cap_ids, _, _ = model.patchify_and_embed([latent], [neg_embeds], 2, 1)  # a negative pass
    offsets = cap_ids[0][:n, 0] - img_ids[0][0, 0]
    _, _, _, img_ids_pos, _, _, _ = model.patchify_and_embed([latent], [caption], 2, 1)  # the positive pass
    want_ids = torch.zeros(n, 3, dtype=torch.long)
    want_ids[:, 0] = img_ids_pos[0][0, 0] + offsets
    assert cap_len != padded32(n)  # the two paddings differ: a shift is needed
    records = []
    hook = capture(model.layers[0].attention, records)
    try:
        guided(pipe, "zimage", negative="", prompt=prompt)
        guided(pipe, "zimage", negative=negative, prompt=prompt)
    finally:
        hook.remove()
    steps = CALL_ARGS_2026["zimage"]["num_inference_steps"]
    unguided_rot, rot = records[0][1]["freqs_cis"][0], records[steps][1]["freqs_cis"][0]
    assert torch.equal(rot[:x_len + cap_len], unguided_rot), "image / caption positions changed"
    torch.testing.assert_close(rot[x_len + cap_len:].to(torch.complex128), zimage_rotation(model, want_ids),
                               rtol=0, atol=1e-6)


def test_zimage_context_refiner_refines_the_negative_as_its_own_prompt(pipes):
    """N0 entering the unified blocks = cap_embedder + context_refiner of the negative alone (at its
    negative-pass positions 1..n, no caption, no pad tokens); I and P rows are exactly the unguided ones."""
    pipe = pipes("zimage")
    model = pipe.transformer
    x_len, cap_len, n, neg_embeds = zimage_lengths(pipe, PROMPT, NEGATIVE)
    inputs = []
    for negative in ("", NEGATIVE):
        with VSFGuidance(pipe, negative, from_preset("VSF Strong")) as vsf:  # our block hooks run first
            hook = model.layers[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
            try:
                vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                    **CALL_ARGS_2026["zimage"])
            finally:
                hook.remove()
    steps = CALL_ARGS_2026["zimage"]["num_inference_steps"]
    unguided_x, guided_x = inputs[0][0], inputs[steps][0]
    assert guided_x.shape[0] == x_len + cap_len + n
    assert torch.equal(guided_x[:x_len + cap_len], unguided_x), "the negative reached I or P before the blocks"
    ids = torch.zeros(n, 3, dtype=torch.long)
    ids[:, 0] = 1 + torch.arange(n)
    with torch.no_grad():
        alone = model.cap_embedder(neg_embeds)[None]
        for layer in model.context_refiner:
            alone = layer(alone, None, model.rope_embedder(ids)[None])
    torch.testing.assert_close(guided_x[x_len + cap_len:], alone[0], rtol=1e-5, atol=1e-5)


# -- Flux.2 -------------------------------------------------------------------------------------------
def flux2_rope(x, cos, sin):
    """diffusers' real-valued RoPE (pairs interleaved) on `[L, H, D]` with `[L, D]` cos/sin."""
    x = x.double()
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(-2)
    return x * cos.double()[:, None] + rotated * sin.double()[:, None]


def flux2_negative_alone(pipe, negative):
    """The negative encoded without padding, computed here from the parts: chat template, Qwen3 on the
    real tokens only, hidden states 9 / 18 / 27 side by side."""
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": negative}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    ids = pipe.tokenizer(text, return_tensors="pt").input_ids
    assert pipe.tokenizer.pad_token_id not in ids[0].tolist()
    with torch.no_grad():
        states = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in (9, 18, 27)], dim=-1)


def test_flux2_negative_is_unpadded_and_sits_at_its_negative_pass_text_ids(pipes):
    pipe = pipes("flux2-klein")
    want = flux2_negative_alone(pipe, NEGATIVE)
    n = want.shape[0]
    seen = []
    with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Strong")) as vsf:
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
        try:
            vsf(prompt=PROMPT, output_type="pt", **CALL_ARGS_2026["flux2-klein"])
        finally:
            hook.remove()
    kwargs = seen[0]
    text, txt_ids = kwargs["encoder_hidden_states"], kwargs["txt_ids"]
    positive_len = CALL_ARGS_2026["flux2-klein"]["max_sequence_length"]
    assert text.shape[1] == n + positive_len  # [N0 (no padding), P (padded as the pipeline does)]
    torch.testing.assert_close(text[0, :n], want, rtol=1e-4, atol=1e-4)
    # A negative pass would give the negative's real tokens the ids (0, 0, 0, 0..n-1): the same here.
    negative_pass_ids = pipe._prepare_text_ids(torch.zeros(1, 512, 1))[0, :n]
    assert torch.equal(txt_ids[0, :n].cpu(), negative_pass_ids.to(txt_ids.dtype))
    assert torch.equal(txt_ids[0, n:], pipe._prepare_text_ids(torch.zeros(1, positive_len, 1))[0].to(txt_ids))


def test_flux2_attention_is_the_spec_in_double_and_single_blocks(pipes):
    pipe = pipes("flux2-klein")
    model = pipe.transformer
    settings = from_preset("VSF Strong")
    n = flux2_negative_alone(pipe, NEGATIVE).shape[0]
    positive_len = CALL_ARGS_2026["flux2-klein"]["max_sequence_length"]
    double, single = [], []
    hooks = [capture(model.transformer_blocks[0].attn, double), capture(model.single_transformer_blocks[0].attn, single)]
    try:
        guided(pipe, "flux2-klein", settings=settings)
    finally:
        for h in hooks:
            h.remove()
    steps = CALL_ARGS_2026["flux2-klein"]["num_inference_steps"]
    assert len(double) == len(single) == steps
    negative, positive = list(range(n)), list(range(n, n + positive_len))

    def heads(t, attn):
        return t.unflatten(-1, (-1, attn.head_dim))

    def expected(q, k, v, cos, sin, image):
        q, k = flux2_rope(q, cos, sin), flux2_rope(k, cos, sin)
        z = spec_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), image, positive, negative,
                           settings.alpha, settings.beta)
        return z.transpose(0, 1).flatten(1).float()

    for _, kwargs, (image_out, text_out) in double:
        attn = model.transformer_blocks[0].attn
        h, c = kwargs["hidden_states"][0], kwargs["encoder_hidden_states"][0]
        cos, sin = kwargs["image_rotary_emb"]
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(c), attn)), attn.norm_q(heads(attn.to_q(h), attn))])
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(c), attn)), attn.norm_k(heads(attn.to_k(h), attn))])
        v = torch.cat([heads(attn.add_v_proj(c), attn), heads(attn.to_v(h), attn)])
        image = list(range(c.shape[0], c.shape[0] + h.shape[0]))
        z = expected(q, k, v, cos, sin, image)
        torch.testing.assert_close(image_out[0], attn.to_out[0](z[c.shape[0]:]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(text_out[0], attn.to_add_out(z[:c.shape[0]]), rtol=1e-4, atol=1e-4)
    for _, kwargs, out in single:
        attn = model.single_transformer_blocks[0].attn
        h = kwargs["hidden_states"][0]
        cos, sin = kwargs["image_rotary_emb"]
        projected = attn.to_qkv_mlp_proj(h)
        qkv, mlp = projected[:, :3 * attn.inner_dim], projected[:, 3 * attn.inner_dim:]
        q, k, v = (heads(t, attn) for t in qkv.chunk(3, dim=-1))
        image = list(range(n + positive_len, h.shape[0]))
        z = expected(attn.norm_q(q), attn.norm_k(k), v, cos, sin, image)
        torch.testing.assert_close(out[0], attn.to_out(torch.cat([z, attn.mlp_act_fn(mlp)], -1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["zimage", "flux2-klein"])
def test_cli_generates_a_compare_grid(pipes, name, tmp_path):
    from PIL import Image

    from lib_vsf.cli import main
    from lib_vsf.output import read_png_infotext

    pipes(name).save_pretrained(tmp_path / name)
    out = tmp_path / "grid.png"
    code = main(["generate", "--model", str(tmp_path / name), "--prompt", PROMPT, "--negative", "blurry", "--steps", "2",
                 "--width", "32", "--height", "32", "--max-sequence-length", "64", "--compare", "--out", str(out)])
    assert code == 0
    with Image.open(out) as grid:
        column = grid.width // 4  # a column is at least one image wide (wider when a label needs it)
        assert column >= 32 and grid.width == 4 * column
        top, left = grid.height - 32, (column - 32) // 2  # caption strip above the centred images
        panels = [torch.tensor(list(grid.crop((column * i + left, top, column * i + left + 32, top + 32)).getdata()))
                  for i in range(4)]
    assert not torch.equal(panels[0], panels[1]), "the VSF panel equals the unguided one"
    assert "Compare: unguided | VSF a=3.3 b=0.2 | NAG" in read_png_infotext(out)
