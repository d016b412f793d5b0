"""Negative-prompt encoding without padding, through a pipeline's own tokenizers and text encoders.

The positive prompt keeps its padding (the model was trained with it); the negative prompt must not:
sign-flipped padding tokens ruin images (paper, appendix C). CLIP gives BOS + tokens + EOS (and is
causal, so these equal the first positions of the padded encoding); T5 gives tokens + EOS.
An empty (or blank) negative prompt has no tokens at all, so it changes nothing.
"""
from __future__ import annotations

import torch


def is_blank(prompt: str | None) -> bool:
    return prompt is None or not str(prompt).strip()


def unpadded_ids(tokenizer, prompt: str, max_length: int | None = None) -> torch.Tensor:
    """Token ids of `prompt` with the tokenizer's special tokens and no padding, truncated to
    `max_length` (default: the tokenizer's model_max_length). Shape [1, n]."""
    if max_length is None:
        max_length = getattr(tokenizer, "model_max_length", None)
        if max_length is None or max_length > 100_000:  # "unlimited" sentinel of some tokenizers
            max_length = 512
    ids = tokenizer(prompt, padding=False, truncation=True, max_length=max_length,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return ids


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def clip_hidden_states(tokenizer, text_encoder, prompt: str, layer: int = -2,
                       final_layer_norm: bool = False) -> torch.Tensor:
    """Unpadded CLIP hidden states `[n, hidden]` of `prompt` (BOS + tokens + EOS).

    `layer=-2` is the penultimate layer (SD3, SDXL); `layer=-1` with `final_layer_norm` is SD1.5's
    `last_hidden_state`; an earlier layer with `final_layer_norm` is SD1.5's clip skip (the pipeline
    passes the skipped layer through the final layer norm)."""
    if is_blank(prompt):
        return torch.zeros(0, text_encoder.config.hidden_size, dtype=text_encoder.dtype)
    ids = unpadded_ids(tokenizer, prompt).to(_device_of(text_encoder))
    out = text_encoder(ids, output_hidden_states=True)
    if layer == -1 and final_layer_norm:
        return out.last_hidden_state[0]
    if final_layer_norm:  # transformers < 5 nests the layers under `.text_model`
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        return norm(out.hidden_states[layer])[0]
    return out.hidden_states[layer][0]


def t5_hidden_states(tokenizer, text_encoder, prompt: str, max_length: int) -> torch.Tensor:
    """Unpadded T5 / UMT5 encoder output `[n, d_model]` of `prompt` (tokens + EOS)."""
    if is_blank(prompt):
        return torch.zeros(0, text_encoder.config.d_model, dtype=text_encoder.dtype)
    ids = unpadded_ids(tokenizer, prompt, max_length).to(_device_of(text_encoder))
    mask = torch.ones_like(ids)
    return text_encoder(ids, attention_mask=mask)[0][0]
