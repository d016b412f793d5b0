"""Forge Neo Z-Image with the real host class (tiny NextDiT, CPU): VSF in the unified blocks, the negative
refined alone by the context refiner, at its negative-pass positions.

Skips unless VSF_NEO_DIR points at a Forge Neo checkout. The model is Neo's own `backend.nn.lumina.NextDiT`
configured as Z-Image (captions padded to 32 with a learned pad token, Z-Image modulation). The runner's
part is played as it plays it: the negative appended to the text context, the run told the text stream.
The oracle is VSF-SPEC eq. 7/8 and the mask table, written out below in plain torch.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from lib_vsf.patching import PatchError
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.neo_zimage import NeoZImageAdapter
from vsf_host_setup import Recorder, host_modules, import_host, init_weights, make_run, negative_rows

CAP_DIM, HEADS = 32, 16  # Z-Image modulation needs dim >= 256: 16 heads x 16


@pytest.fixture(scope="module")
def neo():
    with host_modules("neo"):
        yield import_host("backend.nn.lumina")


def build_zimage(lumina, seed=3, pad_multiple=32):
    model = lumina.NextDiT(patch_size=2, in_channels=4, dim=256, n_layers=2, n_refiner_layers=1, n_heads=HEADS,
                           n_kv_heads=HEADS, multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                           cap_feat_dim=CAP_DIM, axes_dims=[8, 4, 4], axes_lens=[256, 64, 64], rope_theta=256.0,
                           z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=pad_multiple)
    return init_weights(model, seed=seed)


def holder(inner, engine=None):
    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=inner))
    return types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet), text_processing_engine_gemma=engine)


def inputs(batch=2, positive_len=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 4, 12, 12, generator=gen),  # 6x6 = 36 image tokens: 28 x_pad tokens
            "timesteps": torch.rand(batch, generator=gen),
            "context": torch.randn(batch, positive_len, CAP_DIM, generator=gen)}


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], inp["timesteps"], context, transformer_options={})


def padded32(n):
    return n + (-n) % 32


def spec_attention(q, k, v, caption, image, negative_lengths, alpha, beta):
    """VSF-SPEC joint attention, float64, `[B, H, L, D]` laid out `[P (caption), I (image), N0 (padded)]`:
    I rows W Z+ - alpha (1 - W) Z-, W = A+ / (A+ + A-) (eq. 7/8); P rows over {I, P}; N0 rows over {I, N0}."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    for b, n in enumerate(negative_lengths):
        s = q[b] @ k[b].transpose(-1, -2) / math.sqrt(q.shape[-1])
        p, img = list(range(caption)), list(range(caption, caption + image))
        neg = list(range(caption + image, caption + image + n))
        ip, i_n = p + img, img + neg
        out[b][:, p] = torch.softmax(s[:, p][:, :, ip], -1) @ v[b][:, ip]
        z_plus = torch.softmax(s[:, img][:, :, ip], -1) @ v[b][:, ip]
        log_plus = torch.logsumexp(s[:, img][:, :, ip], -1)
        log_minus = torch.logsumexp(s[:, img][:, :, neg] - beta, -1)
        w = torch.sigmoid(log_plus - log_minus)[..., None]
        z_minus = torch.softmax(s[:, img][:, :, neg], -1) @ v[b][:, neg]
        out[b][:, img] = w * z_plus - alpha * (1 - w) * z_minus
        out[b][:, neg] = torch.softmax(s[:, neg][:, :, i_n], -1) @ v[b][:, i_n]
    return out


def test_unified_attention_is_the_spec(neo):
    model = build_zimage(neo)
    inp = inputs()
    lengths = [5, 3]
    negative = negative_rows(lengths, CAP_DIM)
    run = make_run(40, negative, alpha=3.3, beta=0.2)
    with NeoZImageAdapter(holder(model)).patch(run):
        recorder = Recorder(neo.attention_function)
        neo.attention_function = recorder
        try:
            guided = forward(model, inp, append_negative(inp["context"], negative))
        finally:
            neo.attention_function = recorder.fn
    caption, image = padded32(40), padded32(36)
    unified = [c for c in recorder.calls if c[0].shape[2] == caption + image + 5]
    assert len(unified) == 2 and run.calls == 2  # the two unified blocks, nothing else guided
    for q, k, v, args, kwargs, out in unified:
        want = spec_attention(q, k, v, caption, image, lengths, 3.3, 0.2)
        got = out.reshape(q.shape[0], q.shape[2], HEADS, -1).transpose(1, 2)
        for b, n in enumerate(lengths):  # padded N0 slots of the shorter negative are nobody's keys
            rows = list(range(caption + image + n))
            torch.testing.assert_close(got[b][:, rows], want[b][:, rows].float(), rtol=1e-4, atol=1e-5)
    assert (guided - forward(model, inp, inp["context"])).abs().max() > 1e-3


