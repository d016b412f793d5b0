"""Z-Image / Z-Image Turbo (diffusers `ZImageTransformer2DModel`): VSF in the unified single-stream blocks.

The model runs a noise refiner on the image tokens and a context refiner on the caption tokens, then
unified blocks over one sequence per sample `[x (padded to 32), caption (padded to 32)]`. VSF adds the
negative tokens `N0` at the end of that sequence, `[I, P, N0]`, so I and P stay one contiguous span:

- The negative is what the pipeline's own `encode_prompt` gives for it (Qwen3 hidden states of the chat
  template, unpadded). It is embedded by `cap_embedder` and refined by the `context_refiner` *alone*, as
  its own prompt (VSF-SPEC "Families beyond the paper"): N0 never attends to P there, nor P to N0. The
  caption pad token the model adds to reach a multiple of 32 is kept for P and never added to N.
- Positions: the model puts the image's first RoPE axis after the padded caption (image at `C + 1`,
  caption tokens at `1..C`). In a negative pass the image would sit at `ceil32(n) + 1` with N at `1..n`;
  so N0 token `j` gets axis-0 position `C - ceil32(n) + 1 + j` (other axes 0), which gives every
  image->N0 and N0->N0 pair its negative-pass relative position. The shift can be negative: the RoPE
  rotations of N0 are computed directly from the model's theta and axes (the same formula as its table).
  Image pad tokens (position (0,0,0)) cannot also keep their negative-pass offset; they carry no content.
- Unified blocks: every attention is a joint attention with the spec's mask table (shared
  `joint_attention`). Samples whose caption or image lengths differ are run one by one (the model's own
  batch-padding mask); the refiners run unchanged.

The transformer is called positionally (`transformer(x_list, t, cap_list)`), so the adapter attaches its
own pre-hook that hands `VSFGuidance` a keyword view of the call, and pre-hooks on the unified blocks that
append N0 to their input (first block) and give every block the extended mask and rotations.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from ..attention import joint_attention
from ..layout import TokenLayout
from ..state import NegativeText
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor
from .text import is_blank

SEQ_MULTIPLE = 32  # Z-Image pads captions and image tokens to a multiple of this
NEGATIVE_KEY = "vsf_negative"  # where extend_inputs leaves the negative for the model-level hooks


def padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def rope_rotations(rope_embedder, ids: torch.Tensor) -> torch.Tensor:
    """RoPE rotations (complex64, `[len(ids), head_dim / 2]`) of integer position ids `[len, axes]`, any sign.
    Same formula and rounding as the model's precomputed table (float64 frequencies, float32 angles)."""
    parts = []
    for axis, dim in enumerate(rope_embedder.axes_dims):
        freqs = 1.0 / (rope_embedder.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(ids[:, axis].to(torch.float64).cpu(), freqs).float()
        parts.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64))
    return torch.cat(parts, dim=-1).to(ids.device)


def negative_positions(caption_len: int, negative_len: int, slots: int | None = None) -> torch.Tensor:
    """Position ids `[slots, 3]` of a negative prompt of `negative_len` tokens next to a caption padded to
    `caption_len` (see the module docstring); `slots >= negative_len` positions, the extra ones being the
    batch padding of shorter negatives (masked out everywhere)."""
    slots = negative_len if slots is None else slots
    ids = torch.zeros(slots, 3, dtype=torch.long)
    ids[:, 0] = caption_len - padded(negative_len) + 1 + torch.arange(slots)
    return ids


@dataclass
class UnifiedLayout:
    """The unified sequences of one guided forward: per sample `[I (x_lens[i]), P (cap_lens[i]), N0 (n)]`."""

    x_lens: list[int]
    cap_lens: list[int]
    negative_len: int
    negative_mask: torch.Tensor | None  # [B, n] True = real token; None when all are real
    negative_hidden: torch.Tensor  # [B, n, dim] refined N0
    negative_rotations: torch.Tensor  # [B, n, head_dim / 2] complex

    @property
    def lengths(self) -> list[int]:
        return [x + c + self.negative_len for x, c in zip(self.x_lens, self.cap_lens)]

    @property
    def uniform(self) -> bool:
        return len(set(zip(self.x_lens, self.cap_lens))) == 1

    def token_layout(self, sample: int | None) -> TokenLayout:
        """Layout of one sample's sequence (or of the whole batch when `uniform`, sample None)."""
        i = 0 if sample is None else sample
        start = self.x_lens[i] + self.cap_lens[i]
        mask = self.negative_mask
        if mask is not None and sample is not None:
            mask = mask[sample:sample + 1]
        return TokenLayout(start + self.negative_len, slice(self.x_lens[i], start),
                           slice(start, start + self.negative_len), mask)


