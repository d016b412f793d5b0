"""SD1.5 / SDXL UNets under VSFGuidance: the pipeline's clip skip, LCM's guidance embedding (and Flux's
distilled guidance), and IP-Adapter's image-prompt tokens, on tiny real diffusers pipelines."""
import math

import pytest
import torch

from lib_vsf import from_preset
from lib_vsf.diffusers import VSFGuidance
from lib_vsf.settings import VSFSettings
from lib_vsf.state import GuidanceRun, NegativeText
from tiny_pipelines import flux_pipeline, lcm_pipeline, load_tiny_ip_adapter, sd15_pipeline, sdxl_pipeline

PROMPT = "a photo of cat"
NEGATIVE = "blurry text watermark"
ARGS = dict(height=16, width=16, num_inference_steps=2)


def images(result):
    return result.images


def seeded():
    return torch.Generator().manual_seed(0)


def processors(unet):
    return dict(unet.attn_processors)


def same_processors(before, after):
    return before.keys() == after.keys() and all(before[k] is after[k] for k in before)


class NegativeSeen:
    """Forward pre-hook after VSFGuidance's own: the text tokens the UNet gets after the 77 positive ones."""

    def __init__(self, unet):
        self.rows = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.rows.append(kwargs["encoder_hidden_states"][:, 77:])


