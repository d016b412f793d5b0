"""Per-generation guidance state shared by every patched attention call.

A `GuidanceRun` is created once per generation (never stored on a class), filled with the negative
prompt's token counts and the current step, and read by the attention processors / host patches to
build the `TokenLayout` and `Guidance` of each call. `NegativeText` holds encoded negative prompts for a
batch, padded to the longest with a mask. `NegativeShareMap` (optional, `GuidanceRun.negative_map`) is
the running "where the negative acts" map of one generation; `LatentGrid` tells it where the image
tokens sit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

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
class NegativeImage:
    """A negative image as image-stream tokens (docs/negative-images.md): `tokens` [1, n, C], the packed
    latents in the denoiser's image-input space (encoded as the pipeline encodes a reference image),
    shared by every sample; `positions`: the family's position data for them (Flux Kontext: ids [n, 3]).
    They go first in the image stream, right after the text negative: the joint sequence is
    `[P, N_txt | N_img, I, R]`, one N span."""

    tokens: torch.Tensor
    positions: Any = None

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class LatentGrid:
    """Where a model's image tokens sit: `frames` x `height` x `width` tokens at the finest attention
    resolution (after patchifying / packing), frame-major then row-major. `video`: frames is a real
    axis (kept in the map's shape)."""

    frames: int
    height: int
    width: int
    video: bool = False

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    def shape_for(self, tokens: int) -> tuple[int, int, int] | None:
        """(frames, h, w) of an attention layer holding `tokens` image tokens: the grid itself or the
        grid downsampled by 2, 4, ... (UNet levels; odd sizes round up), None when nothing fits."""
        for factor in (1, 2, 4, 8, 16, 32):
            shape = (self.frames, -(-self.height // factor), -(-self.width // factor))
            if shape[0] * shape[1] * shape[2] == tokens:
                return shape
        return None


NEGATIVE_MAP_UNDEFINED = ("the negative-attention map is defined for VSF only: {method} has no attention "
                          "weight W on the negative (paper eq. 8)")


class NegativeShareMap:
    """Where the negative acts: per image token, the share of attention mass on the flipped negative,
    1 - W = A- / (A+ + A-) (paper eq. 8), averaged over heads (by the attention call), over the guided
    attention layers of a step, and over the guided steps.

    The attention functions hand over one `[B, image tokens]` float32 tensor per call (`add`); this
    keeps a running sum and a call count per step (and per token count: UNet levels differ), so memory
    is O(image tokens) per step, never per layer. `step_of` returns the current step (the run's).
    A new pass through the same object should call `reset()` first. `undefined_reason` is set for
    methods without W (NAG, NASA): nothing is recorded and the readers return None / {}.
    """

    def __init__(self, step_of: Callable[[], int] = lambda: 0, undefined_reason: str | None = None):
        self._step_of = step_of
        self.undefined_reason = undefined_reason
        self.grid: LatentGrid | None = None
        self._sums: dict[int, dict[int, list]] = {}  # step -> image tokens -> [sum [B, L], calls]

    def reset(self) -> None:
        self._sums = {}

    def add(self, share: torch.Tensor) -> None:
        """Record one attention call's head-mean share, `[B, image tokens]`."""
        if self.undefined_reason is not None:
            return
        share = share.detach().float()
        per_step = self._sums.setdefault(int(self._step_of()), {})
        entry = per_step.get(share.shape[-1])
        if entry is None or entry[0].shape != share.shape:  # first call (or another batch size)
            per_step[share.shape[-1]] = [share.clone(), 1]
        else:
            entry[0].add_(share)
            entry[1] += 1

    @property
    def steps(self) -> list[int]:
        """The steps that recorded at least one guided attention call, in order."""
        return sorted(self._sums)

    def _step_map(self, per_tokens: dict[int, list]) -> torch.Tensor:
        """One step's mean over its calls: [B, h, w] (image grid), [B, frames, h, w] (video grid), or
        [B, tokens] without a grid (then only the finest level, the others cannot be placed)."""
        grid = self.grid
        shaped = None if grid is None else {n: grid.shape_for(n) for n in per_tokens}
        if shaped is None or any(v is None for v in shaped.values()):
            finest = max(per_tokens)
            total, calls = per_tokens[finest]
            return total / calls
        acc, calls_all = None, 0
        for n, (total, calls) in per_tokens.items():
            frames, h, w = shaped[n]
            level = total.reshape(total.shape[0] * frames, 1, h, w)
            if (h, w) != (grid.height, grid.width):  # a coarser UNet level: resampled to the grid
                level = F.interpolate(level, size=(grid.height, grid.width), mode="bilinear", align_corners=False)
            acc = level if acc is None else acc + level  # sums of calls, so levels weigh by call count
            calls_all += calls
        out = (acc / calls_all).reshape(-1, grid.frames, grid.height, grid.width)
        return out if grid.video else out[:, 0]

    def per_step(self) -> dict[int, torch.Tensor]:
        """{step: map of that step} for every guided step (see `_step_map` for the shapes)."""
        if self.undefined_reason is not None:
            return {}
        return {step: self._step_map(self._sums[step]) for step in self.steps}

    def mean(self) -> torch.Tensor | None:
        """The map averaged over the guided steps; None when nothing was recorded (or undefined)."""
        maps = list(self.per_step().values())
        if not maps or any(m.shape != maps[0].shape for m in maps):
            return maps[-1] if maps else None
        return torch.stack(maps).mean(dim=0)


@dataclass
class GuidanceRun:
    """State of one generation: settings, the current step, and the text layout of the model's stream.

    `positive_len` / `negative_len` count text tokens as the model sees them in its text stream;
    `negative_first` says the negative tokens precede the positive ones in that stream (used by
    text-first joint models so that image and positive tokens stay contiguous).
    `negative_image_len`: of the `negative_len` negative tokens, how many are a negative image's tokens
    at the start of the image stream (`[P, N_txt | N_img, I, R]`, docs/negative-images.md); they are
    not part of the text stream.
    """

    settings: VSFSettings
    step: int = 0
    total_steps: int = 0
    positive_len: int = 0
    negative_len: int = 0
    negative_mask: torch.Tensor | None = None
    negative_first: bool = False
    negative_image_len: int = 0
    # A negative image as the host's model takes it, for adapters whose model builds its image stream
    # itself (Forge Neo: a `ReferenceLatent` its `forward` appends as one more reference); a model call
    # carries it when `set_text` was given its `negative_image_len`. None without a negative image.
    negative_image: Any = None
    calls: int = field(default=0)  # attention calls guided so far (for tests and diagnostics)
    # "Where the negative acts" recorder, None unless asked for (`record_negative_map`); the attention
    # callers pass it as `negative_share=`.
    negative_map: NegativeShareMap | None = None

    def record_negative_map(self) -> NegativeShareMap:
        """Start recording the negative-attention map of this generation (VSF only; for NAG / NASA the
        map says why it is undefined and stays empty)."""
        method = self.settings.method
        reason = None if method == "vsf" else NEGATIVE_MAP_UNDEFINED.format(method=method.upper())
        self.negative_map = NegativeShareMap(lambda: self.step, reason)
        return self.negative_map

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
        """Tokens of the text stream: positive plus text negative (a negative image is image stream)."""
        return self.positive_len + self.negative_len - self.negative_image_len

    def set_text(self, positive_len: int, negative: NegativeText | None, negative_first: bool = False,
                 negative_image_len: int = 0, negative_image_rows: torch.Tensor | None = None) -> None:
        """Record the text stream the model is about to see: positive tokens plus `negative`, and
        `negative_image_len` negative-image tokens first in the image stream (then the text negative
        must come last in the text stream, so that N is one span). `negative_image_rows` ([B] bool):
        the samples that carry the image negative (default: all); the others see none of its tokens,
        as a sample whose text negative is empty sees none of that (CFG's uncond rows in a batch)."""
        self.positive_len = int(positive_len)
        self.negative_first = negative_first
        image_len = int(negative_image_len)
        if image_len and negative_first:
            raise ValueError("a negative image follows the text negative: the text stream must be [P, N]")
        text = None if negative is None or negative.is_empty else negative
        self.negative_image_len = image_len
        self.negative_len = (0 if text is None else text.length) + image_len
        if not image_len:
            self.negative_mask = None if text is None or bool(text.mask.all()) else text.mask
            return
        if negative_image_rows is None:  # the image negative's tokens are real for every sample
            if text is None:
                self.negative_mask = None
                return
            rows = text.mask.new_ones(text.mask.shape[0])
        else:
            rows = negative_image_rows.to(dtype=torch.bool)
        text_mask = rows.new_zeros(rows.shape[0], 0) if text is None else text.mask.to(rows.device)
        if text_mask.shape[0] != rows.shape[0]:
            raise ValueError(f"{rows.shape[0]} negative-image rows for {text_mask.shape[0]} negative rows")
        mask = torch.cat([text_mask, rows[:, None].expand(-1, image_len)], dim=1)
        self.negative_mask = None if bool(mask.all()) else mask

    def joint_layout(self, sequence_len: int, text_offset: int, reference: slice | None = None,
                     positive_mask: torch.Tensor | None = None) -> TokenLayout:
        """Layout of a joint sequence whose text stream starts at `text_offset`; `reference`: the
        positions of reference-image tokens (Kontext, Qwen-Image-Edit), `positive_mask`: the model's own
        mask of its positive text (see `lib_vsf.layout`)."""
        return text_layout(self.positive_len, self.negative_len, self.negative_first,
                           offset=text_offset, total=sequence_len, negative_mask=self.negative_mask,
                           reference=reference, positive_mask=positive_mask)

    def cross_layout(self, text_offset: int = 0, total: int | None = None) -> TokenLayout:
        """Layout of cross-attention keys: the text stream starts at `text_offset`."""
        return text_layout(self.positive_len, self.negative_len, self.negative_first,
                           offset=text_offset, total=total, negative_mask=self.negative_mask)
