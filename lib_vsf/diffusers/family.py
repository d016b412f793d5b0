"""What a diffusers model family adapter provides; the shared processor base.

One adapter per family (sd3.py, flux.py, chroma.py, wan.py, unet.py, zimage.py, flux2.py, qwenimage.py), each
the same shape:

- `matches(pipe)`: is this pipeline of the family?
- `denoisers(pipe)`: the models whose attention gets processors (Wan 2.2 has two).
- `processor_for(name, original, run)`: our processor for one attention module, or None to leave it.
- `encode_negative(pipe, prompt, settings, **encoding)`: `[n, E]` unpadded negative embeddings in the
  model's text-stream space (before the model's own context projection); `encoding` is what
  `text_encoding(pipe)` reports for the running pipeline call (e.g. the UNets' `clip_skip`).
- `for_pipeline(pipe)`: the adapter adjusted to this pipeline (e.g. which kwarg is CFG).
- `extend_inputs(kwargs, negative)`: the denoiser's forward kwargs with the negative tokens added to
  the text stream (and any position ids that must grow with it).
- `single_pass_kwargs(kwargs)`: pipeline kwargs that make the run one conditional pass; guidance
  embeddings that are not CFG (Flux's distilled guidance, LCM's w-embedding) keep the caller's value.
- `register_step_hook(model, hook)`: attach `VSFGuidance`'s per-call hook to a denoiser; returns a
  handle whose `remove()` undoes everything the adapter attached (families whose denoiser is not
  called with `encoder_hidden_states=` override it).
- `latent_grid(model, args, kwargs)`: where the image tokens of the denoiser call sit (a `LatentGrid`:
  patch size, packing), for the negative-attention map; None (the default) = not available, the map
  then stays flat `[B, tokens]`.
- `negative_needs_call`: True when the negative's encoding needs the pipeline call's inputs (Qwen-Image-Edit
  encodes every prompt with the input image): it is then encoded per call from `text_encoding(pipe)`,
  never on entry, and direct denoiser calls (`VSFGuidance.direct_calls`) are refused.
"""
from __future__ import annotations

from typing import Any

import torch

from ..state import GuidanceRun, NegativeText


class UnsupportedPipelineError(TypeError):
    """The pipeline is not of a supported family; the message names the supported ones."""


class GuidanceInputError(ValueError):
    """The inputs do not fit guidance (batch/negative mismatch, unexpected text length...)."""


class GuidanceConflictError(RuntimeError):
    """Another VSFGuidance guides this denoiser, or the denoiser is called outside the guidance that
    owns it: refused before anything is computed on the wrong steps or text."""


class GuidedProcessor:
    """Base of our attention processors: runs the original processor whenever guidance is off for
    this call, so an unguided step is the model's own computation, bit for bit."""

    def __init__(self, original, run: GuidanceRun):
        self.original = original
        self.run = run

    def unguided(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def attend(attention, q, k, v, layout, run: GuidanceRun):
    """`attention(q, k, v, layout, run.guidance())` (joint_attention or cross_attention), handing over
    the run's negative-map recorder only when one records: without the map the call is unchanged."""
    if run.negative_map is None:
        return attention(q, k, v, layout, run.guidance())
    return attention(q, k, v, layout, run.guidance(), negative_share=run.negative_map)


def heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    batch, length, _ = t.shape
    return t.view(batch, length, heads, -1).transpose(1, 2)


def heads_merged(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    batch, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * dim)


def append_text(hidden: torch.Tensor, negative: NegativeText, negative_first: bool) -> torch.Tensor:
    """The text stream with the negative tokens added before or after the positive ones."""
    neg = negative.embeds.to(device=hidden.device, dtype=hidden.dtype)
    return torch.cat([neg, hidden], dim=1) if negative_first else torch.cat([hidden, neg], dim=1)


class FamilyAdapter:
    """Defaults shared by the family adapters; see the module docstring."""

    family = ""
    label = ""
    pipeline_prefixes: tuple[str, ...] = ()
    negative_first = False
    # pipeline kwarg that turns CFG off when set to 1 (None: the pipeline has no CFG to turn off)
    cfg_kwarg: str | None = "guidance_scale"
    # the negative is encoded per pipeline call, with that call's inputs (see the module docstring)
    negative_needs_call = False

    def for_pipeline(self, pipe) -> "FamilyAdapter":
        """This adapter adjusted to `pipe` (a fresh adapter is made for every VSFGuidance)."""
        return self

    def text_encoding(self, pipe) -> dict[str, Any]:
        """Text-encoder settings of the running pipeline call that the negative must follow."""
        return {}

    def matches(self, pipe) -> bool:
        name = type(pipe).__name__
        return any(name.startswith(prefix) for prefix in self.pipeline_prefixes)

    def denoisers(self, pipe) -> list[tuple[str, torch.nn.Module]]:
        return [(n, getattr(pipe, n)) for n in ("transformer", "transformer_2", "unet")
                if getattr(pipe, n, None) is not None]

    def single_pass_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if self.cfg_kwarg:
            kwargs[self.cfg_kwarg] = 1.0
        for key in ("negative_prompt", "negative_prompt_2", "negative_prompt_3", "negative_prompt_embeds",
                    "negative_pooled_prompt_embeds"):
            kwargs.pop(key, None)
        return kwargs

    def extend_inputs(self, kwargs: dict[str, Any], negative: NegativeText) -> dict[str, Any]:
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = append_text(kwargs["encoder_hidden_states"], negative, self.negative_first)
        return kwargs

    def register_step_hook(self, model: torch.nn.Module, hook):
        return model.register_forward_pre_hook(hook, with_kwargs=True)

    def latent_grid(self, model, args, kwargs):
        """The `LatentGrid` of this denoiser call, or None: the family does not say (see docstring)."""
        return None

    def positive_length(self, kwargs: dict[str, Any]) -> int:
        return kwargs["encoder_hidden_states"].shape[1]
