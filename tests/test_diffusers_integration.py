"""lib_vsf.diffusers on tiny real pipelines of every family: guidance runs, changes the image, and
leaves the pipeline exactly as it was (same seed, same output, bit for bit)."""
import math

import pytest
import torch

from lib_vsf import VSFSettings, from_preset
from lib_vsf.diffusers import GuidanceConflictError, GuidanceInputError, UnsupportedPipelineError, VSFGuidance
from lib_vsf.diffusers.text import unpadded_ids
from tiny_pipelines import BUILDERS, call_args, clip_text_model, clip_tokenizer, t5_encoder, t5_tokenizer

PROMPT = "a photo of cat"
NEGATIVE = "blurry text watermark"


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BUILDERS[name]()
        return cache[name]

    return get


def output(result):
    return result.images if hasattr(result, "images") else result.frames


def plain(pipe, name, seed=0, **extra):
    kwargs = {**call_args(name), **extra}
    return output(pipe(prompt=PROMPT, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
                       output_type="pt", **kwargs))


def guided(pipe, name, negative=NEGATIVE, settings=None, seed=0, **extra):
    kwargs = {**call_args(name), **extra}
    with VSFGuidance(pipe, negative, settings or from_preset("VSF Strong")) as vsf:
        out = output(vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs))
        calls = vsf.run.calls
    return out, calls


def processors(pipe):
    return [dict(getattr(pipe, n).attn_processors) for n in ("transformer", "transformer_2", "unet")
            if getattr(pipe, n, None) is not None]


def same_processors(before, after):
    return all(b.keys() == a.keys() and all(b[k] is a[k] for k in b) for b, a in zip(before, after))


@pytest.mark.parametrize("name", ["sd3", "sd35m", "sd3-no-t5", "flux", "wan", "wan22", "wan-i2v", "sd15", "sdxl"])
def test_family_generates_with_vsf_and_restores_exactly(pipes, name):
    pipe = pipes(name)
    before_procs = processors(pipe)
    unguided = plain(pipe, name)
    out, calls = guided(pipe, name)
    assert calls > 0, "no attention call was guided"
    assert torch.isfinite(out).all()
    assert not torch.equal(out, unguided), "guidance changed nothing"
    assert same_processors(before_procs, processors(pipe))
    for model in (getattr(pipe, n, None) for n in ("transformer", "transformer_2", "unet")):
        if model is not None:
            assert not model._forward_pre_hooks, "forward pre-hook left behind"
    assert torch.equal(plain(pipe, name), unguided), "pipeline output changed after guidance"


@pytest.mark.parametrize("method", ["nag", "nasa"])
@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "sd15"])
def test_baselines_run_on_the_same_hooks(pipes, name, method):
    pipe = pipes(name)
    unguided = plain(pipe, name)
    out, calls = guided(pipe, name, settings=from_preset("NAG" if method == "nag" else "NASA"))
    assert calls > 0 and torch.isfinite(out).all()
    assert not torch.equal(out, unguided)
    assert torch.equal(plain(pipe, name), unguided)


@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "sd15"])
def test_empty_negative_is_the_unguided_pass(pipes, name):
    pipe = pipes(name)
    out, calls = guided(pipe, name, negative="   ")
    assert calls == 0
    assert torch.equal(out, plain(pipe, name))


@pytest.mark.parametrize("name", ["sd3", "flux", "sd15"])
def test_step_window_outside_is_unguided(pipes, name):
    """3 steps at fractions 0, 1/3, 2/3: a window [0.9, 1) guides none, [0.5, 1) guides only the last."""
    pipe = pipes(name)
    out, calls = guided(pipe, name, settings=from_preset("VSF Strong", start=0.9, end=1.0))
    assert calls == 0 and torch.equal(out, plain(pipe, name))
    _, all_calls = guided(pipe, name)
    _, late_calls = guided(pipe, name, settings=from_preset("VSF Strong", start=0.5, end=1.0))
    assert late_calls * 3 == all_calls


def test_alpha_schedule_reaches_the_attention(pipes):
    pipe = pipes("sd3")
    seen = []
    import lib_vsf.diffusers.sd3 as sd3_module

    original = sd3_module.joint_attention

    def spy(q, k, v, layout, guidance, scale=None):
        seen.append(guidance.alpha)
        return original(q, k, v, layout, guidance, scale)

    sd3_module.joint_attention = spy
    try:
        guided(pipe, "sd3", settings=VSFSettings(alpha_schedule=(1.0, 2.0, 3.0)))
    finally:
        sd3_module.joint_attention = original
    assert sorted(set(seen)) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "sd15"])
def test_zero_alpha_infinite_beta_gives_unguided_image_tokens(pipes, name):
    """alpha = 0, beta = +inf in the attention math: the negative cannot reach image or positive tokens,
    so the pipeline output equals the unguided one (up to float summation order)."""
    pipe = pipes(name)
    from lib_vsf.attention import Guidance

    with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Strong")) as vsf:
        vsf.run.guidance = lambda: Guidance("vsf", 0.0, math.inf)
        out = output(vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                         **call_args(name)))
        assert vsf.run.calls > 0
    torch.testing.assert_close(out, plain(pipe, name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "sd15"])