def _apply_rotary(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The model's RoPE: complex multiply in float32 of `[B, L, H, D]` by `[B, L, D/2]`."""
    with torch.amp.autocast("cuda", enabled=False):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rotations.unsqueeze(2)).flatten(3).type_as(x)


class ZImageVSFProcessor(GuidedProcessor):
    """Attention of one unified Z-Image block with guidance (sequence `[I, P, N0]` per sample)."""

    def __init__(self, original, run, adapter: "ZImageFamily"):
        super().__init__(original, run)
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        layout = self.adapter.unified
        if layout is None or not self.run.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = _apply_rotary(q, freqs_cis), _apply_rotary(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        guidance = self.run.guidance()
        if layout.uniform:
            out = joint_attention(q, k, v, layout.token_layout(None), guidance)
        else:  # the model's own batch padding: run each sample over its real length
            out = torch.zeros_like(q)
            for i, length in enumerate(layout.lengths):
                out[i:i + 1, :, :length] = joint_attention(
                    q[i:i + 1, :, :length], k[i:i + 1, :, :length], v[i:i + 1, :, :length],
                    layout.token_layout(i), guidance)
        self.run.calls += 1
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


class _Handles:
    """Every hook the adapter attached to one denoiser; `remove()` takes them all off (idempotent)."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self):
        while self.handles:
            self.handles.pop().remove()


class AttentionProcessors:
    """`attn_processors` / `set_attn_processor` over a model's attention modules, for a model class that
    lacks diffusers' AttentionMixin (ZImageTransformer2DModel): what VSFGuidance installs and restores."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._modules = {f"{name}.processor": module for name, module in model.named_modules()
                         if hasattr(module, "set_processor") and hasattr(module, "processor")}

    @property
    def attn_processors(self) -> dict:
        return {name: module.processor for name, module in self._modules.items()}

    def set_attn_processor(self, processors: dict) -> None:
        for name, module in self._modules.items():
            module.set_processor(processors[name])