def test_negative_positions_and_refiner_isolation(neo):
    """N0 token j sits at axis-0 position C - ceil32(n) + 1 + j (the image is at C + 1 here and at
    ceil32(n) + 1 in a negative pass); its state entering the blocks is the context refiner of the negative
    alone at its own positions 1..n; P and I rows are exactly the unguided pass's."""
    model = build_zimage(neo)
    inp = inputs(batch=1, positive_len=40)  # C = 64, ceil32(5) = 32: N0 shifted by +32
    negative = negative_rows([5], CAP_DIM, seed=4)
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0].clone(), a[2].clone())),
                                                     with_kwargs=True)
    try:
        unguided = forward(model, inp, inp["context"])
        run = make_run(40, negative)
        with NeoZImageAdapter(holder(model)).patch(run):
            forward(model, inp, append_negative(inp["context"], negative))
    finally:
        hook.remove()
    (x_plain, rot_plain), (x_guided, rot_guided) = seen
    caption, image = 64, 64
    assert x_guided.shape[1] == caption + image + 5
    assert torch.equal(x_guided[:, :caption + image], x_plain) and torch.equal(rot_guided[:, :caption + image], rot_plain)
    ids = torch.zeros(1, 5, 3)
    ids[0, :, 0] = (caption + 1) - (padded32(5) + 1) + (1 + torch.arange(5.0))
    torch.testing.assert_close(rot_guided[:, caption + image:], model.rope_embedder(ids).movedim(1, 2))
    alone_ids = torch.zeros(1, 5, 3)
    alone_ids[0, :, 0] = 1 + torch.arange(5.0)
    with torch.no_grad():
        alone = model.cap_embedder(negative.embeds)
        for layer in model.context_refiner:
            alone = layer(alone, None, model.rope_embedder(alone_ids).movedim(1, 2), transformer_options={})
    torch.testing.assert_close(x_guided[:, caption + image:], alone, rtol=1e-5, atol=1e-5)
    assert unguided.shape == inp["x"].shape


def test_unguided_calls_are_the_hosts_bit_for_bit_and_restore_is_exact(neo):
    model = build_zimage(neo)
    inp = inputs(seed=7)
    original = neo.attention_function
    unpatched = forward(model, inp, inp["context"])
    run = make_run(40, negative_rows([0, 0], CAP_DIM))
    with NeoZImageAdapter(holder(model)).patch(run):
        assert neo.attention_function is not original and "patchify_and_embed" in model.__dict__
        same = forward(model, inp, inp["context"])
    assert run.calls == 0 and torch.equal(same, unpatched)
    negative = negative_rows([2, 2], CAP_DIM)
    run = make_run(40, negative)
    patch = NeoZImageAdapter(holder(model)).patch(run).apply()
    try:
        with pytest.raises(RuntimeError):  # an exception mid-forward
            forward(model, {**inp, "x": inp["x"][:, :3]}, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert neo.attention_function is original and "patchify_and_embed" not in model.__dict__
    assert torch.equal(forward(model, inp, inp["context"]), unpatched)


def test_matches_zimage_only_and_refuses_softly(neo, monkeypatch):
    model = build_zimage(neo)
    lumina2 = build_zimage(neo, pad_multiple=None)  # Lumina 2's shape of the class: not covered
    assert NeoZImageAdapter.matches(holder(model)) and not NeoZImageAdapter.matches(holder(lumina2))
    assert not NeoZImageAdapter.matches(object())
    engine = lambda prompts: [torch.zeros(3, CAP_DIM)]  # noqa: E731 - an engine stand-in (callable)
    NeoZImageAdapter(holder(model, engine)).check()
    with pytest.raises(PatchError, match="text engine"):
        NeoZImageAdapter(holder(model, None)).check()
    monkeypatch.setattr(model, "context_refiner", None)
    with pytest.raises(PatchError, match="context_refiner"):
        NeoZImageAdapter(holder(model, engine)).check()
    monkeypatch.undo()
    monkeypatch.setattr(neo, "attention_function", lambda q, k, v: None)
    with pytest.raises(PatchError):
        NeoZImageAdapter(holder(model, engine)).check()


class CausalEncoder(torch.nn.Module):
    """A stand-in for Neo's Qwen3 (whose config class refuses tiny sizes) with its call signature:
    position i of the hidden state depends on the tokens 0..i the mask allows."""

    def __init__(self, vocab, width=CAP_DIM):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.lengths = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, x, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True):
        self.lengths.append(embeds.shape[1])
        mask = attention_mask[..., None].to(embeds.dtype)
        prefix = torch.cumsum(embeds * mask, 1) / torch.cumsum(mask, 1).clamp(min=1)
        return prefix, torch.tanh(2 * prefix)


def test_negative_is_neos_qwen3_engine_output_one_prompt_at_a_time(neo):
    """Neo's Z-Image engine does not pad: each negative is encoded alone, as in a negative pass."""
    import os
    import sys

    from transformers import AutoTokenizer

    root = os.environ["VSF_NEO_DIR"]
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace(emphasis="Original")
    saved = sys.modules.get("modules.shared")
    sys.modules["modules.shared"] = shared
    try:
        qwen3 = import_host("backend.text_processing.qwen3_engine")
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "backend/huggingface/Tongyi-MAI/Z-Image-Turbo/tokenizer"))
        encoder = CausalEncoder(len(tokenizer) + 8)
        engine = qwen3.Qwen3TextProcessingEngine(text_encoder=encoder, tokenizer=tokenizer)
        adapter = NeoZImageAdapter(holder(build_zimage(neo), engine))
        negative = adapter.encode_negative(None, ["blurry, text", "", "a (watermark:1.3) and more words"], None)
        want = [engine([p])[0] for p in ("blurry, text", "a (watermark:1.3) and more words")]
    finally:
        if saved is None:
            sys.modules.pop("modules.shared", None)
        else:
            sys.modules["modules.shared"] = saved
    counts = negative.mask.sum(-1).tolist()
    assert counts == [want[0].shape[0], 0, want[1].shape[0]] and max(counts) == negative.length
    assert torch.equal(negative.embeds[0, :counts[0]], want[0]) and torch.equal(negative.embeds[2], want[1])
    assert set(encoder.lengths) == set(counts) - {0}  # every encoder call saw one prompt's own tokens