# -- item: the negative follows the pipeline's clip skip ----------------------------------------------------
@pytest.mark.parametrize("builder", [sd15_pipeline, sdxl_pipeline], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_negative_uses_the_pipelines_clip_skip(builder, clip_skip):
    """The negative tokens equal the unpadded prefix of the pipeline's own `encode_prompt(negative,
    clip_skip=...)` (CLIP is causal: BOS + tokens + EOS are the first positions of the padded encoding)."""
    pipe = builder()
    if clip_skip and builder is sd15_pipeline and not hasattr(pipe.text_encoder, "text_model"):
        pytest.skip("diffusers' own SD1.5 clip skip reads CLIPTextModel.text_model (transformers < 5)")
    expected = pipe.encode_prompt(NEGATIVE, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                  clip_skip=clip_skip)[0][0]
    n = len(pipe.tokenizer(NEGATIVE).input_ids)  # BOS + tokens + EOS
    with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Strong")) as vsf:
        seen = NegativeSeen(pipe.unet)
        try:
            vsf(prompt=PROMPT, clip_skip=clip_skip, generator=seeded(), output_type="pt", **ARGS)
        finally:
            seen.handle.remove()
    assert seen.rows and all(r.shape[1] == n for r in seen.rows)
    for rows in seen.rows:
        torch.testing.assert_close(rows[0], expected[:n], rtol=1e-5, atol=1e-5)


def test_sd15_clip_skip_negative_is_the_skipped_layer_through_the_final_norm():
    """StableDiffusionPipeline.encode_prompt with clip_skip k: hidden_states[-(k + 1)] through the text
    model's final layer norm (written out here; the pipeline itself needs transformers < 5 for it)."""
    from lib_vsf.diffusers.unet import UNetFamily

    pipe = sd15_pipeline()
    got = UNetFamily().encode_negative(pipe, NEGATIVE, from_preset("VSF Strong"), clip_skip=1)
    ids = pipe.tokenizer(NEGATIVE, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
        want = norm(states)[0, : got.shape[0]]
    assert got.shape[0] == len(pipe.tokenizer(NEGATIVE).input_ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- item: guidance embeddings that are not CFG keep the caller's value --------------------------------------
@pytest.mark.parametrize("pipeline", ["LatentConsistencyModelPipeline", "StableDiffusionPipeline"])
def test_lcm_empty_negative_equals_the_plain_call_with_the_users_guidance_scale(pipeline):
    pipe = lcm_pipeline(pipeline=pipeline)
    args = dict(height=16, width=16, num_inference_steps=2, guidance_scale=6.0)
    plain = images(pipe(prompt=PROMPT, generator=seeded(), output_type="pt", **args))
    at_one = images(pipe(prompt=PROMPT, generator=seeded(), output_type="pt", **{**args, "guidance_scale": 1.0}))
    assert not torch.equal(plain, at_one), "the w-embedding has no effect in this tiny UNet"
    with VSFGuidance(pipe, "", from_preset("VSF Strong")) as vsf:
        empty = images(vsf(prompt=PROMPT, generator=seeded(), output_type="pt", **args))
    assert torch.equal(empty, plain)
    with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Strong")) as vsf:
        assert not torch.equal(images(vsf(prompt=PROMPT, generator=seeded(), output_type="pt", **args)), plain)
        assert vsf.run.calls > 0


def test_flux_distilled_guidance_keeps_the_users_value():
    pipe = flux_pipeline(guidance_embeds=True)
    args = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, guidance_scale=3.5)
    plain = images(pipe(prompt=PROMPT, generator=seeded(), output_type="pt", **args))
    at_one = images(pipe(prompt=PROMPT, generator=seeded(), output_type="pt", **{**args, "guidance_scale": 1.0}))
    assert not torch.equal(plain, at_one), "the guidance embedding has no effect in this tiny transformer"
    with VSFGuidance(pipe, "", from_preset("VSF Strong")) as vsf:
        assert torch.equal(images(vsf(prompt=PROMPT, generator=seeded(), output_type="pt", **args)), plain)


# -- item: IP-Adapter's (text, image tokens) context --------------------------------------------------------
def test_ip_adapter_attn2_is_paper_eq9_on_text_plus_the_adapters_image_attention():
    """One attn2 with a diffusers IP-Adapter processor. Expected, written out: paper eq. 9 on the text
    `[P, N]` (logits of N shifted by -beta, values of N scaled by -alpha) plus the adapter's own term
    `scale * softmax(q k_ip^T / sqrt(d)) v_ip`, then the output projection."""
    from lib_vsf.diffusers.unet import UNetCrossVSFProcessor

    pipe = sd15_pipeline()
    load_tiny_ip_adapter(pipe)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn, ip = pipe.unet.get_submodule(name), pipe.unet.attn_processors[name + ".processor"]
    ip.scale = [0.7]
    alpha, beta, n_pos, n_neg = 3.0, 0.2, 77, 5
    run = GuidanceRun(VSFSettings(alpha=alpha, beta=beta))
    run.set_step(0, 2)
    run.set_text(n_pos, NegativeText.from_sequences([torch.zeros(n_neg, 32)]))
    gen = torch.Generator().manual_seed(4)
    x, text = torch.randn(1, 64, 16, generator=gen), torch.randn(1, n_pos + n_neg, 32, generator=gen)
    image_tokens = torch.randn(1, 1, 4, 32, generator=gen)
    with torch.no_grad():
        got = UNetCrossVSFProcessor(ip, run)(attn, x, (text, [image_tokens]))
        heads = attn.heads

        def split(t):
            return t.reshape(1, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(text)), split(attn.to_v(text))
        d = q.shape[-1]
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)
        logits[..., n_pos:] -= beta
        v = torch.cat([v[:, :, :n_pos], -alpha * v[:, :, n_pos:]], dim=2)
        text_term = logits.softmax(-1) @ v
        k_ip, v_ip = split(ip.to_k_ip[0](image_tokens[:, 0])), split(ip.to_v_ip[0](image_tokens[:, 0]))
        image_term = (q @ k_ip.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v_ip
        merged = (text_term + 0.7 * image_term).transpose(1, 2).reshape(1, 64, -1)
        want = attn.to_out[1](attn.to_out[0](merged))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert run.calls == 1


def test_ip_adapter_masks_are_refused_clearly():
    from lib_vsf.diffusers import GuidanceInputError
    from lib_vsf.diffusers.unet import UNetCrossVSFProcessor

    pipe = sd15_pipeline()
    load_tiny_ip_adapter(pipe)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn, ip = pipe.unet.get_submodule(name), pipe.unet.attn_processors[name + ".processor"]
    run = GuidanceRun(VSFSettings())
    run.set_step(0, 2)
    run.set_text(77, NegativeText.from_sequences([torch.zeros(3, 32)]))
    context = (torch.randn(1, 80, 32), [torch.randn(1, 1, 4, 32)])
    with pytest.raises(GuidanceInputError, match="IP-Adapter masks"):
        UNetCrossVSFProcessor(ip, run)(attn, torch.randn(1, 64, 16), context, ip_adapter_masks=[torch.ones(1, 1, 8, 8)])


def test_ip_adapter_pipeline_with_vsf():
    """Empty negative: the plain IP-Adapter image. Guided: differs; the IP scale still acts; with IP scale 0
    the guided image equals the guided image of the same UNet without an adapter; processors restored."""
    without_ip, pipe = sd15_pipeline(), sd15_pipeline()
    load_tiny_ip_adapter(pipe)
    embeds = [torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(2))]

    def call(target, negative=None, **extra):
        kwargs = dict(prompt=PROMPT, generator=seeded(), output_type="pt", **ARGS, **extra)
        if negative is None:
            return images(target(guidance_scale=1.0, **kwargs))
        with VSFGuidance(target, negative, from_preset("VSF Strong")) as vsf:
            return images(vsf(**kwargs))

    before = processors(pipe.unet)
    plain = call(pipe, ip_adapter_image_embeds=embeds)
    assert torch.equal(call(pipe, "", ip_adapter_image_embeds=embeds), plain)
    guided = call(pipe, NEGATIVE, ip_adapter_image_embeds=embeds)
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
    pipe.set_ip_adapter_scale(0.0)
    guided_no_image = call(pipe, NEGATIVE, ip_adapter_image_embeds=embeds)
    pipe.set_ip_adapter_scale(1.0)
    assert not torch.equal(guided_no_image, guided), "the IP-Adapter scale has no effect under VSF"
    torch.testing.assert_close(guided_no_image, call(without_ip, NEGATIVE), rtol=1e-5, atol=1e-6)
    assert same_processors(before, processors(pipe.unet)) and not pipe.unet._forward_pre_hooks
    assert torch.equal(call(pipe, ip_adapter_image_embeds=embeds), plain)
