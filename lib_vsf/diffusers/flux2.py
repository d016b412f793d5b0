"""Flux.2 Klein and Flux.2 dev (diffusers `Flux2Transformer2DModel` in `Flux2KleinPipeline` / `Flux2Pipeline`):
joint attention, text first, in double-stream and single-stream (parallel) blocks.

As for Flux.1 the negative tokens go before the positive ones in the text stream, `[N0, P, I]`, so image
and positive tokens stay one contiguous span for the fast path; single-stream blocks take the same mask
table. The negative is the pipeline's own `encode_prompt` of it (Qwen3 chat template, three stacked hidden
layers) at exactly its own token count, so it carries none of the padding to `max_sequence_length` that
the positive gets: the pipeline gives the transformer no text mask, so padding would be attended, and flipped. Flux.2 text ids are `(0, 0, 0, l)` with `l` the
token index and the image sits at `l = 0` whatever the text: the negative's ids are simply those of its
own tokens in a negative pass, `l = 0..n-1` (they coincide with P's, which N0 never attends to).
Klein's `guidance_scale` is CFG (a second pass) and is set to 1; Flux.2 dev has no CFG, its `guidance_scale`
is the distilled guidance embedding and stays the user's (the transformer's `guidance` input is never touched).
Flux.2 dev encodes with Mistral 3 behind the pipeline's system message, hidden layers 10 / 20 / 30. Reference images (`image=`) are not
supported yet (they would need their own rows of the mask table).
"""
from __future__ import annotations

import torch

from ..attention import joint_attention
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor, append_text, heads_merged
from .text import is_blank

DEFAULT_TEXT_LAYERS = (9, 18, 27)


def _rope(x: torch.Tensor, rotary_emb) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary_emb, sequence_dim=1)


def _check_plain(run, attn, attention_mask, kwargs, text_len):
    if attention_mask is not None:
        raise GuidanceInputError("VSF does not support an attention mask in Flux.2 attention")
    if kwargs:
        raise GuidanceInputError(f"VSF does not support Flux.2 attention with {', '.join(kwargs)} (KV cache)")
    if getattr(attn, "fused_projections", False):
        raise GuidanceInputError("VSF does not support fused QKV projections; call unfuse_qkv_projections()")
    if text_len != run.text_len:
        raise GuidanceInputError(f"Flux.2 text stream has {text_len} tokens, expected {run.text_len}")


def _guided(run, q, k, v, rotary_emb):
    """[B, L, H, D] projections, text first -> guided attention output [B, L, H*D]."""
    if rotary_emb is not None:
        q, k = _rope(q, rotary_emb), _rope(k, rotary_emb)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    layout = run.joint_layout(q.shape[2], text_offset=0)
    out = heads_merged(joint_attention(q, k, v, layout, run.guidance())).to(q.dtype)
    run.calls += 1
    return out


