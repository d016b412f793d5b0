"""The negative prompt without padding, counted by Forge's own text engines (CLIP chunker with the
bundled SD3 CLIP tokenizer; T5 chunker), then cut out of an SD3/Flux-shaped padded encoding; and Flux's
lambda (paper eq. 10) through Forge's own T5 engine and T5 class.

Skips unless VSF_FORGE_DIR points at a Forge checkout (verified with dfdcbab6). Forge's engines read
`modules.shared.opts` (emphasis mode, SD3's T5 switch); a two-field stand-in provides it. The padded
encoding is synthetic: row `i` of the CLIP part is `i`, of the T5 part `1000 + i`, so the test sees
exactly which positions were kept. The Flux lambda tests encode with Forge's `IntegratedT5` (tiny,
weights of a `transformers` T5 encoder) and write p0 out from its definition: the mean encoding of the
padding of the empty prompt `[EOS, PAD x 255]`.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from lib_vsf.settings import VSFSettings
from lib_vsf.webui.hosts import _negative_text
from lib_vsf.diffusers.flux import FluxFamily
from lib_vsf.webui.hosts.forge_flux import ForgeFluxAdapter
from lib_vsf.webui.hosts.forge_mmditx import ForgeMMDiTAdapter
from vsf_host_setup import T5WordTokenizer, hf_t5_encoder, host_modules, host_t5, import_host, shared_opts

TOKENIZER = "backend/huggingface/stabilityai/stable-diffusion-3-medium-diffusers/tokenizer"


@pytest.fixture(scope="module")
def engines():
    from transformers import CLIPTokenizer

    with host_modules("forge") as root, shared_opts(emphasis="Original", sd3_enable_t5=False) as opts:
        classic = import_host("backend.text_processing.classic_engine")
        t5_engine = import_host("backend.text_processing.t5_engine")
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, TOKENIZER))
        embeddings = types.SimpleNamespace(token_embedding=torch.nn.Embedding(tokenizer.vocab_size + 10, 8))
        encoder = types.SimpleNamespace(transformer=types.SimpleNamespace(text_model=types.SimpleNamespace(embeddings=embeddings)))
        clip = classic.ClassicTextProcessingEngine(encoder, tokenizer, embedding_key="clip_l", embedding_expected_shape=8)
        t5 = t5_engine.T5TextProcessingEngine(types.SimpleNamespace(transformer=None), T5WordTokenizer())
        yield clip, t5, tokenizer, opts


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_clip_chunks_count_bos_tokens_eos(engines):
    clip, _, tokenizer, _ = engines
    assert _negative_text.clip_chunk_lengths(clip, "blurry, text") == [n_tokens(tokenizer, "blurry, text") + 2]
    assert _negative_text.clip_chunk_lengths(clip, "") == [0]  # an empty prompt is no negative at all
    assert _negative_text.clip_chunk_lengths(clip, "red BREAK blue hat") == [3, 2 + n_tokens(tokenizer, "blue hat")]
    long = ", ".join(["a very long list of unwanted things"] * 15)
    lengths = _negative_text.clip_chunk_lengths(clip, long)
    assert len(lengths) >= 2 and all(2 < n <= 77 for n in lengths)
    assert sum(n - 2 for n in lengths) == n_tokens(tokenizer, long)  # every token once, padding never


def test_t5_counts_tokens_plus_eos(engines):
    _, t5, _, _ = engines
    assert _negative_text.t5_length(t5, "three word prompt") == 4
    assert _negative_text.t5_length(t5, "") == 0


def synthetic_sd3_model(clip, t5, chunks, t5_len=256):
    def get_learned_conditioning(prompts):
        clip_part = torch.arange(77 * chunks, dtype=torch.float32)[:, None].expand(-1, 4)
        t5_part = 1000 + torch.arange(t5_len, dtype=torch.float32)[:, None].expand(-1, 4)
        return {"crossattn": torch.cat([clip_part, t5_part])[None].repeat(len(prompts), 1, 1),
                "vector": torch.zeros(len(prompts), 8)}
    return types.SimpleNamespace(get_learned_conditioning=get_learned_conditioning,
                                 text_processing_engine_l=clip, text_processing_engine_t5=t5)


def test_sd3_negative_without_padding_t5_off_and_on(engines):
    clip, t5, tokenizer, opts = engines
    model = synthetic_sd3_model(clip, t5, chunks=1)
    adapter = ForgeMMDiTAdapter(model)
    n = n_tokens(tokenizer, "blurry, text") + 2
    with shared_opts(emphasis="Original", sd3_enable_t5=False):
        off = adapter.encode_negative(None, ["blurry, text", ""], VSFSettings())
    assert off.mask.sum(dim=1).tolist() == [n, 0]  # T5 off: Forge's zero T5 slot is not negative text
    assert off.embeds[0, :n, 0].tolist() == list(range(n))
    with shared_opts(emphasis="Original", sd3_enable_t5=True):
        on = adapter.encode_negative(None, ["blurry, text"], VSFSettings())
    t5_len = _negative_text.t5_length(t5, "blurry, text")
    assert on.length == n + t5_len
    assert on.embeds[0, :, 0].tolist() == list(range(n)) + [1000.0 + i for i in range(t5_len)]


@pytest.fixture(scope="module")
def flux_t5():
    hf = hf_t5_encoder(seed=3)
    with host_modules("forge"), shared_opts(emphasis="Original"):
        t5_engine = import_host("backend.text_processing.t5_engine")
        t5 = host_t5(import_host("backend.nn.t5"), hf)
        engine = t5_engine.T5TextProcessingEngine(t5, T5WordTokenizer())  # Forge's Flux engine: min_length 256
        # Forge's `Flux.get_learned_conditioning` minus CLIP-L and model loading: T5 is the crossattn
        model = types.SimpleNamespace(text_processing_engine_t5=engine,
                                      get_learned_conditioning=lambda prompts: {"crossattn": engine(list(prompts))})
        yield model, t5.transformer, hf


def t5_rows(transformer, ids):
    with torch.no_grad():
        return transformer(input_ids=torch.tensor([ids]))[0].double()


def empty_prompt_null(transformer, length=256):
    """p0 of paper eq. 10 from its definition: EOS then padding (id 0), mean over the padding."""
    return t5_rows(transformer, [1] + [0] * (length - 1))[1:].mean(dim=0)


@pytest.mark.parametrize("words", [3, 255, 300])  # short; exactly the chunk (255 + EOS); beyond it
def test_flux_negative_gets_lambda_against_the_empty_prompt_null(flux_t5, words):
    model, transformer, _ = flux_t5
    prompt = " ".join(f"w{i}" for i in range(words))
    ids = T5WordTokenizer()([prompt])["input_ids"][0] + [1]
    chunk = ids + [0] * max(0, 256 - len(ids))  # what Forge's engine encodes for this prompt
    plain = t5_rows(transformer, chunk)[:len(ids)]
    lam = 8.0
    expected = plain + lam * (plain - empty_prompt_null(transformer))
    got = ForgeFluxAdapter(model).encode_negative(None, [prompt, ""], VSFSettings(flux_lambda=lam))
    assert got.mask.sum(dim=1).tolist() == [len(ids), 0]
    torch.testing.assert_close(got.embeds[0].double(), expected, atol=1e-4, rtol=1e-4)  # (1 + lambda) x emphasis ulps
    unpushed = ForgeFluxAdapter(model).encode_negative(None, [prompt], VSFSettings(flux_lambda=0.0))
    torch.testing.assert_close(unpushed.embeds[0].double(), plain, atol=2e-5, rtol=1e-5)  # emphasis rescale: ulps


def test_forge_and_diffusers_share_one_null(flux_t5):
    """Same T5 weights: Forge's engine path and the diffusers path (at Forge's 256) give one p0."""
    model, transformer, hf = flux_t5
    pipe = types.SimpleNamespace(text_encoder_2=hf, tokenizer_2=types.SimpleNamespace(eos_token_id=1, pad_token_id=0))
    from_forge = _negative_text.t5_null_embedding(model.text_processing_engine_t5)
    torch.testing.assert_close(from_forge.double(), empty_prompt_null(transformer), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(from_forge, FluxFamily.null_embedding(pipe, 256), atol=2e-6, rtol=1e-5)
