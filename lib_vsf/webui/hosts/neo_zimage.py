"""Forge Neo: Z-Image / Z-Image Turbo (`backend/nn/lumina.py` `NextDiT` with a caption pad token).

Neo's NextDiT embeds the caption (`cap_embedder`), pads it to a multiple of 32 with a learned pad token,
refines it (`context_refiner`) and the image (`noise_refiner`), then runs unified blocks over
`[caption, image]`; every attention is the module-level `backend.nn.lumina.attention_function(q, k, v,
heads, mask, skip_reshape=True, ...)` after RoPE. VSF (VSF-SPEC "Families beyond the paper"):

- The negative is Neo's own Qwen3 engine output for it (chat template, hidden state -2, emphasis; that
  engine does not pad). The Forge-family glue appends it to the text context as for every family.
- `patchify_and_embed` of this model is wrapped: it splits the embedded context back into P and N
  (`cap_embedder` is per token), runs Neo's own patchify on P alone (so P, its pad tokens, the image and
  every position are exactly the unguided pass's), refines each negative *alone* through the
  `context_refiner` (N0 never sees P there, P never sees N0), and appends N0 after the image:
  `[P (padded), I, N0]`, so I and P stay one contiguous span.
- Positions: N0 token j gets axis-0 position `C - ceil32(n) + 1 + j` (C: padded caption length, the
  image sitting at `C + 1`), its negative-pass offset to the image; rotations from Neo's own `EmbedND`.
- Unified blocks: the replaced `attention_function` guides the calls whose sequence is exactly that
  unified `[P, I, N0]` (the refiners' calls have other lengths) with the shared `joint_attention`.

Lumina 2 (the same class, without the caption pad token, with a Gemma engine) is not covered: `matches`
requires the pad token.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...layout import TokenLayout
from ...patching import AttributePatch, PatchError, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import (batch_fits, check_attention_function, class_is, diffusion_model, guided_call, is_forge_neo,
                      split_mask_arg, warn_once)
from .base import HostAdapter, SamplingContext

LUMINA_MODULE = "backend.nn.lumina"


def is_zimage(model: Any) -> bool:
    """Neo's NextDiT built as Z-Image (captions padded with a learned pad token)."""
    return class_is(model, LUMINA_MODULE, "NextDiT") and getattr(model, "pad_tokens_multiple", None) is not None


def padded(n: int, multiple: int) -> int:
    return n + (-n) % multiple


def negative_position_ids(caption_len: int, negative_len: int, slots: int, multiple: int, device) -> torch.Tensor:
    """`[slots, 3]` float ids of a negative of `negative_len` tokens beside a caption padded to
    `caption_len` (see the module docstring); slots past `negative_len` are masked batch padding."""
    ids = torch.zeros(slots, 3, dtype=torch.float32, device=device)
    ids[:, 0] = caption_len - padded(negative_len, multiple) + 1 + torch.arange(slots, dtype=torch.float32, device=device)
    return ids


@dataclass
class UnifiedSequence:
    """The guided unified sequence of the current model call: `[P (caption_len), I (image_len), N0 (slots)]`."""

    caption_len: int
    image_len: int
    slots: int

    @property
    def length(self) -> int:
        return self.caption_len + self.image_len + self.slots

    def layout(self, negative_mask) -> TokenLayout:
        start = self.caption_len + self.image_len
        return TokenLayout(self.length, slice(0, self.caption_len), slice(start, self.length), negative_mask)