class Flux2DoubleVSFProcessor(GuidedProcessor):
    """Joint attention of one Flux.2 double-stream block: `[text, image]`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        run = self.run
        if not run.active or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 **kwargs)
        text_len = encoder_hidden_states.shape[1]
        _check_plain(run, attn, attention_mask, kwargs, text_len)

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        cq, ck, cv = (heads(proj(encoder_hidden_states)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        out = _guided(run, torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1), image_rotary_emb)
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, attn.to_add_out(text_out)


class Flux2SingleVSFProcessor(GuidedProcessor):
    """One Flux.2 single-stream block: attention over `[text, image]` fused with the MLP projections."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, **kwargs):
        run = self.run
        if not run.active:
            return self.original(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)
        _check_plain(run, attn, attention_mask, kwargs, run.text_len)
        if hidden_states.shape[1] < run.text_len:
            raise GuidanceInputError(f"Flux.2 single-stream sequence is shorter than its {run.text_len} text tokens")
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        out = _guided(run, q, k, v, image_rotary_emb)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2KleinFamily(FamilyAdapter):
    family = "flux2"
    label = "Flux.2 Klein"
    pipeline_prefixes = ("Flux2KleinPipeline",)
    negative_first = True
    cfg_kwarg = "guidance_scale"  # Klein's guidance_scale is CFG (a second pass); 1 turns it off
    text_layers = DEFAULT_TEXT_LAYERS

    def matches(self, pipe) -> bool:
        return type(pipe).__name__ in self.pipeline_prefixes

    def denoisers(self, pipe):
        return [("transformer", pipe.transformer)]

    def processor_for(self, name, original, run):
        if name.startswith("transformer_blocks.") and name.endswith(".attn.processor"):
            return Flux2DoubleVSFProcessor(original, run)
        if name.startswith("single_transformer_blocks.") and name.endswith(".attn.processor"):
            return Flux2SingleVSFProcessor(original, run)
        return None

    def single_pass_kwargs(self, kwargs):
        if kwargs.get("image") is not None:
            raise GuidanceInputError("VSF does not support Flux.2 reference images (image=...) yet")
        layers = kwargs.get("text_encoder_out_layers")
        if layers is not None and tuple(layers) != self.text_layers:
            raise GuidanceInputError(
                f"VSF encodes the negative with the pipeline's default text layers {self.text_layers}; "
                f"text_encoder_out_layers={tuple(layers)} is not supported")
        return super().single_pass_kwargs(kwargs)

    def encode_negative(self, pipe, prompt, settings):
        dim = pipe.transformer.config.joint_attention_dim
        if is_blank(prompt):
            return torch.zeros(0, dim)
        tokenizer = pipe.tokenizer
        if getattr(tokenizer, "padding_side", "right") != "right":
            # A negative pass would then put the negative's tokens at the end of the text ids.
            raise GuidanceInputError("VSF needs the Flux.2 tokenizer to pad on the right (padding_side='right'), "
                                     f"got {tokenizer.padding_side!r}")
        # The token count of the prompt as the pipeline tokenizes it (same chat template), truncated as it
        # truncates; encoding at exactly that length leaves no padding to strip.
        length = self._token_count(pipe, str(prompt), getattr(pipe, "tokenizer_max_length", 512) or 512)
        embeds, _ = pipe.encode_prompt(prompt=str(prompt), device=pipe._execution_device, max_sequence_length=length)
        return embeds[0]

    @staticmethod
    def _token_count(pipe, prompt: str, limit: int) -> int:
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        return len(pipe.tokenizer(text, truncation=True, max_length=limit).input_ids)

    def extend_inputs(self, kwargs, negative):
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = append_text(kwargs["encoder_hidden_states"], negative, True)
        txt_ids = kwargs.get("txt_ids")
        if txt_ids is not None:
            extra = txt_ids.new_zeros(*txt_ids.shape[:-2], negative.length, txt_ids.shape[-1])
            extra[..., -1] = torch.arange(negative.length, device=txt_ids.device, dtype=txt_ids.dtype)
            kwargs["txt_ids"] = torch.cat([extra, txt_ids], dim=-2)
        return kwargs


class Flux2DevFamily(Flux2KleinFamily):
    """Flux.2 dev (`Flux2Pipeline`): the same transformer, a Mistral 3 text encoder behind a system message,
    and no CFG at all: its `guidance_scale` is the distilled guidance embedding, which stays the user's."""

    label = "Flux.2 dev"
    pipeline_prefixes = ("Flux2Pipeline",)
    cfg_kwarg = None
    text_layers = (10, 20, 30)

    def single_pass_kwargs(self, kwargs):
        if kwargs.get("caption_upsample_temperature"):
            raise GuidanceInputError("VSF does not support Flux.2 prompt upsampling (caption_upsample_temperature)")
        return super().single_pass_kwargs(kwargs)

    @staticmethod
    def _token_count(pipe, prompt: str, limit: int) -> int:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input(prompts=[prompt], system_message=pipe.system_message)
        ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                                 return_dict=True, return_tensors="pt", truncation=True,
                                                 max_length=limit)["input_ids"]
        return int(ids.shape[-1])
