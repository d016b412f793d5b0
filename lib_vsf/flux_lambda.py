"""Flux's negative-embedding extrapolation (paper eq. 10) and its null embedding `p0`: the one definition
that the diffusers pipelines (`lib_vsf/diffusers/flux.py`) and the WebUI hosts (`lib_vsf/webui/hosts/_negative_text.py`,
Forge and Forge Neo) both call.

    p-  <-  p- + lambda * (p- - p0)

`p0` is the Compel-style null condition: the mean T5 embedding of the padding positions of the *empty*
prompt, i.e. of `[EOS, PAD, PAD, ...]`, encoded by the same T5 encoder the model's prompts go through,
padded to the length that path pads its prompts to, with no attention mask (Flux encodes its prompts
without one).

Why the empty prompt, and not the negative's own padding: the negative's padding positions attend to
the negative's tokens (no mask), so their mean would carry the negative itself and change from prompt
to prompt; and a negative that fills the whole T5 chunk has no padding at all, leaving no `p0`. The
empty prompt's padding is the model's null condition, one vector per encoder, defined for every
negative, and the same whichever host computes it.
"""
from __future__ import annotations

from typing import Callable

import torch


def empty_prompt_ids(eos_id: int, pad_id: int, length: int) -> torch.Tensor:
    """`[1, length]` token ids of the empty prompt as T5 tokenizers pad it: EOS, then padding."""
    if length < 2:
        raise ValueError(f"the padded empty prompt needs at least one padding position (length {length})")
    return torch.tensor([[eos_id] + [pad_id] * (length - 1)], dtype=torch.long)


def null_embedding(encode: Callable[[torch.Tensor], torch.Tensor], eos_id: int, pad_id: int,
                   length: int) -> torch.Tensor:
    """`p0` `[E]` (float32): the mean over the padding positions of `encode(empty_prompt_ids(...))`.

    `encode` maps `[1, length]` ids to the encoder's `[1, length, E]` output, the way the caller's
    host encodes a prompt (same encoder, same dtype, no attention mask)."""
    with torch.no_grad():
        hidden = encode(empty_prompt_ids(eos_id, pad_id, length))
    if hidden.ndim != 3 or hidden.shape[:2] != (1, length):
        raise ValueError(f"T5 encoder returned shape {tuple(hidden.shape)} for [1, {length}] token ids")
    return hidden[0, 1:].float().mean(dim=0)


def extrapolate_negative(negative: torch.Tensor, null: torch.Tensor, flux_lambda: float) -> torch.Tensor:
    """Paper eq. 10, `p- + lambda * (p- - p0)`, on the unpadded negative `[n, E]` (`null` broadcast over
    its tokens), computed in float32 and returned in the negative's dtype. `lambda = 0` returns the
    negative unchanged."""
    if flux_lambda == 0 or negative.shape[0] == 0:
        return negative
    if null.shape[-1] != negative.shape[-1]:
        raise ValueError(f"null embedding width {null.shape[-1]} does not match the negative's {negative.shape[-1]}")
    work = negative.float()
    pushed = work + flux_lambda * (work - null.to(device=work.device, dtype=torch.float32))
    return pushed.to(negative.dtype)
