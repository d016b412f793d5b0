"""The negative prompt without padding, counted by Forge's own text engines (CLIP chunker with the
bundled SD3 CLIP tokenizer; T5 chunker), then cut out of an SD3/Flux-shaped padded encoding.

Skips unless VSF_FORGE_DIR points at a Forge checkout (verified with dfdcbab6). Forge's engines read
`modules.shared.opts` (emphasis mode, SD3's T5 switch); a two-field stand-in provides it. The padded
encoding is synthetic: row `i` of the CLIP part is `i`, of the T5 part `1000 + i`, so the test sees
exactly which positions were kept.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

import pytest
import torch

from lib_vsf.settings import VSFSettings
from lib_vsf.webui.hosts import _forge
from lib_vsf.webui.hosts.forge_mmditx import ForgeMMDiTAdapter
from vsf_host_setup import host_modules, import_host

TOKENIZER = "backend/huggingface/stabilityai/stable-diffusion-3-medium-diffusers/tokenizer"


@contextlib.contextmanager
def shared_opts(**opts):
    saved = {n: sys.modules.get(n) for n in ("modules", "modules.shared")}
    modules = types.ModuleType("modules")
    modules.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace(**opts)
    modules.shared = shared
    sys.modules.update({"modules": modules, "modules.shared": shared})
    try:
        yield shared.opts
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


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


class T5WordTokenizer:
    """A word-level stand-in for the T5 tokenizer (ids 2..): the chunking under test is Forge's."""

    def get_vocab(self):
        return {}

    def __call__(self, texts, truncation=False, add_special_tokens=False):
        return {"input_ids": [[2 + i for i, _ in enumerate(t.split())] for t in texts]}


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_clip_chunks_count_bos_tokens_eos(engines):
    clip, _, tokenizer, _ = engines
    assert _forge.clip_chunk_lengths(clip, "blurry, text") == [n_tokens(tokenizer, "blurry, text") + 2]
    assert _forge.clip_chunk_lengths(clip, "") == [0]  # an empty prompt is no negative at all
    assert _forge.clip_chunk_lengths(clip, "red BREAK blue hat") == [3, 2 + n_tokens(tokenizer, "blue hat")]
    long = ", ".join(["a very long list of unwanted things"] * 15)
    lengths = _forge.clip_chunk_lengths(clip, long)
    assert len(lengths) >= 2 and all(2 < n <= 77 for n in lengths)
    assert sum(n - 2 for n in lengths) == n_tokens(tokenizer, long)  # every token once, padding never


def test_t5_counts_tokens_plus_eos(engines):
    _, t5, _, _ = engines
    assert _forge.t5_length(t5, "three word prompt") == 4
    assert _forge.t5_length(t5, "") == 0


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
    t5_len = _forge.t5_length(t5, "blurry, text")
    assert on.length == n + t5_len
    assert on.embeds[0, :, 0].tolist() == list(range(n)) + [1000.0 + i for i in range(t5_len)]