class GuidedZImage:
    """The two replacements of one patch, sharing what the current model call built."""

    def __init__(self, model, run: GuidanceRun):
        self.model = model
        self.run = run
        self.unified: UnifiedSequence | None = None

    def patchify_and_embed(self, original):
        signature = inspect.signature(original)
        run, model = self.run, self.model

        @functools.wraps(original)
        def patchify_and_embed(*args, **kwargs):
            self.unified = None
            call = signature.bind(*args, **kwargs)
            cap_feats = call.arguments["cap_feats"]
            if run.negative_len == 0 or cap_feats.shape[1] != run.text_len:
                return original(*args, **kwargs)
            if call.arguments.get("cap_mask") is not None:
                warn_once("neo-zimage-mask", "Z-Image caption mask present: this call runs without VSF.")
                call.arguments["cap_feats"] = cap_feats[:, :run.positive_len]
                return original(*call.args, **call.kwargs)
            positive, negative = cap_feats[:, :run.positive_len], cap_feats[:, run.positive_len:]
            call.arguments["cap_feats"] = positive
            full, mask, img_sizes, cap_sizes, freqs = original(*call.args, **call.kwargs)
            caption_len = int(cap_sizes[0])
            if mask is not None or any(int(c) != caption_len for c in cap_sizes):
                warn_once("neo-zimage-batch", "Z-Image batch with a padding mask: this call runs without VSF.")
                return full, mask, img_sizes, cap_sizes, freqs
            options = call.arguments.get("transformer_options", {})
            hidden, rotations = self._negative_tokens(negative, caption_len, freqs.dtype, options)
            self.unified = UnifiedSequence(caption_len, full.shape[1] - caption_len, negative.shape[1])
            return (torch.cat([full, hidden.to(full.dtype)], 1), mask, img_sizes, cap_sizes,
                    torch.cat([freqs, rotations.to(freqs)], 1))

        patchify_and_embed.__vsf_original__ = original
        return patchify_and_embed

    def _negative_tokens(self, negative: torch.Tensor, caption_len: int, dtype, options):
        """Each sample's negative refined alone at its positions; rows past its length stay zero."""
        model, run = self.model, self.run
        batch, slots, width = negative.shape
        mask = run.negative_mask
        counts = [slots] * batch if mask is None else [int(m) for m in mask.expand(batch, -1).sum(-1).tolist()]
        hidden = negative.new_zeros(batch, slots, width)
        rotations = []
        for i, n in enumerate(counts):
            ids = negative_position_ids(caption_len, n, slots, model.pad_tokens_multiple, negative.device)
            rot = model.rope_embedder(ids[None]).movedim(1, 2).to(dtype)  # as Neo's patchify builds them
            rotations.append(rot)
            if n:
                x = negative[i:i + 1, :n]
                for layer in model.context_refiner:
                    x = layer(x, None, rot[:, :n], transformer_options=options)
                hidden[i, :n] = x[0]
        return hidden, torch.cat(rotations)

    def attention_function(self, original):
        run = self.run

        def zimage_attention_function(q, k, v, heads, *args, **kwargs):
            unified = self.unified
            skip_reshape = kwargs.get("skip_reshape", False)
            length = q.shape[2] if skip_reshape else q.shape[1]
            if (unified is None or run.negative_len == 0 or length != unified.length
                    or split_mask_arg(args, kwargs) is not None or not batch_fits(run, q.shape[0])):
                return original(q, k, v, heads, *args, **kwargs)
            return guided_call(q, k, v, heads, unified.layout(run.negative_mask), run, joint=True,
                               skip_reshape=skip_reshape, skip_output_reshape=kwargs.get("skip_output_reshape", False))

        zimage_attention_function.__vsf_original__ = original
        return zimage_attention_function


class NeoZImageAdapter(HostAdapter):
    """Forge Neo Z-Image / Z-Image Turbo: VSF in the unified blocks, the negative refined alone."""

    name = "neo-zimage"
    host = "neo"
    family = "zimage"
    label = "Forge Neo Z-Image"
    priority = 20

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return is_zimage(diffusion_model(sd_model)) and is_forge_neo()

    def _module(self):
        from backend.nn import lumina  # type: ignore[import-not-found]
        return lumina

    def check(self) -> None:
        self._check_model()
        engine = getattr(self.sd_model, "text_processing_engine_gemma", None)
        if engine is None or not callable(engine):
            raise PatchError("the Z-Image model has no Qwen3 text engine (host version not supported)")

    def _check_model(self) -> None:
        check_attention_function(self._module(), "attention_function", ("mask", "skip_reshape"))
        model = diffusion_model(self.sd_model)
        check_callable(model, "patchify_and_embed", ("x", "cap_feats", "cap_mask", "t"))
        for name in ("context_refiner", "rope_embedder", "cap_embedder"):
            if getattr(model, name, None) is None:
                raise PatchError(f"Neo's NextDiT has no {name} (host version not supported)")

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        """Neo's Qwen3 engine on each negative (it does not pad): the negative pass's own conditioning."""
        engine = self.sd_model.text_processing_engine_gemma
        return _negative_text.encode_with_engine(self.sd_model, engine, negative_prompts)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        self._check_model()
        lumina, model = self._module(), diffusion_model(self.sd_model)
        guided = GuidedZImage(model, run)
        return (AttributePatch()
                .add(lumina, "attention_function", guided.attention_function(lumina.attention_function))
                .add(model, "patchify_and_embed", guided.patchify_and_embed(model.patchify_and_embed)))

    def backend_note(self) -> str | None:
        return _forge_sampling.forge_backend_note()
