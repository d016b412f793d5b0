"""Per-generation guidance state shared by every patched attention call.

A `GuidanceRun` is created once per generation (never stored on a class), filled with the negative
prompt's token counts and the current step, and read by the attention processors / host patches to
build the `TokenLayout` and `Guidance` of each call. `NegativeText` holds encoded negative prompts for a
batch, padded to the longest with a mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import Guidance
from .layout import TokenLayout, text_layout
from .settings import VSFSettings


@dataclass
class NegativeText:
    """Encoded negative prompts, one row per sample: `embeds` [B, n, E], `mask` [B, n] (True = token)."""

    embeds: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_sequences(cls, sequences: list[torch.Tensor]) -> "NegativeText":
        """Pad per-sample `[n_i, E]` embeddings (n_i may be 0) to the longest; padded rows are zeros."""
        if not sequences:
            raise ValueError("no negative prompt embeddings given")
        longest = max(s.shape[0] for s in sequences)
        ref = sequences[0]
        embeds = ref.new_zeros(len(sequences), longest, ref.shape[-1])
        mask = torch.zeros(len(sequences), longest, dtype=torch.bool, device=ref.device)
        for i, s in enumerate(sequences):
            embeds[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        return cls(embeds, mask)

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    @property
    def is_empty(self) -> bool:
        """No sample has a negative token: guidance is a no-op and the plain pass runs."""
        return self.length == 0 or not bool(self.mask.any())

    def for_batch(self, batch: int) -> "NegativeText":
        """Rows for a model batch of `batch`: one negative is shared; k negatives for k*m images repeat
        each one m times in order (the pipelines' prompt-major batch order)."""
        rows = self.embeds.shape[0]
        if rows == batch:
            return self
        if batch % rows:
            raise ValueError(f"{rows} negative prompts do not divide a batch of {batch} images")
        repeat = batch // rows
        return NegativeText(self.embeds.repeat_interleave(repeat, 0), self.mask.repeat_interleave(repeat, 0))

    def trimmed(self) -> "NegativeText":
        """Drop trailing columns that are padding for every sample."""
        real_cols = self.mask.any(dim=0).nonzero()
        keep = int(real_cols.max()) + 1 if real_cols.numel() else 0
        return NegativeText(self.embeds[:, :keep], self.mask[:, :keep])

    def to(self, device=None, dtype=None) -> "NegativeText":
        return NegativeText(self.embeds.to(device=device, dtype=dtype), self.mask.to(device))


@dataclass
class GuidanceRun:
    """State of one generation: settings, the current step, and the text layout of the model's stream.

    `positive_len` / `negative_len` count text tokens as the model sees them in its text stream;
    `negative_first` says the negative tokens precede the positive ones in that stream (used by
    text-first joint models so that image and positive tokens stay contiguous).
    """

    settings: VSFSettings
    step: int = 0
    total_steps: int = 0
    positive_len: int = 0
    negative_len: int = 0
    negative_mask: torch.Tensor | None = None
    negative_first: bool = False
    calls: int = field(default=0)  # attention calls guided so far (for tests and diagnostics)

    def set_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = int(step), int(total_steps)

    @property
    def active(self) -> bool:
        """Guidance applies at this step (inside [start, end)) and there is a negative to apply."""
        return self.negative_len > 0 and self.settings.is_active(self.step, self.total_steps or 1)

    def guidance(self) -> Guidance:
        return Guidance.from_settings(self.settings, self.settings.alpha_at(self.step, self.total_steps or 1))

    @property
    def text_len(self) -> int:
        return self.positive_len + self.negative_len

    def set_text(self, positive_len: int, negative: NegativeText | None, negative_first: bool = False) -> None:
        """Record the text stream the model is about to see: positive tokens plus `negative`."""
        self.positive_len = int(positive_len)
        self.negative_first = negative_first
        if negative is None or negative.is_empty:
            self.negative_len, self.negative_mask = 0, None
        else:
            self.negative_len = negative.length
            self.negative_mask = None if bool(negative.mask.all()) else negative.mask

    def joint_layout(self, sequence_len: int, text_offset: int) -> TokenLayout:
        """Layout of a joint sequence whose text stream starts at `text_offset`."""
        return text_layout(self.positive_len, self.negative_len, self.negative_first,
                           offset=text_offset, total=sequence_len, negative_mask=self.negative_mask)

    def cross_layout(self, text_offset: int = 0, total: int | None = None) -> TokenLayout:
        """Layout of cross-attention keys: the text stream starts at `text_offset`."""
        return text_layout(self.positive_len, self.negative_len, self.negative_first,
                           offset=text_offset, total=total, negative_mask=self.negative_mask)
