"""`VSFGuidance`: VSF / NAG / NASA on a diffusers pipeline, as a context manager.

    with VSFGuidance(pipe, negative_prompt="blurry, text", settings=from_preset("VSF Quality")) as vsf:
        image = vsf(prompt="a photo of a cat", num_inference_steps=8).images[0]

On entry it encodes the negative prompt(s) without padding, installs our attention processors on the
family's denoiser(s) and a forward pre-hook that appends the negative tokens to the text stream on the
steps inside the [start, end) window. Calling the object runs the pipeline as one conditional pass
(CFG off). On exit, and when anything raises, the original processors are put back as they were and
the hook is removed.

`negative_map=True` also records where the negative acts (VSF only): after a call,
`vsf.negative_map()` is the per-token share of attention on the flipped negative, `1 - W`, on the
latent grid, and `vsf.negative_map(per_step=True)` the same per guided step.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from ..settings import VSFSettings, family_default
from ..state import GuidanceRun, NegativeText
from .family import FamilyAdapter, GuidanceInputError, UnsupportedPipelineError
from .flux import FluxFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .wan import WanFamily

FAMILIES: tuple[type[FamilyAdapter], ...] = (SD3Family, FluxFamily, WanFamily, UNetFamily)


def supported_pipelines() -> str:
    return "; ".join(f"{f.label} ({', '.join(p + '*' for p in f.pipeline_prefixes)})" for f in FAMILIES)


def family_for(pipe) -> FamilyAdapter:
    """The adapter of `pipe`'s family, or UnsupportedPipelineError naming what is supported."""
    for family in FAMILIES:
        adapter = family()
        if adapter.matches(pipe):
            return adapter
    raise UnsupportedPipelineError(
        f"VSF does not support {type(pipe).__name__}. Supported pipelines: {supported_pipelines()}"
    )


