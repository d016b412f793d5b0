"""Flux's lambda (paper eq. 10) on both paths, diffusers and the WebUI (Forge / Neo T5 engine):

    p- <- p- + lambda (p- - p0),   p0 = mean T5 embedding of the padding of the empty prompt

Every expectation below is written out here from that definition with the tiny T5 encoder itself,
not through `lib_vsf.flux_lambda`. The WebUI side runs through a double of Forge's
`T5TextProcessingEngine` (same chunking: tokens + EOS padded with id 0 to `min_length`, encoded without
an attention mask, one prompt at a time through `get_learned_conditioning`); the real engines run in
`tests/real_hosts/test_forge_negative_encoding.py` and `test_neo_flux.py`.
"""
from __future__ import annotations

import types

import pytest
import torch

from lib_vsf.diffusers.flux import FluxFamily
from lib_vsf.flux_lambda import extrapolate_negative, null_embedding
from lib_vsf.settings import VSFSettings
from lib_vsf.webui.hosts import _negative_text
from tiny_pipelines import WORDS, t5_encoder, t5_tokenizer

EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def encoder():
    return t5_encoder(32, seed=7)


def encode(encoder, ids):
    with torch.no_grad():
        return encoder(torch.tensor([ids]))[0][0]


def empty_prompt_null(encoder, length):
    """p0 from the definition: the empty prompt `[EOS, PAD, ...]` of `length`, mean over its padding."""
    return encode(encoder, [EOS] + [PAD] * (length - 1))[1:].double().mean(dim=0)


class ForgeT5EngineDouble:
    """Behaves like Forge's / Neo's T5TextProcessingEngine for one-chunk prompts (no BREAK, no
    emphasis): tokens + EOS, then pads to `min_length`; `process_tokens` runs the encoder unmasked."""

    def __init__(self, encoder, tokenizer, min_length):
        self.encoder, self.tokenizer, self.min_length = encoder, tokenizer, min_length
        self.id_end, self.id_pad = EOS, PAD
        self.null_encodings = 0

    def tokenize_line(self, line):
        tokens = self.tokenizer(line, add_special_tokens=False)["input_ids"] + [self.id_end]
        tokens += [self.id_pad] * max(0, self.min_length - len(tokens))
        return [types.SimpleNamespace(tokens=tokens, multipliers=[1.0] * len(tokens))], len(tokens)

    def process_tokens(self, batch_tokens, batch_multipliers):
        if batch_tokens[0][0] == self.id_end:
            self.null_encodings += 1
        with torch.no_grad():
            return self.encoder(torch.tensor(batch_tokens))[0]

    def __call__(self, texts):
        rows = []
        for text in texts:
            chunk = self.tokenize_line(text)[0][0]
            rows.append(self.process_tokens([chunk.tokens], [chunk.multipliers])[0])
        return torch.stack(rows)


def webui_model(engine):
    """A Forge Flux engine object: `get_learned_conditioning` returns the T5 encoding as `crossattn`."""
    return types.SimpleNamespace(text_processing_engine_t5=engine,
                                 get_learned_conditioning=lambda prompts: {"crossattn": engine(list(prompts))})


def words(n):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def test_extrapolation_is_paper_eq10():
    gen = torch.Generator().manual_seed(0)
    negative, null = torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    for lam in (8.0, 2.5):
        expected = negative + lam * (negative - null)
        torch.testing.assert_close(extrapolate_negative(negative.float(), null.float(), lam), expected.float())
        half = extrapolate_negative(negative.half(), null.float(), lam)
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.double(), expected, atol=2e-2, rtol=2e-3)
    assert extrapolate_negative(negative, null, 0.0) is negative
    with pytest.raises(ValueError, match="width"):
        extrapolate_negative(negative, null[:4], 8.0)


def test_null_is_the_mean_padding_embedding_of_the_empty_prompt(encoder):
    null = null_embedding(lambda ids: encoder(ids)[0], EOS, PAD, 24)
    torch.testing.assert_close(null.double(), empty_prompt_null(encoder, 24), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="padding position"):
        null_embedding(lambda ids: encoder(ids)[0], EOS, PAD, 1)


