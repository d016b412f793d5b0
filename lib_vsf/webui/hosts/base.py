"""The interface every WebUI host adapter implements, and the small helpers they share.

One adapter class per host x model family (`ForgeMMDiTAdapter` in `forge_mmditx.py`, `ForgeFluxAdapter`
in `forge_flux.py`, `A1111SD3Adapter` in `a1111_sd3.py`, ...). The registry in `hosts/__init__.py` lists
them; `find_adapter(sd_model)` picks the first whose `matches()` is true. The generation runner
(`lib_vsf/webui/runner.py`) drives an adapter like this, once per generation:

    adapter = AdapterClass(sd_model)            # cheap; touches nothing
    adapter.check()                             # PatchError if the host code is not what we expect
    negative = adapter.encode_negative(p, p.negative_prompts, settings)   # NegativeText, unpadded
    ... for every sampling pass (first pass, hires pass):
    adapter.attach(p, ctx)                      # negative tokens into the text stream; one cond pass
    patch = adapter.patch(ctx.run)              # AttributePatch, not yet applied
    patch.apply(); try: <sample> finally: patch.restore()

Contract, in words:
- `matches(sd_model)` is a classmethod, has no side effects and never raises for a foreign model.
- `check()` inspects the names `patch()` will replace (existence, signature) and raises `PatchError`
  with a user-readable message when they differ; nothing is changed before this passed.
- `encode_negative()` returns one row per prompt, each *without padding* (CLIP: BOS + tokens + EOS;
  T5: tokens + EOS; zero-filled parts such as Forge's SD3 T5 slot with T5 off are not tokens). An empty
  prompt gives a row of 0 tokens (guidance is then a no-op for that image). Flux's lambda
  extrapolation is applied here (`lib_vsf.flux_lambda`). Pooled vectors stay positive-only.
- `attach()` makes the negative tokens reach the model's text stream for the model calls of the guided
  steps, and, when `ctx.single_pass`, makes the host run one conditional pass (no uncond batch).
  It may only change per-pass objects (e.g. Forge's cloned `UnetPatcher`, which Forge rebuilds before
  every pass) or register an undo with `ctx.add_undo`. For every model call it must call
  `ctx.run.set_text(positive_len, negative_rows_or_None)` before the model runs, so that the patched
  attention knows the text stream; `None` (outside the step window, or an uncond-only call) means the
  call runs exactly as without the extension.
- `patch(run)` returns an `AttributePatch` that replaces the narrowest module-level attention name(s).
  The replacement reads `run` on every call: when `run.negative_len == 0` it calls the original
  unchanged; otherwise it builds `run.joint_layout(...)` / `run.cross_layout(...)` and calls
  `lib_vsf.attention.joint_attention` / `cross_attention` with `run.guidance()`, then counts
  `run.calls += 1`.
- `backend_note()` returns a one-line message when the user's attention backend cannot carry the
  mask VSF needs (we then compute guided calls with PyTorch SDPA), else None.

`hosts/_negative_text.py` holds the Forge-family pieces (`attach_forge`: negative into `c_crossattn` through
the UnetPatcher's model-function wrapper plus one conditional pass; `host_encode`, `clip_chunk_lengths`,
`t5_length`, `unpad_clip_t5`, `t5_null_embedding`, `encode_each`) that other Forge-family adapters may reuse.

Everything here is host-free (no `modules.*` imports). Adapter modules are discovered automatically
(every module of `lib_vsf/webui/hosts/`, see `hosts/__init__.py`) and imported on every host, so they
must import host code (`modules.*`, `backend.*`, `ldm_patched.*`) lazily, inside `matches()` and the
methods, and `matches()` must return False when the host module is absent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from ...patching import AttributePatch
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText

COND, UNCOND = 0, 1  # chunk kinds, as Forge / ComfyUI number them in `cond_or_uncond`


@dataclass
class SamplingContext:
    """What one generation hands to its adapter for a sampling pass.

    `negative` has one row per image of the current batch (`p.negative_prompts` order), unpadded
    per row (mask marks real tokens). `run` is shared with the patched attention calls.
    """

    run: GuidanceRun
    negative: NegativeText
    single_pass: bool = True
    undo: list[Callable[[], None]] = field(default_factory=list)
    # Per-step facts the runner's step callback saw (e.g. "text_uncond"), for adapters that need them.
    host_state: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> VSFSettings:
        return self.run.settings

    def add_undo(self, fn: Callable[[], None]) -> None:
        """Register a cleanup; the runner calls them in reverse order in its `finally`."""
        self.undo.append(fn)

    def guided_now(self) -> bool:
        """The current step is inside the window and some image has a negative token (or there is a
        negative image, `run.negative_image`)."""
        return (self.settings.is_active(self.run.step, self.run.total_steps or 1)
                and (not self.negative.is_empty or self.run.negative_image is not None))

    @staticmethod
    def cond_rows(kinds: Sequence[int], batch: int) -> torch.Tensor:
        """[batch] bool: the rows of COND chunks in a model batch of `len(kinds)` equal chunks (all rows
        without kinds), the rows a negative image applies to."""
        if not kinds:
            return torch.ones(batch, dtype=torch.bool)
        per_chunk = batch // len(kinds)
        return torch.tensor([kind == COND for kind in kinds], dtype=torch.bool).repeat_interleave(per_chunk)

    def negative_for_chunks(self, kinds: Sequence[int], batch: int) -> NegativeText:
        """Negative rows for a model batch of `batch` rows made of `len(kinds)` equal chunks.
        COND chunks get the per-image negatives; UNCOND chunks get rows without tokens (mask all
        False), so those rows run exactly unguided even when batched with guided ones."""
        if not kinds:
            return self.negative.for_batch(batch)
        per_chunk = batch // len(kinds)
        guided = self.negative.for_batch(per_chunk)
        parts_e, parts_m = [], []
        for kind in kinds:
            parts_e.append(guided.embeds)
            parts_m.append(guided.mask if kind == COND else torch.zeros_like(guided.mask))
        return NegativeText(torch.cat(parts_e), torch.cat(parts_m))


class HostAdapter:
    """Base class of host x model-family adapters; see the module docstring for the contract."""

    name: ClassVar[str] = ""     # unique id, e.g. "forge-sd3"
    host: ClassVar[str] = ""     # "forge" | "a1111" | "neo" | "reforge"
    family: ClassVar[str] = ""   # "sd3" | "flux" | "wan" | "unet"
    label: ClassVar[str] = ""    # for messages, e.g. "Forge SD3/SD3.5"
    priority: ClassVar[int] = 100  # registry order, lower first (specific before generic)

    def __init__(self, sd_model: Any):
        self.sd_model = sd_model

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        """True when this adapter handles `sd_model` on the running host. No side effects."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise `PatchError` when the host code we would patch is not what we expect."""

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        """Unpadded negative embeddings, one row per prompt (see the module docstring)."""
        raise NotImplementedError

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        """Route the negative tokens into the text stream and force one conditional pass."""
        raise NotImplementedError

    def patch(self, run: GuidanceRun) -> AttributePatch:
        """Unapplied replacements of the module-level attention name(s), reading `run` per call."""
        raise NotImplementedError

    def backend_note(self) -> str | None:
        """A message when the user's attention backend cannot carry VSF's mask, else None."""
        return None

    def takes_negative_image(self) -> bool:
        """The loaded model takes reference images, so a negative image can join its image stream
        (docs/negative-images.md). False unless the adapter says otherwise."""
        return False

    def encode_negative_image(self, p: Any, image: Any) -> Any:
        """The negative image (a PIL RGB image) as the model's host encodes a reference image, in the
        form the adapter's patch appends it (Forge Neo: `_reference_tokens.ReferenceLatent`)."""
        raise NotImplementedError


