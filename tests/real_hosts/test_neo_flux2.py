"""Forge Neo Flux.2 Klein with the real host classes (tiny, CPU): VSF in every joint attention, the negative
at its negative-pass text ids, and the negative encoded by Neo's Klein engine without its padding.

Skips unless VSF_NEO_DIR points at a Forge Neo checkout. The model is Neo's own
`IntegratedFluxTransformer2DModel` configured as Flux.2 (global modulation, text ids on axis 3, no biases);
the oracle is VSF-SPEC eq. 7/8 and the mask table written out below in plain torch, swapped in for Neo's
`attention_function`, with the negative-pass text ids set by the test itself.
"""
from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch

from lib_vsf.patching import PatchError
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.neo_flux import NeoFluxAdapter
from lib_vsf.webui.hosts.neo_flux2 import NeoFlux2Adapter, encode_klein_negative
from vsf_host_setup import git_commit, host_modules, import_host, init_weights, make_run, negative_rows

CONTEXT_DIM, POSITIVE_LEN, HEADS = 48, 6, 4
KLEIN_TOKENIZER = "backend/huggingface/black-forest-labs/FLUX.2-klein-4B/tokenizer"


@pytest.fixture(scope="module")
def neo():
    with host_modules("neo") as root:
        shared = types.ModuleType("modules.shared")  # the Klein engine reads opts.emphasis at call time
        shared.opts = types.SimpleNamespace(emphasis="Original")
        saved = {n: sys.modules.get(n) for n in ("modules.shared",)}
        import modules  # noqa: F401 - Neo's package, for modules_forge / modules.* imports
        sys.modules["modules.shared"] = shared
        try:
            flux = import_host("backend.nn.flux")
            klein = import_host("backend.text_processing.klein_engine")
            yield types.SimpleNamespace(root=root, flux=flux, klein=klein, commit=git_commit(root))
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module


def build_flux2(flux, seed=3):
    model = flux.IntegratedFluxTransformer2DModel(
        in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=3.0,
        num_heads=HEADS, depth=1, depth_single_blocks=1, axes_dim=[4, 4, 4, 4], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=False, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True,
        ops_bias=False)
    return init_weights(model, seed=seed)


def build_flux1(flux):
    return init_weights(flux.IntegratedFluxTransformer2DModel(
        in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=4.0,
        num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True,
        guidance_embed=True), seed=4)


def holder(inner, engine=None):
    """The shape of a WebUI model: sd_model.forge_objects.unet.model.diffusion_model (+ Neo's engine)."""
    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=inner))
    return types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet), text_processing_engine_gemma=engine)


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 4, 4, generator=gen), "timestep": torch.rand(batch, generator=gen),
            "context": torch.randn(batch, POSITIVE_LEN, CONTEXT_DIM, generator=gen)}


def forward(model, inp, context):
    with torch.no_grad():
        return model(inp["x"], inp["timestep"], context, transformer_options={})