class VSFGuidance:
    """Context manager applying guidance to `pipe`; see the module docstring.

    `negative_prompt`: one string for every image, or one per prompt (the pipeline's prompt-major order,
    `num_images_per_prompt` copies each). `settings`: a `VSFSettings` (default: the family's defaults).
    `negative_map`: record the negative-attention map (see `negative_map()`); off by default.
    """

    def __init__(self, pipe, negative_prompt: str | Sequence[str], settings: VSFSettings | None = None,
                 negative_map: bool = False):
        self.pipe = pipe
        self.adapter = family_for(pipe)
        self.settings = settings or family_default(self.adapter.family)
        if not isinstance(self.settings, VSFSettings):
            raise TypeError(f"settings must be VSFSettings, got {type(self.settings).__name__}")
        prompts = [negative_prompt] if isinstance(negative_prompt, str) or negative_prompt is None else list(negative_prompt)
        if not prompts:
            raise ValueError("negative_prompt is an empty list")
        self.negative_prompts = ["" if p is None else str(p) for p in prompts]
        self.run = GuidanceRun(self.settings, negative_first=self.adapter.negative_first)
        self.negative: NegativeText | None = None
        self._originals: list[tuple[torch.nn.Module, dict[str, Any]]] = []
        self._hooks: list[Any] = []
        self._calls = 0
        if negative_map:
            self._record_negative_map()

    # -- install / restore --------------------------------------------------------------------------
    def __enter__(self) -> "VSFGuidance":
        try:
            with torch.no_grad():
                self.negative = NegativeText.from_sequences(
                    [self.adapter.encode_negative(self.pipe, p, self.settings) for p in self.negative_prompts]
                ).trimmed()
            for _, model in self.adapter.denoisers(self.pipe):
                originals = dict(model.attn_processors)
                ours = {name: self.adapter.processor_for(name, proc, self.run) or proc
                        for name, proc in originals.items()}
                self._originals.append((model, originals))
                model.set_attn_processor(ours)
                self._hooks.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        except BaseException:
            self.restore()
            raise
        self._calls = 0
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False

    def restore(self) -> None:
        """Put the original processors back and remove the hooks (idempotent)."""
        while self._hooks:
            self._hooks.pop().remove()
        while self._originals:
            model, originals = self._originals.pop()
            model.set_attn_processor(dict(originals))  # diffusers pops from the dict it is given

    # -- running --------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Run the pipeline as one conditional pass with guidance; returns the pipeline's output."""
        if not self._originals:
            raise RuntimeError("VSFGuidance must be entered (`with VSFGuidance(...) as vsf:`) before calling it")
        self._calls = 0
        cfg_kwarg = self.adapter.cfg_kwarg
        if cfg_kwarg and float(kwargs.get(cfg_kwarg) or 1.0) > 1.0:
            warnings.warn(f"VSF replaces CFG: {cfg_kwarg}={kwargs[cfg_kwarg]} is set to 1 for this call", stacklevel=2)
        kwargs = self.adapter.single_pass_kwargs(kwargs)
        self._reset_negative_map()
        try:
            return self.pipe(*args, **kwargs)
        finally:
            self._calls = 0

    def _total_steps(self) -> int:
        total = getattr(self.pipe, "_num_timesteps", None)
        if not total:
            total = len(getattr(self.pipe.scheduler, "timesteps", []) or [])
        return int(total or 1)

    def _before_forward(self, module, args, kwargs):
        """Forward pre-hook of a denoiser: one call is one step (single pass)."""
        if "encoder_hidden_states" not in kwargs:
            raise GuidanceInputError("VSF needs the denoiser called with encoder_hidden_states=... (keyword)")
        total = self._total_steps()
        if self._calls >= total:  # a new pipeline call made directly on the pipe
            self._calls = 0
        step = self._calls
        self._calls += 1
        self.run.set_step(step, total)
        self._negative_map_grid(module, args, kwargs)
        text = kwargs["encoder_hidden_states"]
        batch, positive_len = text.shape[0], self.adapter.positive_length(kwargs)
        negative = self.negative
        if negative.is_empty or not self.settings.is_active(step, total):
            self.run.set_text(positive_len, None)
            return args, kwargs
        if batch % negative.embeds.shape[0]:
            raise GuidanceInputError(
                f"{negative.embeds.shape[0]} negative prompts do not fit a batch of {batch}; "
                "VSF runs one conditional pass: call it through VSFGuidance(...)(...) so CFG is off"
            )
        negative = negative.for_batch(batch).to(device=text.device, dtype=text.dtype)
        self.run.set_text(positive_len, negative, self.adapter.negative_first)
        return args, self.adapter.extend_inputs(kwargs, negative)


    # -- negative-attention map ----------------------------------------------------------------------------
    def _record_negative_map(self) -> None:
        recorder = self.run.record_negative_map()
        if recorder.undefined_reason:
            warnings.warn(f"{recorder.undefined_reason}; negative_map() will return None", stacklevel=3)

    def _reset_negative_map(self) -> None:
        if self.run.negative_map is not None:
            self.run.negative_map.reset()

    def _negative_map_grid(self, model, args, kwargs) -> None:
        if self.run.negative_map is not None:
            self.run.negative_map.grid = self.adapter.latent_grid(model, args, kwargs)

    def negative_map(self, per_step: bool = False):
        """Where the negative acted in the last call: per image token, the share of attention mass on
        the flipped negative, `1 - W` (paper eq. 8), averaged over heads, guided attention layers and
        guided steps. A float32 tensor `[B, h, w]` on the latent token grid (`[B, frames, h, w]` for
        video; `[B, tokens]` where the family gives no grid). `per_step=True`: `{step: map}` of each
        guided step instead. None (or `{}`) when the map was not requested
        (`VSFGuidance(..., negative_map=True)`), nothing was guided, or the method is NAG / NASA, which
        have no W (`negative_map_undefined` says why)."""
        recorder = self.run.negative_map
        if recorder is None:
            return {} if per_step else None
        return recorder.per_step() if per_step else recorder.mean()

    @property
    def negative_map_undefined(self) -> str | None:
        """Why `negative_map()` is None for this method (NAG / NASA), or None."""
        recorder = self.run.negative_map
        return None if recorder is None else recorder.undefined_reason


def generate(pipe, prompt, negative_prompt, settings: VSFSettings | None = None, **kwargs):
    """One-shot helper: `generate(pipe, "a cat", "blurry", from_preset("VSF Strong"), num_inference_steps=8)`."""
    with VSFGuidance(pipe, negative_prompt, settings) as vsf:
        return vsf(prompt=prompt, **kwargs)