# -- helpers shared by adapters -----------------------------------------------------------------------

def real_length(tokens: Sequence[int], end_id: int, has_start: bool) -> int:
    """Length of a padded token row up to and including its first end token (BOS + tokens + EOS for
    CLIP, tokens + EOS for T5). A row holding nothing but start/end tokens counts as empty (0)."""
    start = 1 if has_start else 0
    for i in range(start, len(tokens)):
        if tokens[i] == end_id:
            return 0 if i == start else i + 1
    return len(tokens)


def append_negative(context: torch.Tensor, negative: NegativeText) -> torch.Tensor:
    """`[B, L, E]` text context followed by the `[B, n, E]` negative rows (padding rows are zeros and
    masked out as keys by the layout)."""
    neg = negative.embeds.to(device=context.device, dtype=context.dtype)
    if neg.shape[0] != context.shape[0]:
        raise ValueError(f"negative has {neg.shape[0]} rows, text context {context.shape[0]}")
    if neg.shape[-1] != context.shape[-1]:
        raise ValueError(f"negative width {neg.shape[-1]} does not match the text context's {context.shape[-1]}")
    return torch.cat([context, neg], dim=1)


def to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, L, H*D]` -> `[B, H, L, D]`."""
    b, length, width = t.shape
    return t.view(b, length, heads, width // heads).transpose(1, 2)


def from_heads(t: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, D]` -> `[B, L, H*D]`."""
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b, length, h * d)