def spec_attention(q, k, v, positive, negative_lengths, alpha, beta):
    """VSF-SPEC joint attention per sample, float64, `[B, H, L, D]`, text first `[P, N0 (padded), I]`:
    I rows W Z+ - alpha (1 - W) Z- with W = A+ / (A+ + A-) (eq. 7/8); P rows over {I, P}; N0 rows over
    {I, N0}; a sample's padded N slots are keys for nobody."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    length, slots = q.shape[2], max(negative_lengths)
    for b, n in enumerate(negative_lengths):
        s = q[b] @ k[b].transpose(-1, -2) / math.sqrt(q.shape[-1])
        p = list(range(positive))
        neg = list(range(positive, positive + n))
        img = list(range(positive + slots, length))
        ip, i_n = img + p, img + neg
        z_plus = torch.softmax(s[:, img][:, :, ip], -1) @ v[b][:, ip]
        out[b][:, p] = torch.softmax(s[:, p][:, :, ip], -1) @ v[b][:, ip]
        if n:
            log_w = torch.logsumexp(s[:, img][:, :, ip], -1) - torch.logsumexp(
                torch.cat([s[:, img][:, :, ip], s[:, img][:, :, neg] - beta], -1), -1)
            w = log_w.exp()[..., None]
            z_minus = torch.softmax(s[:, img][:, :, neg], -1) @ v[b][:, neg]
            out[b][:, img] = w * z_plus - alpha * (1 - w) * z_minus
            out[b][:, neg] = torch.softmax(s[:, neg][:, :, i_n], -1) @ v[b][:, i_n]
        else:
            out[b][:, img] = z_plus
    return out


def oracle(flux, model, negative_lengths, alpha, beta):
    """Patch of Neo's attention with the spec above, and of the text ids with the negative-pass ids
    (the negative's own token index 0..n-1 on axis 3), both written here."""
    from lib_vsf.patching import AttributePatch

    original_forward = model.forward_orig
    slots = max(negative_lengths)

    def attention_function(q, k, v, heads, *args, **kwargs):
        out = spec_attention(q, k, v, POSITIVE_LEN, negative_lengths, alpha, beta).to(q.dtype)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def forward_orig(img, img_ids, txt, txt_ids, *args, **kwargs):
        txt_ids = txt_ids.clone()
        txt_ids[:, POSITIVE_LEN:POSITIVE_LEN + slots, 3] = torch.arange(slots, dtype=txt_ids.dtype)
        return original_forward(img, img_ids, txt, txt_ids, *args, **kwargs)

    return AttributePatch().add(flux, "attention_function", attention_function).add(model, "forward_orig", forward_orig)


def test_patched_flux2_matches_the_spec_with_negative_pass_text_ids(neo):
    model = build_flux2(neo.flux)
    inp = inputs()
    lengths = [3, 1]  # different lengths: padded, masked per sample
    negative = negative_rows(lengths, CONTEXT_DIM)
    context = append_negative(inp["context"], negative)
    run = make_run(POSITIVE_LEN, negative, alpha=3.3, beta=0.2)
    ids_seen = []
    hook = model.pe_embedder.register_forward_pre_hook(lambda m, a: ids_seen.append(a[0].clone()))
    try:
        with NeoFlux2Adapter(holder(model)).patch(run):
            guided = forward(model, inp, context)
    finally:
        hook.remove()
    assert run.calls == 2  # one double-stream and one single-stream block
    text_ids = ids_seen[0][:, :POSITIVE_LEN + 3, 3]
    assert torch.equal(text_ids[0], torch.tensor([0., 1, 2, 3, 4, 5, 0, 1, 2]))  # [P: 0..5, N0: 0..2]
    with oracle(neo.flux, model, lengths, 3.3, 0.2):
        expected = forward(model, inp, context)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    unguided = forward(model, inp, inp["context"])
    assert (guided - unguided).abs().max() > 1e-3  # the negative changed the output


def test_unguided_calls_are_the_hosts_bit_for_bit_and_restore_is_exact(neo):
    flux = neo.flux
    model = build_flux2(flux)
    inp = inputs(seed=7)
    original = flux.attention_function
    unpatched = forward(model, inp, inp["context"])
    run = make_run(POSITIVE_LEN, negative_rows([0, 0], CONTEXT_DIM))  # empty negative / outside the window
    with NeoFlux2Adapter(holder(model)).patch(run):
        assert flux.attention_function is not original and "forward_orig" in model.__dict__
        same = forward(model, inp, inp["context"])
    assert run.calls == 0 and torch.equal(same, unpatched)
    negative = negative_rows([2, 2], CONTEXT_DIM)
    run = make_run(POSITIVE_LEN, negative)
    patch = NeoFlux2Adapter(holder(model)).patch(run).apply()
    try:
        with pytest.raises(RuntimeError):  # an exception mid-forward
            forward(model, {**inp, "x": inp["x"][:, :3]}, append_negative(inp["context"], negative))
    finally:
        patch.restore()
    assert flux.attention_function is original and "forward_orig" not in model.__dict__
    assert torch.equal(forward(model, inp, inp["context"]), unpatched)


def test_adapter_takes_flux2_and_leaves_flux1_to_the_flux_adapter(neo):
    from lib_vsf.webui.hosts import find_adapter

    flux2, flux1 = holder(build_flux2(neo.flux)), holder(build_flux1(neo.flux))
    assert NeoFlux2Adapter.matches(flux2) and not NeoFlux2Adapter.matches(flux1)
    assert not NeoFlux2Adapter.matches(object())
    assert isinstance(find_adapter(flux2), NeoFlux2Adapter)
    assert isinstance(find_adapter(flux1), NeoFluxAdapter)


def test_refuses_softly_when_the_host_differs(neo, monkeypatch):
    flux = neo.flux
    model = build_flux2(flux)
    engine = neo.klein.KleinTextProcessingEngine(text_encoder=None, tokenizer=None)
    NeoFlux2Adapter(holder(model, engine)).check()  # the real classes pass
    with pytest.raises(PatchError, match="Klein text engine"):
        NeoFlux2Adapter(holder(model, None)).check()
    monkeypatch.setattr(model, "txt_ids_dims", None)
    with pytest.raises(PatchError, match="txt_ids_dims"):
        NeoFlux2Adapter(holder(model, engine)).check()
    monkeypatch.undo()
    monkeypatch.setattr(flux, "attention_function", lambda q, k, v: None)  # a re-signed host function
    with pytest.raises(PatchError):
        NeoFlux2Adapter(holder(model, engine)).check()


class CausalEncoder(torch.nn.Module):
    """A stand-in for Neo's Qwen3 (whose config class refuses tiny sizes) with its call signature
    (embeds in, stacked intermediate layers out): position i depends on the tokens 0..i the mask allows."""

    def __init__(self, vocab, width=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, x, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True):
        mask = attention_mask[..., None].to(embeds.dtype)
        prefix = torch.cumsum(embeds * mask, 1) / torch.cumsum(mask, 1).clamp(min=1)
        layers = torch.stack([torch.tanh(prefix * (i + 1)) for i in range(len(intermediate_output))], 1)
        return prefix, layers


def test_negative_is_encoded_by_neos_klein_engine_without_padding(neo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(neo.root, KLEIN_TOKENIZER))
    encoder = CausalEncoder(max(len(tokenizer), 151644 + 1))
    engine = neo.klein.KleinTextProcessingEngine(text_encoder=encoder, tokenizer=tokenizer)
    prompt = "blurry, (watermark:1.2), low quality"
    with torch.no_grad():
        negative = encode_klein_negative(engine, prompt)
        padded = engine([prompt])[0]  # Neo's own encoding: padded to 512 with its pad id
    # The real tokens: Neo's chat template around the prompt, emphasis markup parsed away.
    real = sum(len(t) for t in engine.tokenize([t for t, _ in neo.klein.parsing.parse_prompt_attention(
        prompt, engine.emphasis.name)]))
    assert padded.shape[0] == 512 and negative.shape == (real, 3 * 8)  # padding rows dropped
    # = the negative pass's rows of its real tokens (emphasis normalised over the chunk as the host does)
    assert torch.equal(negative, padded[:real])
