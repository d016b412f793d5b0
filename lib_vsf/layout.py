"""Where positive and negative text tokens sit in an attention sequence.

Joint attention (MMDiT, Flux) runs one sequence holding image, positive and negative tokens; the order
depends on the host model, so the attention math reads roles from a `TokenLayout` instead of assuming
one. Everything that is neither positive, negative nor reference is an image token.

Reference-image tokens `R` (Flux Kontext, Qwen-Image-Edit: latents of the input images, appended to
the image tokens) are conditioning, not output (VSF-SPEC, "Families beyond the paper"):

    query \\ key |  I  |  P  |  R  |  N0 |  N1
    I           | yes | yes | yes |  no | yes, logit - beta
    P           | yes | yes | yes |  no | no
    R           | yes | yes | yes |  no | no
    N0          | yes |  no | yes | yes | no

so an R row is computed exactly like a P row, and an N0 row sees every key but P. `R` is never flipped.

Masks the model already uses for its positive text (Qwen-Image's text mask, Chroma's padding mask) are
`positive_mask[b, j]`: position `j` of the positive span is a real token of sample `b`; a padded
positive position is a key for nobody (as in the model's own pass).

Cross-attention (Wan, UNet `attn2`) uses the same layout over its *keys*: the text sequence
`[P, N]` (or `[image-conditioning, P, N]` handled by the caller) with image queries only.

A batch may carry negative prompts of different lengths: the negative span is padded to the longest
and `negative_mask[b, j]` tells whether position `j` of the span is a real token of sample `b`.
Padded positions are masked out as keys for every query.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE, POSITIVE, NEGATIVE, REFERENCE = 0, 1, 2, 3


@dataclass(frozen=True)
class TokenLayout:
    """Token roles of one attention sequence of `length` positions."""

    length: int
    positive: slice
    negative: slice
    negative_mask: torch.Tensor | None = None  # [B, negative_len] bool, True = real token
    reference: slice | None = None  # reference-image tokens R (None: the model has none)
    positive_mask: torch.Tensor | None = None  # [B, positive_len] bool, True = real token

    def __post_init__(self):
        spans = [("positive", self.positive), ("negative", self.negative)]
        if self.reference is not None:
            spans.append(("reference", self.reference))
        for name, span in spans:
            if span.step not in (None, 1) or not 0 <= span.start <= span.stop <= self.length:
                raise ValueError(f"{name} span {span} does not fit a sequence of {self.length}")
        for i, (name_a, a) in enumerate(spans):
            for name_b, b in spans[i + 1:]:
                if max(a.start, b.start) < min(a.stop, b.stop):
                    raise ValueError(f"{name_a} and {name_b} spans overlap")
        if self.negative_mask is not None and self.negative_mask.shape[-1] != self.negative_len:
            raise ValueError(
                f"negative mask covers {self.negative_mask.shape[-1]} tokens, span has {self.negative_len}"
            )
        if self.positive_mask is not None and self.positive_mask.shape[-1] != self.positive_len:
            raise ValueError(
                f"positive mask covers {self.positive_mask.shape[-1]} tokens, span has {self.positive_len}"
            )

    @property
    def negative_len(self) -> int:
        return self.negative.stop - self.negative.start

    @property
    def positive_len(self) -> int:
        return self.positive.stop - self.positive.start

    @property
    def reference_len(self) -> int:
        return 0 if self.reference is None else self.reference.stop - self.reference.start

    def roles(self, device=None) -> torch.Tensor:
        """[length] long tensor of IMAGE / POSITIVE / NEGATIVE / REFERENCE."""
        roles = torch.full((self.length,), IMAGE, dtype=torch.long, device=device)
        roles[self.positive] = POSITIVE
        roles[self.negative] = NEGATIVE
        if self.reference is not None:
            roles[self.reference] = REFERENCE
        return roles

    def positive_valid(self, batch: int, device=None) -> torch.Tensor:
        """[batch, positive_len] bool: real positive tokens (all True without a mask)."""
        if self.positive_mask is None:
            return torch.ones(batch, self.positive_len, dtype=torch.bool, device=device)
        mask = self.positive_mask.to(device=device, dtype=torch.bool)
        return mask.expand(batch, -1) if mask.shape[0] == 1 else mask

    def negative_valid(self, batch: int, device=None) -> torch.Tensor:
        """[batch, negative_len] bool: real negative tokens (all True without a mask)."""
        if self.negative_mask is None:
            return torch.ones(batch, self.negative_len, dtype=torch.bool, device=device)
        mask = self.negative_mask.to(device=device, dtype=torch.bool)
        return mask.expand(batch, -1) if mask.shape[0] == 1 else mask

    def has_negative(self, batch: int, device=None) -> torch.Tensor:
        """[batch] bool: samples that carry at least one negative token."""
        return self.negative_valid(batch, device).any(dim=-1)

    def non_negative_index(self, device=None) -> torch.Tensor:
        """Positions of image, positive and reference tokens, in sequence order."""
        return torch.nonzero(self.roles(device) != NEGATIVE, as_tuple=False).flatten()


def text_layout(positive_len: int, negative_len: int, negative_first: bool = False,
                offset: int = 0, total: int | None = None,
                negative_mask: torch.Tensor | None = None, reference: slice | None = None,
                positive_mask: torch.Tensor | None = None) -> TokenLayout:
    """Layout of a text stream `[P, N]` (or `[N, P]`) that starts at `offset` in a sequence of
    `total` positions (default: just the text); `reference`: where R tokens sit, if any."""
    total = offset + positive_len + negative_len if total is None else total
    if negative_first:
        negative = slice(offset, offset + negative_len)
        positive = slice(offset + negative_len, offset + negative_len + positive_len)
    else:
        positive = slice(offset, offset + positive_len)
        negative = slice(offset + positive_len, offset + positive_len + negative_len)
    return TokenLayout(total, positive, negative, negative_mask, reference, positive_mask)