def test_batch_with_two_negatives_equals_each_alone(pipes, name):
    pipe = pipes(name)
    kwargs = call_args(name)
    negatives = ["blurry", "text watermark low quality"]
    torch.manual_seed(1)
    with VSFGuidance(pipe, negatives, from_preset("VSF Strong")) as vsf:
        both = output(vsf(prompt=[PROMPT, "a red car"], generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                          output_type="pt", **kwargs))
    for i, (prompt, negative) in enumerate(zip([PROMPT, "a red car"], negatives)):
        with VSFGuidance(pipe, negative, from_preset("VSF Strong")) as vsf:
            alone = output(vsf(prompt=prompt, generator=torch.Generator().manual_seed(3 + i), output_type="pt",
                               **kwargs))
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-4, atol=1e-5)


def test_restored_after_an_exception(pipes):
    pipe = pipes("sd3")
    before = processors(pipe)
    unguided = plain(pipe, "sd3")

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt("interrupted mid-run")

    with pytest.raises(KeyboardInterrupt):
        with VSFGuidance(pipe, NEGATIVE, from_preset("VSF Quality")) as vsf:
            vsf(prompt=PROMPT, callback_on_step_end=boom, output_type="pt", **call_args("sd3"))
    assert same_processors(before, processors(pipe))
    assert not pipe.transformer._forward_pre_hooks
    assert torch.equal(plain(pipe, "sd3"), unguided)


def test_restored_when_entering_fails(pipes, monkeypatch):
    pipe = pipes("flux")
    before = processors(pipe)
    from lib_vsf.diffusers.flux import FluxFamily

    monkeypatch.setattr(FluxFamily, "processor_for", lambda *a: (_ for _ in ()).throw(RuntimeError("bad")))
    with pytest.raises(RuntimeError):
        with VSFGuidance(pipe, NEGATIVE):
            pass
    assert same_processors(before, processors(pipe))


def test_negatives_that_do_not_fit_the_batch_are_refused_clearly(pipes):
    pipe = pipes("sd3")
    before = processors(pipe)
    neg = ["blurry", "text", "dark"]  # 3 negatives cannot fit a batch of 2 prompts
    with VSFGuidance(pipe, neg) as vsf:
        with pytest.raises(GuidanceInputError, match="negative prompts do not fit"):
            vsf(prompt=[PROMPT, "a red car"], output_type="pt", **call_args("sd3"))
    assert same_processors(before, processors(pipe))


# -- one denoiser, one guidance: nested contexts, shared modules, exit order --------------------------------
def test_direct_call_inside_the_context_is_refused_and_the_next_call_is_plain(pipes):
    """A direct pipeline call would be guided on steps nobody bookkeeps: refused, context intact."""
    pipe = pipes("sd15")
    unguided = plain(pipe, "sd15")
    with VSFGuidance(pipe, NEGATIVE) as vsf:
        with pytest.raises(GuidanceConflictError, match="run the pipeline through it"):
            pipe(prompt=PROMPT, guidance_scale=5.0, output_type="pt", **call_args("sd15"))
        out = output(vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                         **call_args("sd15")))
    alone, _ = guided(pipe, "sd15", settings=from_preset("VSF Quality"))
    assert torch.equal(out, alone), "the refused call changed the guided one after it"
    assert torch.equal(plain(pipe, "sd15"), unguided)


def test_nested_context_over_the_same_denoiser_is_refused_at_entry(pipes):
    """Nested, the outer negative would reach the inner run as positive text: refuse at entry."""
    pipe = pipes("sd15")
    unguided = plain(pipe, "sd15")
    before = processors(pipe)
    with VSFGuidance(pipe, NEGATIVE) as outer:
        ours = processors(pipe)
        with pytest.raises(GuidanceConflictError, match="already guided"):
            with VSFGuidance(pipe, "dark"):
                pass
        with pytest.raises(GuidanceConflictError, match="already guided"):
            outer.__enter__()  # the same object twice
        assert same_processors(ours, processors(pipe)), "the refused entry changed the outer context"
        out = output(outer(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                           **call_args("sd15")))
    alone, _ = guided(pipe, "sd15", settings=from_preset("VSF Quality"))
    assert torch.equal(out, alone)
    assert same_processors(before, processors(pipe)) and not pipe.unet._forward_pre_hooks
    assert torch.equal(plain(pipe, "sd15"), unguided)


def test_second_pipeline_sharing_the_unet_is_refused_while_guided(pipes):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = pipes("sd15")
    other = StableDiffusionImg2ImgPipeline(**pipe.components)  # same unet, text encoder, scheduler
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def img2img():
        return output(other(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=3, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(0), output_type="pt"))

    plain_other = img2img()
    with VSFGuidance(pipe, NEGATIVE):
        with pytest.raises(GuidanceConflictError, match="already guided"):
            VSFGuidance(other, "dark").__enter__()
        with pytest.raises(GuidanceConflictError, match="another pipeline that shares the model"):
            img2img()
    assert torch.equal(img2img(), plain_other)


