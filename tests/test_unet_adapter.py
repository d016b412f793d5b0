"""Host-free tests of the Forge Neo / reForge / UNet adapter layer: CLIP chunk arithmetic of the text
stream, call scopes, attention-function checks, and the A1111 attn2 wrapper on a stand-in module shaped
like `ldm.modules.attention.CrossAttention`. Runs in CI without any WebUI checkout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_vsf.attention.reference import vsf_cross_reference
from lib_vsf.layout import text_layout
from lib_vsf.patching import PatchError
from lib_vsf.settings import VSFSettings
from lib_vsf.state import GuidanceRun, NegativeText
from lib_vsf.webui.hosts import _guided, load_adapters, LOAD_ERRORS
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.unet_attn2 import (A1111UNetAdapter, CHUNK_LEN, clip_keep_lengths, patch_a1111,
                                            positive_chunks, trim_clip_chunks)


# -- text stream: positive 77*k padded, negative unpadded ------------------------------------------------

@pytest.mark.parametrize("tokens, keep", [
    (0, []), (1, [3]), (74, [76]), (75, [77]), (76, [77, 3]), (150, [77, 77]), (151, [77, 77, 3]),
])
def test_clip_keep_lengths(tokens, keep):
    """Full chunks stay whole (BOS + 75 + EOS); the last keeps BOS + its tokens + EOS (VSF-SPEC: no padding)."""
    assert clip_keep_lengths(tokens) == keep


def test_clip_keep_lengths_rejects_negative_counts():
    with pytest.raises(ValueError):
        clip_keep_lengths(-1)


def test_trim_clip_chunks_keeps_each_chunk_prefix():
    embeds = torch.arange(3 * CHUNK_LEN, dtype=torch.float32)[:, None].repeat(1, 4)  # row i holds i
    out = trim_clip_chunks(embeds, [77, 5])
    expected_rows = list(range(77)) + list(range(77, 82))
    assert out.shape == (82, 4) and out[:, 0].tolist() == expected_rows
    assert trim_clip_chunks(embeds, []).shape == (0, 4)
    with pytest.raises(ValueError):
        trim_clip_chunks(embeds[:100], [3])  # not whole chunks
    with pytest.raises(ValueError):
        trim_clip_chunks(embeds, [77, 77, 77, 1])  # more chunks than encoded
    with pytest.raises(ValueError):
        trim_clip_chunks(embeds, [78])


def test_positive_chunks():
    assert positive_chunks(77) == 1 and positive_chunks(231) == 3
    for bad in (0, 76, 100):
        with pytest.raises(ValueError):
            positive_chunks(bad)


def test_trimmed_batch_becomes_padded_negative_with_mask():
    """Two negatives of different chunk counts -> one `[B, n, E]` block whose mask marks real tokens."""
    enc = torch.randn(2, 2 * CHUNK_LEN, 8)
    rows = [trim_clip_chunks(enc[0], clip_keep_lengths(80)), trim_clip_chunks(enc[1], clip_keep_lengths(3))]
    negative = NegativeText.from_sequences(rows)
    assert negative.length == 77 + 7 and negative.mask.sum(dim=1).tolist() == [84, 5]
    positive = torch.randn(2, 2 * CHUNK_LEN, 8)
    context = append_negative(positive, negative)
    assert context.shape == (2, 154 + 84, 8)
    assert torch.equal(context[0, 154:], rows[0]) and torch.equal(context[1, 154:159], rows[1])


# -- call scopes --------------------------------------------------------------------------------------

def test_call_scope_marks_only_calls_inside_the_wrapped_method():
    scope = _guided.CallScope("test_scope")
    seen = []

    def attention():
        seen.append(scope.take() is not None)

    def method(with_skip):
        attention()
        attention()

    wrapped = scope.wrap(method, lambda with_skip: _guided.ScopeState(skip_calls=int(with_skip), once=True))
    attention()                 # outside: not guided
    wrapped(False)              # first call guided, second not (once)
    wrapped(True)               # first skipped (e.g. Wan I2V image tokens), second guided
    assert seen == [False, True, False, False, True]
    assert scope.current() is None


def test_call_scope_closes_on_exceptions():
    scope = _guided.CallScope("test_scope_exc")

    def boom():
        raise RuntimeError("host failed")

    with pytest.raises(RuntimeError):
        scope.wrap(boom, lambda: _guided.ScopeState())()
    assert scope.current() is None


def test_check_attention_function_by_position_and_keywords():
    class Host:
        @staticmethod
        def sub_quad(query, key, value, heads, mask=None):
            return query

        @staticmethod
        def too_short(q, k, mask=None):
            return q

        @staticmethod
        def no_mask(q, k, v, heads):
            return q

    assert _guided.check_attention_function(Host, "sub_quad") is Host.sub_quad
    for name in ("too_short", "no_mask", "missing"):
        with pytest.raises(PatchError):
            _guided.check_attention_function(Host, name)


# -- A1111 attn2 wrapper on a stand-in CrossAttention ----------------------------------------------------

class CrossAttention(torch.nn.Module):
    """Shaped like ldm's CrossAttention after A1111's SDPA optimisation replaced `forward`."""

    def __init__(self, query_dim=16, context_dim=12, heads=2, dim_head=8):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = torch.nn.Linear(query_dim, inner, bias=False)
        self.to_k = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_v = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, query_dim), torch.nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None, **kwargs):
        context = x if context is None else context
        q, k, v = (t.reshape(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(x.shape[0], -1, q.shape[1] * q.shape[3]))


def _run(positive_len, negative, alpha=3.0, beta=0.2):
    run = GuidanceRun(VSFSettings(alpha=alpha, beta=beta))
    run.set_step(0, 4)
    run.set_text(positive_len, negative)
    return run


def test_a1111_wrapper_matches_cross_reference_and_restores():
    torch.manual_seed(0)
    attn, attn1 = CrossAttention(), CrossAttention(context_dim=16)
    original = CrossAttention.__dict__["forward"]
    x = torch.randn(2, 10, 16)
    positive = torch.randn(2, 77, 12)
    negative = NegativeText.from_sequences([torch.randn(4, 12), torch.randn(2, 12)])
    context = append_negative(positive, negative)
    run = _run(77, negative)
    with torch.no_grad():
        unpatched = attn(x, context=positive)
        with patch_a1111([CrossAttention], run):
            guided = attn(x, context=context)
            self_attention = attn1(x)  # attn1: no context, the host's own forward
        assert run.calls == 1
        q, k, v = (t.reshape(2, -1, 2, 8).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
        layout = text_layout(77, 4, total=81, negative_mask=run.negative_mask)
        expected = attn.to_out(vsf_cross_reference(q, k, v, layout, 3.0, 0.2).transpose(1, 2).reshape(2, 10, 16))
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(self_attention, attn1(x))
    assert CrossAttention.__dict__["forward"] is original
    assert torch.equal(attn(x, context=positive), unpatched)


def test_a1111_wrapper_passes_through_what_it_does_not_guide():
    torch.manual_seed(1)
    attn = CrossAttention()
    x, positive = torch.randn(1, 6, 16), torch.randn(1, 77, 12)
    negative = NegativeText.from_sequences([torch.randn(3, 12)])
    context = append_negative(positive, negative)
    with torch.no_grad():
        plain = CrossAttention.forward(attn, x, context=context)
        run = _run(77, negative)
        with patch_a1111([CrossAttention], run):
            assert torch.equal(attn(x, context=context, mask=torch.ones(1, 80, dtype=torch.bool)), plain)
            assert torch.equal(attn(x, context=context, additional_tokens=torch.zeros(1, 1, 16)), plain)
            assert torch.equal(attn(x, context=positive), CrossAttention.forward.__vsf_original__(attn, x, context=positive))
        assert run.calls == 0


def test_a1111_wrapper_with_an_empty_negative_runs_the_hosts_own_forward():
    """Empty negative: the call must reach the host's forward unchanged (VSF-SPEC: an empty negative is
    exactly the unguided pass), not our guided computation over a zero-length negative."""
    class CountingCrossAttention(CrossAttention):
        host_calls = 0

        def forward(self, x, context=None, mask=None, **kwargs):
            CountingCrossAttention.host_calls += 1
            return super().forward(x, context=context, mask=mask, **kwargs)

    torch.manual_seed(1)
    attn = CountingCrossAttention()
    x, positive = torch.randn(1, 6, 16), torch.randn(1, 77, 12)
    with torch.no_grad():
        unpatched = attn(x, context=positive)  # before any patch
        empty = _run(77, NegativeText.from_sequences([torch.zeros(0, 12)]))
        with patch_a1111([CountingCrossAttention], empty):
            CountingCrossAttention.host_calls = 0
            patched = attn(x, context=positive)
            assert CountingCrossAttention.host_calls == 1, "the host's forward was bypassed"
    assert torch.equal(patched, unpatched)
    assert empty.calls == 0


def test_a1111_wrapper_alpha_zero_beta_inf_equals_positive_only():
    torch.manual_seed(2)
    attn = CrossAttention()
    x, positive = torch.randn(2, 6, 16), torch.randn(2, 77, 12)
    negative = NegativeText.from_sequences([torch.randn(5, 12), torch.randn(5, 12)])
    run = _run(77, negative)
    from lib_vsf.attention import Guidance
    run.guidance = lambda: Guidance("vsf", 0.0, math.inf)
    with torch.no_grad():
        with patch_a1111([CrossAttention], run):
            guided = attn(x, context=append_negative(positive, negative))
        torch.testing.assert_close(guided, attn(x, context=positive), rtol=1e-5, atol=1e-6)


def test_a1111_patch_refuses_changed_signature():
    class Changed(torch.nn.Module):
        def forward(self, x, encoder_hidden_states=None):
            return x

    with pytest.raises(PatchError):
        patch_a1111([CrossAttention, Changed], _run(77, None))
    assert "forward" in CrossAttention.__dict__ and not hasattr(CrossAttention.forward, "__vsf_original__")


# -- registry: the adapters import and stay quiet without a host -------------------------------------------

def test_image_stream_tells_reference_tokens_from_the_image_inside_the_wrapped_forward():
    """Neo's Flux / Qwen-Image `forward(x, timestep, context)`: the generated image has ceil(H/p) x ceil(W/p)
    tokens after the text; whatever follows it in a joint sequence of that call is R."""
    from lib_vsf.webui.hosts._reference_tokens import ImageStream

    stream = ImageStream(patch_size=2)
    seen = []

    def forward(x, timestep, context, **kwargs):
        seen.append((stream.reference(9 + 12 + 20, 9), stream.reference(9 + 12, 9), stream.reference(41, 8)))
        if kwargs.get("fail"):
            raise RuntimeError("host failed")

    wrapped = stream.wrap_forward(forward)
    wrapped(torch.zeros(1, 16, 1, 5, 8), 0.5, torch.zeros(1, 9, 4))  # 3 x 4 = 12 image tokens (5 rows padded to 6)
    assert seen == [(slice(21, 41), None, None)]  # R after I; no R; another text stream is not this call's
    with pytest.raises(RuntimeError):
        wrapped(torch.zeros(1, 16, 6, 8), 0.5, context=torch.zeros(1, 9, 4), fail=True)
    assert stream.current() is None and stream.reference(41, 9) is None  # nothing outlives the call


def test_adapters_register_without_a_host():
    names = {cls.name for cls in load_adapters()}
    assert {"neo-flux", "neo-wan", "reforge-sd3", "neo-unet", "forge-unet", "reforge-unet", "a1111-unet",
            "neo-qwen-image"} <= names
    assert not {k for k in LOAD_ERRORS if k in ("neo_flux", "neo_wan", "reforge_mmdit", "unet_attn2", "neo_qwen")}
    for cls in load_adapters():
        if cls.host in ("neo", "reforge") or cls.name in ("forge-unet", "a1111-unet"):
            assert cls.matches(object()) is False
            assert cls.matches(type("SD", (), {"model": torch.nn.Linear(1, 1)})()) is False
    assert A1111UNetAdapter.matches(type("SD", (), {"forge_objects": object()})()) is False


# -- negative encoding: the host's padded encoding cut to real tokens ------------------------------------

class Chunk:
    def __init__(self, tokens):
        self.tokens = tokens


BOS, EOS = 49406, 49407


def clip_chunk(ids, pad=EOS):
    """A 77-position CLIP chunk: BOS + ids + EOS, padded."""
    return Chunk([BOS, *ids, EOS] + [pad] * (75 - len(ids)))


def test_clip_negative_cuts_each_chunk_after_its_eos():
    from lib_vsf.webui.hosts.unet_attn2 import clip_negative

    crossattn = torch.randn(1, 3 * CHUNK_LEN, 6)
    chunks = [Chunk([BOS, *range(1, 76), EOS]), clip_chunk([5, 6, 7], pad=0)]  # SD2-style zero padding
    out = clip_negative(crossattn, chunks, EOS)
    assert out.shape == (77 + 5, 6)
    assert torch.equal(out[:77], crossattn[0, :77]) and torch.equal(out[77:], crossattn[0, 77:82])
    assert clip_negative(crossattn, [clip_chunk([])], EOS).shape == (0, 6)  # BOS + EOS only: no tokens


class FakeEngine:
    """Stand-in for a WebUI CLIP engine: one word = one token id."""

    id_end = EOS

    def tokenize_line(self, line):
        ids = [len(w) for w in line.split()]
        chunks = [clip_chunk(ids[i:i + 75]) for i in range(0, max(len(ids), 1), 75)]
        return chunks, len(ids)


class FakeModel:
    def __init__(self):
        self.cond_stage_model = FakeEngine()
        self.encoded = []

    def get_learned_conditioning(self, prompts):
        self.encoded.extend(prompts)
        chunks = max(1, math.ceil(len(prompts[0].split()) / 75))
        gen = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(1, chunks * CHUNK_LEN, 4, generator=gen)


def test_encode_clip_negatives_unpads_and_caches():
    from lib_vsf.webui.hosts.unet_attn2 import clip_engine, encode_clip_negatives

    model = FakeModel()
    assert clip_engine(model) is model.cond_stage_model
    negative = encode_clip_negatives(None, model, ["blurry ugly", "", "blurry ugly", " ".join(["x"] * 80)])
    assert negative.mask.sum(dim=1).tolist() == [4, 0, 4, 77 + 7]
    assert model.encoded == ["blurry ugly", " ".join(["x"] * 80)]  # identical prompts encoded once, empty never
    with pytest.raises(PatchError):
        clip_engine(object())


def test_umt5_length_reads_end_token():
    from lib_vsf.webui.hosts.neo_wan import umt5_length

    class UMT5:
        end_token = 1

        def tokenize_line(self, line):
            return [Chunk([7, 8, 9, 1] + [0] * 508)], 4

    assert umt5_length(UMT5(), "a b c") == 4


def test_sd3_negative_from_comfy_tokens():
    from lib_vsf.webui.hosts.reforge_mmdit import sd3_negative

    pairs = lambda ids: [(i, 1.0) for i in ids]  # noqa: E731
    tokens = {"l": [pairs([BOS, 11, 12, EOS] + [EOS] * 73)], "g": [pairs([BOS, 11, 12, EOS] + [0] * 73)],
              "t5xxl": [pairs([21, 22, 23, 1] + [0] * 73)]}
    with_t5 = torch.randn(1, 77 + 77, 8)
    out = sd3_negative(with_t5, tokens)
    assert out.shape == (4 + 4, 8) and torch.equal(out[4:], with_t5[0, 77:81])
    clip_only = torch.randn(1, 77, 8)  # T5 not loaded: no T5 part in the encoding
    assert sd3_negative(clip_only, tokens).shape == (4, 8)


def test_a1111_attach_appends_negative_to_conditional_rows_and_undoes():
    from lib_vsf.webui.hosts.base import SamplingContext

    seen = []

    class SD:
        def apply_model(self, x_noisy, t, cond, return_ids=False):
            seen.append(cond)
            return x_noisy

    sd = SD()
    negative = NegativeText.from_sequences([torch.ones(3, 4)])
    run = _run(77, None)
    ctx = SamplingContext(run=run, negative=negative, single_pass=False)
    ctx.host_state["text_uncond"] = torch.zeros(1, 77, 4)
    A1111UNetAdapter(sd).attach(None, ctx)
    cond_rows, uncond_row = torch.randn(2, 77, 4), torch.zeros(1, 77, 4)
    sd.apply_model(torch.zeros(3, 1), torch.zeros(3), {"c_crossattn": [torch.cat([cond_rows, uncond_row])], "c_concat": [None]})
    context = seen[-1]["c_crossattn"][0]
    assert context.shape == (3, 80, 4) and torch.equal(context[:2, 77:], torch.ones(2, 3, 4))
    assert run.negative_len == 0  # reset after the call
    sd.apply_model(torch.zeros(1, 1), torch.zeros(1), {"crossattn": torch.randn(1, 77, 4), "vector": None})
    assert seen[-1]["crossattn"].shape == (1, 80, 4)  # SDXL layout
    for undo in reversed(ctx.undo):
        undo()
    assert "apply_model" not in vars(sd)