def test_webui_negative_that_fills_the_t5_chunk_still_gets_lambda(encoder):
    """A negative of min_length - 1 tokens or more leaves no padding in its own encoding: the null
    must still come from the empty prompt (the old code skipped lambda here, silently)."""
    tokenizer = t5_tokenizer(64)
    engine = ForgeT5EngineDouble(encoder, tokenizer, min_length=16)
    prompt = words(20)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) + 1 > engine.min_length  # the chunk is all tokens: no padding position in it
    plain = encode(encoder, ids + [EOS]).double()
    expected = plain + 8.0 * (plain - empty_prompt_null(encoder, 16))
    got = _negative_text.encode_flux_negatives(None, webui_model(engine), [prompt], VSFSettings(flux_lambda=8.0))
    assert got.length == len(ids) + 1
    torch.testing.assert_close(got.embeds[0].double(), expected, atol=1e-5, rtol=1e-5)
    assert (got.embeds[0].double() - plain).abs().max() > 1e-2


def test_webui_short_negative_uses_the_empty_prompt_not_its_own_padding(encoder):
    tokenizer = t5_tokenizer(64)
    engine = ForgeT5EngineDouble(encoder, tokenizer, min_length=16)
    prompts = ["blurry text", "ugly bad hands", "blurry text", ""]
    got = _negative_text.encode_flux_negatives(None, webui_model(engine), prompts, VSFSettings(flux_lambda=8.0))
    null = empty_prompt_null(encoder, 16)
    assert engine.null_encodings == 1  # one null per generation, whatever the number of negatives
    for row, prompt in enumerate(prompts[:2]):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + [EOS]
        padded = encode(encoder, ids + [PAD] * (16 - len(ids))).double()
        plain = padded[:len(ids)]
        torch.testing.assert_close(got.embeds[row, :len(ids)].double(), plain + 8.0 * (plain - null), atol=1e-5, rtol=1e-5)
        own_padding = padded[len(ids):].mean(dim=0)  # the definition the WebUI used before: not p0
        assert (own_padding - null).abs().max() > 1e-3
    assert got.mask.sum(dim=1).tolist() == [3, 4, 3, 0]
    torch.testing.assert_close(got.embeds[2], got.embeds[0])


def test_diffusers_negative_that_fills_the_t5_chunk_still_gets_lambda(encoder):
    tokenizer = t5_tokenizer(32)
    pipe = types.SimpleNamespace(text_encoder_2=encoder, tokenizer_2=tokenizer)
    prompt = words(40)  # truncated to 31 tokens + EOS: the whole 32-token chunk
    plain = FluxFamily().encode_negative(pipe, prompt, VSFSettings(flux_lambda=0.0)).double()
    assert plain.shape[0] == 32
    pushed = FluxFamily().encode_negative(pipe, prompt, VSFSettings(flux_lambda=8.0)).double()
    torch.testing.assert_close(pushed, plain + 8.0 * (plain - empty_prompt_null(encoder, 32)), atol=1e-5, rtol=1e-5)


def test_diffusers_and_webui_compute_the_same_null(encoder):
    """Same T5 encoder, same padded length: the diffusers path and the WebUI path give one p0."""
    length = 32
    pipe = types.SimpleNamespace(text_encoder_2=encoder, tokenizer_2=t5_tokenizer(length))
    from_diffusers = FluxFamily.null_embedding(pipe, length)
    from_webui = _negative_text.t5_null_embedding(ForgeT5EngineDouble(encoder, t5_tokenizer(64), min_length=length))
    assert torch.equal(from_diffusers, from_webui)
    torch.testing.assert_close(from_webui.double(), empty_prompt_null(encoder, length), atol=1e-6, rtol=1e-6)


def test_webui_engine_without_padding_uses_the_flux_t5_length(encoder):
    """Chroma's engines pad nothing (`min_length=1`): p0 is the empty prompt padded to Flux's 256."""
    engine = ForgeT5EngineDouble(encoder, t5_tokenizer(64), min_length=1)
    torch.testing.assert_close(_negative_text.t5_null_embedding(engine).double(), empty_prompt_null(encoder, 256), atol=1e-6, rtol=1e-6)