def test_shared_unet_entered_twice_and_exited_out_of_order_restores(pipes):
    """The sequence that left processors installed: A enters, B (same UNet) enters, A exits, B exits."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = pipes("sd15")
    other = StableDiffusionImg2ImgPipeline(**pipe.components)
    unguided, before = plain(pipe, "sd15"), processors(pipe)
    first, second = VSFGuidance(pipe, NEGATIVE), VSFGuidance(other, "dark")
    first.__enter__()
    try:
        second.__enter__()
    except GuidanceConflictError:
        pass
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert same_processors(before, processors(pipe)) and not pipe.unet._forward_pre_hooks
    assert torch.equal(plain(pipe, "sd15"), unguided)


def test_contexts_exited_out_of_order_both_restore(pipes):
    """Two live contexts on two pipelines (own UNets, shared text encoder and VAE), exited first-in first-out."""
    from diffusers import StableDiffusionPipeline
    from tiny_pipelines import _unet

    pipe = pipes("sd15")
    other = StableDiffusionPipeline(**{**pipe.components, "unet": _unet(32, seed=9)})
    plain_a, plain_b = plain(pipe, "sd15"), plain(other, "sd15")
    before_a, before_b = processors(pipe), processors(other)
    first, second = VSFGuidance(pipe, NEGATIVE), VSFGuidance(other, "dark")
    first.__enter__()
    second.__enter__()
    out_b = output(second(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                          **call_args("sd15")))
    first.__exit__(None, None, None)
    assert same_processors(before_a, processors(pipe)) and torch.equal(plain(pipe, "sd15"), plain_a)
    out_b_again = output(second(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                                **call_args("sd15")))
    second.__exit__(None, None, None)
    assert torch.equal(out_b, out_b_again) and not torch.equal(out_b, plain_b)
    assert same_processors(before_b, processors(other)) and torch.equal(plain(other, "sd15"), plain_b)
    assert not pipe.unet._forward_pre_hooks and not other.unet._forward_pre_hooks


def test_unsupported_pipeline_names_supported_ones():
    class SomeOtherPipeline:
        pass

    with pytest.raises(UnsupportedPipelineError, match="Flux") as err:
        VSFGuidance(SomeOtherPipeline(), NEGATIVE)
    assert "SomeOtherPipeline" in str(err.value) and "Wan" in str(err.value)


# -- negative text: padding removed, on real tokenizer output --------------------------------------------
def test_clip_negative_is_bos_tokens_eos_without_padding():
    tok = clip_tokenizer()
    ids = unpadded_ids(tok, "blurry text")[0].tolist()
    padded = tok("blurry text", padding="max_length", max_length=77).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 4 and padded[:4] == ids and len(padded) == 77


def test_t5_negative_is_tokens_eos_without_padding():
    tok = t5_tokenizer()
    ids = unpadded_ids(tok, "blurry text", 32)[0].tolist()
    assert ids[-1] == tok.eos_token_id and tok.pad_token_id not in ids and len(ids) == 3


def test_unpadded_clip_states_equal_the_first_positions_of_the_padded_encoding():
    """CLIP is causal: the unpadded encoding is the prefix of the padded one (HOSTS.md)."""
    from lib_vsf.diffusers.text import clip_hidden_states

    tok, enc = clip_tokenizer(), clip_text_model(32, seed=5)
    short = clip_hidden_states(tok, enc, "blurry text")
    ids = tok("blurry text", padding="max_length", max_length=77, return_tensors="pt").input_ids
    full = enc(ids, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(short, full[: short.shape[0]])


def test_sd3_negative_counts_clip_and_t5_tokens_only(pipes):
    from lib_vsf.diffusers.sd3 import SD3Family

    settings = from_preset("VSF Quality")
    with_t5 = SD3Family().encode_negative(pipes("sd3"), "blurry text", settings)
    without_t5 = SD3Family().encode_negative(pipes("sd3-no-t5"), "blurry text", settings)
    assert with_t5.shape == (4 + 3, 32)  # CLIP: BOS blurry text EOS; T5: blurry text </s>
    assert without_t5.shape == (4, 32)  # no zero T5 rows counted as negative tokens


def test_flux_lambda_extrapolates_away_from_the_mean_padding_embedding(pipes):
    from lib_vsf.diffusers.flux import FluxFamily

    pipe = pipes("flux")
    plain_neg = FluxFamily().encode_negative(pipe, "blurry", from_preset("VSF Quality", flux_lambda=0.0))
    pushed = FluxFamily().encode_negative(pipe, "blurry", from_preset("VSF Quality", flux_lambda=8.0))
    # p0 computed here from the definition: T5 states at the pad positions of a padded empty prompt
    tok = pipe.tokenizer_2
    ids = tok("", padding="max_length", max_length=32, return_tensors="pt").input_ids
    states = pipe.text_encoder_2(ids)[0][0]
    null = states[ids[0] == tok.pad_token_id].mean(0)
    torch.testing.assert_close(pushed, plain_neg + 8.0 * (plain_neg - null))
    torch.testing.assert_close(FluxFamily.null_embedding(pipe, 32), null)