class ZImageFamily(FamilyAdapter):
    family = "zimage"
    label = "Z-Image / Z-Image Turbo"
    pipeline_prefixes = ("ZImagePipeline",)
    negative_first = False  # N0 after the caption: [I, P, N0]
    cfg_kwarg = None  # handled in single_pass_kwargs: Z-Image runs CFG whenever guidance_scale > 0

    def __init__(self):
        self.unified: UnifiedLayout | None = None  # set per guided forward, read by the processors

    def matches(self, pipe) -> bool:
        return type(pipe).__name__ == "ZImagePipeline"

    def denoisers(self, pipe):
        return [("transformer", AttentionProcessors(pipe.transformer))]

    def processor_for(self, name, original, run):
        # "layers.3.attention.processor"; the noise and context refiners keep their own processors.
        return ZImageVSFProcessor(original, run, self) if name.startswith("layers.") else None

    def single_pass_kwargs(self, kwargs):
        scale = kwargs.get("guidance_scale")
        kwargs = super().single_pass_kwargs(kwargs)
        if scale is not None and float(scale) > 0:
            warnings.warn(f"VSF replaces CFG: guidance_scale={scale} is set to 0 for this call "
                          "(Z-Image runs a second, negative pass whenever guidance_scale > 0)", stacklevel=3)
        kwargs["guidance_scale"] = 0.0
        return kwargs

    def encode_negative(self, pipe, prompt, settings):
        dim = pipe.transformer.config.cap_feat_dim
        if is_blank(prompt):
            return torch.zeros(0, dim)
        # The pipeline's own encoding of a prompt: chat template, Qwen3 hidden_states[-2], padding removed.
        embeds, _ = pipe.encode_prompt(prompt=[str(prompt)], device=pipe._execution_device,
                                       do_classifier_free_guidance=False)
        return embeds[0]

    # -- the model call ------------------------------------------------------------------------------
    def positive_length(self, kwargs):
        return 0  # per-sample lengths live in UnifiedLayout; the run only needs the negative's

    def extend_inputs(self, kwargs, negative):
        return {**kwargs, NEGATIVE_KEY: negative}

    def register_step_hook(self, model, hook):
        model = model.model if isinstance(model, AttentionProcessors) else model
        signature = inspect.signature(model.forward)
        for name in ("x", "t", "cap_feats"):
            if name not in signature.parameters:
                raise GuidanceInputError(
                    f"{type(model).__name__}.forward has no parameter {name!r}: this diffusers version's Z-Image "
                    "transformer is not supported")
        first_layer = model.layers[0]

        def before_model(module, args, kwargs):
            call = signature.bind(*args, **kwargs).arguments
            captions = call["cap_feats"]
            self.unified = None
            view = {"encoder_hidden_states": captions[0].new_zeros(len(captions), 0, captions[0].shape[-1])}
            _, view = hook(module, (), view)  # VSFGuidance: step bookkeeping, the negative if active
            negative = view.get(NEGATIVE_KEY)
            if negative is not None:
                if isinstance(call["x"][0], (list, tuple)) or call.get("siglip_feats") is not None:
                    raise GuidanceInputError("VSF does not support Z-Image omni mode (several images per sample)")
                if call.get("controlnet_block_samples") is not None:
                    raise GuidanceInputError("VSF does not support Z-Image ControlNet residuals")
                self.unified = self._unified_layout(module, call, negative)
            return args, kwargs

        def before_block(block, args, kwargs):
            if self.unified is None:
                return args, kwargs
            x, mask, rotations, *rest = self._bound_block_args(args, kwargs)
            if block is first_layer:
                x = self._append_negative(x)
            return (x, *self._extended_mask_and_rotations(mask, rotations), *rest), {}

        handles = [model.register_forward_pre_hook(before_model, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(before_block, with_kwargs=True) for layer in model.layers]
        return _Handles(handles)

    @staticmethod
    def _bound_block_args(args, kwargs):
        names = ("x", "attn_mask", "freqs_cis", "adaln_input", "noise_mask", "adaln_noisy", "adaln_clean")
        values = dict(zip(names, args))
        values.update(kwargs)
        return [values.get(n) for n in names]

    def _unified_layout(self, model, call, negative: NegativeText) -> UnifiedLayout:
        patch, f_patch = call.get("patch_size", 2), call.get("f_patch_size", 1)
        x_lens = []
        for image in call["x"]:
            _, frames, height, width = image.shape
            x_lens.append(padded((frames // f_patch) * (height // patch) * (width // patch)))
        cap_lens = [padded(len(c)) for c in call["cap_feats"]]
        counts = [int(n) for n in negative.mask.sum(dim=1).tolist()]
        ids = torch.cat([negative_positions(c, n, negative.length) for c, n in zip(cap_lens, counts)])
        rotations = rope_rotations(model.rope_embedder, ids.to(negative.embeds.device)).view(len(cap_lens), negative.length, -1)
        mask = None if bool(negative.mask.all()) else negative.mask
        hidden = self._refined_negative(model, negative, rotations, mask)
        return UnifiedLayout(x_lens, cap_lens, negative.length, mask, hidden, rotations)

    @staticmethod
    def _refined_negative(model, negative: NegativeText, rotations, mask) -> torch.Tensor:
        """The negative prompt alone through the caption embedder and the context refiner."""
        hidden = model.cap_embedder(negative.embeds.to(model.dtype))
        for layer in model.context_refiner:
            hidden = layer(hidden, mask, rotations)
        return hidden

    def _append_negative(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.unified
        lengths = layout.lengths
        out = x.new_zeros(x.shape[0], max(lengths), x.shape[2])
        for i, (x_len, cap_len) in enumerate(zip(layout.x_lens, layout.cap_lens)):
            start = x_len + cap_len
            out[i, :start] = x[i, :start]
            out[i, start:start + layout.negative_len] = layout.negative_hidden[i].to(x.dtype)
        return out

    def _extended_mask_and_rotations(self, mask, rotations):
        layout = self.unified
        lengths = layout.lengths
        longest = max(lengths)
        new_rotations = rotations.new_zeros(rotations.shape[0], longest, rotations.shape[2])
        for i, (x_len, cap_len) in enumerate(zip(layout.x_lens, layout.cap_lens)):
            start = x_len + cap_len
            new_rotations[i, :start] = rotations[i, :start]
            new_rotations[i, start:start + layout.negative_len] = layout.negative_rotations[i]
        if all(n == longest for n in lengths):
            return None, new_rotations
        new_mask = torch.zeros(len(lengths), longest, dtype=torch.bool, device=rotations.device)
        for i, n in enumerate(lengths):
            new_mask[i, :n] = True
        return new_mask, new_rotations
