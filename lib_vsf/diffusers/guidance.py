"""`VSFGuidance`: VSF / NAG / NASA on a diffusers pipeline, as a context manager.

    with VSFGuidance(pipe, negative_prompt="blurry, text", settings=from_preset("VSF Quality")) as vsf:
        image = vsf(prompt="a photo of a cat", num_inference_steps=8).images[0]

On entry it encodes the negative prompt(s) without padding, installs our attention processors on the
family's denoiser(s) and a forward pre-hook that appends the negative tokens to the text stream on the
steps inside the [start, end) window. Calling the object runs the pipeline as one conditional pass
(CFG off; guidance embeddings that are not CFG keep the caller's value). On exit, and when anything
raises, the original processors are put back as they were and the hook is removed.

One denoiser is guided by one context at a time: entering a second `VSFGuidance` over a denoiser that
another one guides (nested contexts, or two pipeline objects sharing modules) is refused, and while a
context is active its denoisers run only through it (a direct pipeline call, or another pipeline
sharing the denoiser, is refused at its first denoiser call): the step bookkeeping is read from this
pipeline's scheduler, so any other caller would be guided on someone else's steps.

`negative_image=IMG` (Flux Kontext, Qwen-Image-Edit) adds a negative image: its latents, encoded as the
pipeline encodes a reference image, join the negative as image-stream tokens, so the output moves away
from what that picture shows (docs/negative-images.md); with or without a negative prompt.

`negative_map=True` also records where the negative acts (VSF only): after a call,
`vsf.negative_map()` is the per-token share of attention on the flipped negative, `1 - W`, on the
latent grid, and `vsf.negative_map(per_step=True)` the same per guided step.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Sequence

import torch

from ..settings import VSFSettings, family_default
from ..state import GuidanceRun, NegativeImage, NegativeText
from .family import FamilyAdapter, GuidanceConflictError, GuidanceInputError, GuidedProcessor, UnsupportedPipelineError
from .chroma import ChromaFamily
from .flux import FluxFamily, FluxKontextFamily
from .flux2 import Flux2DevFamily, Flux2KleinFamily
from .qwenimage import QwenImageEditFamily, QwenImageEditPlusFamily, QwenImageFamily
from .sd3 import SD3Family
from .steps import sampler_step
from .unet import UNetFamily
from .wan import WanFamily
from .zimage import ZImageFamily

FAMILIES: tuple[type[FamilyAdapter], ...] = (SD3Family, FluxFamily, FluxKontextFamily, ChromaFamily, WanFamily,
                                                UNetFamily, ZImageFamily, Flux2KleinFamily, Flux2DevFamily,
                                                QwenImageFamily, QwenImageEditFamily, QwenImageEditPlusFamily)


def supported_pipelines() -> str:
    return "; ".join(f"{f.label} ({', '.join(p + '*' for p in f.pipeline_prefixes)})" for f in FAMILIES)


def family_for(pipe) -> FamilyAdapter:
    """The adapter of `pipe`'s family, or UnsupportedPipelineError naming what is supported."""
    for family in FAMILIES:
        adapter = family()
        if adapter.matches(pipe):
            return adapter.for_pipeline(pipe)
    raise UnsupportedPipelineError(
        f"VSF does not support {type(pipe).__name__}. Supported pipelines: {supported_pipelines()}"
    )


class VSFGuidance:
    """Context manager applying guidance to `pipe`; see the module docstring.

    `negative_prompt`: one string for every image, or one per prompt (the pipeline's prompt-major order,
    `num_images_per_prompt` copies each). `settings`: a `VSFSettings` (default: the family's defaults).
    `negative_map`: record the negative-attention map (see `negative_map()`); off by default.
    `negative_image`: a PIL image (or image tensor the pipeline accepts) to move away from, for families
    whose adapter can place one (`encode_negative_image`); it applies to every sample.
    """

    def __init__(self, pipe, negative_prompt: str | Sequence[str] = "", settings: VSFSettings | None = None,
                 negative_map: bool = False, negative_image=None):
        self.pipe = pipe
        self.adapter = family_for(pipe)
        self.settings = settings or family_default(self.adapter.family)
        if not isinstance(self.settings, VSFSettings):
            raise TypeError(f"settings must be VSFSettings, got {type(self.settings).__name__}")
        prompts = [negative_prompt] if isinstance(negative_prompt, str) or negative_prompt is None else list(negative_prompt)
        if not prompts:
            raise ValueError("negative_prompt is an empty list")
        self.negative_prompts = ["" if p is None else str(p) for p in prompts]
        self.negative_image_input = negative_image
        self.negative_image: NegativeImage | None = None
        self._image_encodings: dict[tuple, NegativeImage] = {}  # image options -> negative image tokens
        self._image_rows = 0  # negative-image rows to drop from the running denoiser call's output
        if negative_image is not None:
            if getattr(self.adapter, "encode_negative_image", None) is None:
                raise UnsupportedPipelineError(
                    f"negative images need an edit pipeline with one reference image (Flux Kontext, Qwen-Image-Edit); "
                    f"{type(pipe).__name__} is not one of them")
            self.adapter.negative_first = False  # [P, N_txt | N_img, I, R]: one N span
        self.run = GuidanceRun(self.settings, negative_first=self.adapter.negative_first)
        self.negative: NegativeText | None = None
        self._originals: list[tuple[torch.nn.Module, dict[str, Any]]] = []
        self._hooks: list[Any] = []
        self._calls = 0  # denoiser calls made in the running pipeline call
        self._running = False  # inside self.__call__
        self._direct_step: tuple[int, int] | None = None  # inside self.direct_calls(step, total)
        self._encodings: dict[tuple, NegativeText] = {}  # text-encoder settings -> negative embeddings
        if negative_map:
            self._record_negative_map()

    # -- install / restore --------------------------------------------------------------------------
    def __enter__(self) -> "VSFGuidance":
        self._refuse_guided_denoisers()
        try:
            # encoded per call instead when the encoding needs the call's inputs (the Edit pipelines' image)
            self.negative = None if self.adapter.negative_needs_call else self._negative_for({})
            for _, model in self.adapter.denoisers(self.pipe):
                originals = dict(model.attn_processors)
                ours = {name: self.adapter.processor_for(name, proc, self.run) or proc
                        for name, proc in originals.items()}
                self._originals.append((model, originals))
                model.set_attn_processor(ours)
                self._hooks.append(self.adapter.register_step_hook(model, self._before_forward))
                if self.negative_image_input is not None:
                    self._hooks.append(model.register_forward_hook(self._after_forward))
        except BaseException:
            self.restore()
            raise
        self._calls = 0
        return self

    def _refuse_guided_denoisers(self) -> None:
        """Refuse, before changing anything, a denoiser that a live VSFGuidance already guides."""
        for name, model in self.adapter.denoisers(self.pipe):
            if any(isinstance(p, GuidedProcessor) for p in model.attn_processors.values()):
                raise GuidanceConflictError(
                    f"the pipeline's {name} is already guided by another active VSFGuidance (a nested context, "
                    "or another pipeline object sharing this model); exit that one first"
                )

    def _negative_for(self, encoding: dict[str, Any]) -> NegativeText:
        """The negative prompts encoded with the text-encoder settings `encoding` (cached)."""
        key = tuple(sorted(encoding.items()))
        if key not in self._encodings:
            with torch.no_grad():
                self._encodings[key] = NegativeText.from_sequences(
                    [self.adapter.encode_negative(self.pipe, p, self.settings, **encoding)
                     for p in self.negative_prompts]
                ).trimmed()
        return self._encodings[key]

    def _negative_image_for(self, options: dict[str, Any]) -> NegativeImage:
        """The negative image encoded with the pipeline call's image options `options` (cached)."""
        key = tuple(sorted(options.items()))
        if key not in self._image_encodings:
            with torch.no_grad():
                self._image_encodings[key] = self.adapter.encode_negative_image(
                    self.pipe, self.negative_image_input, **options)
        return self._image_encodings[key]

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
        if self._running:
            raise GuidanceConflictError("VSFGuidance is already running this pipeline (re-entrant call)")
        cfg_kwarg = self.adapter.cfg_kwarg
        if cfg_kwarg and float(kwargs.get(cfg_kwarg) or 1.0) > 1.0:
            warnings.warn(f"VSF replaces CFG: {cfg_kwarg}={kwargs[cfg_kwarg]} is set to 1 for this call", stacklevel=2)
        if self.negative_image_input is not None:  # encoded as this call encodes its input image
            self.negative_image = self._negative_image_for(self.adapter.negative_image_options(kwargs))
        kwargs = self.adapter.single_pass_kwargs(kwargs)
        self._reset_negative_map()
        self._calls, self._running = 0, True
        try:
            return self.pipe(*args, **kwargs)
        finally:
            self._calls, self._running = 0, False

    @contextmanager
    def direct_calls(self, step: int, total: int):
        """Guide denoiser calls made directly by the caller (`pipe.transformer(...)`, no pipeline loop)
        as sampler step `step` of `total`."""
        if self._running:
            raise GuidanceConflictError("direct denoiser calls cannot be marked while the pipeline runs")
        self._direct_step = (int(step), int(total))
        try:
            yield self
        finally:
            self._direct_step = None

    def _before_forward(self, module, args, kwargs):
        """Forward pre-hook of a denoiser: the step of this call from the scheduler, then the negative."""
        if self._running:
            step, total = sampler_step(self.pipe, self._calls)
            encoding = self.adapter.text_encoding(self.pipe)
        elif self._direct_step is not None:
            (step, total), encoding = self._direct_step, {}
        else:
            raise GuidanceConflictError(
                f"{type(module).__name__} is guided by an active VSFGuidance: run the pipeline through it "
                "(`vsf(...)`), or exit the context before calling this or another pipeline that shares the model"
            )
        if "encoder_hidden_states" not in kwargs:
            raise GuidanceInputError("VSF needs the denoiser called with encoder_hidden_states=... (keyword)")
        self._calls += 1
        self.run.set_step(step, total)
        self._negative_map_grid(module, args, kwargs)
        text = kwargs["encoder_hidden_states"]
        batch, positive_len = text.shape[0], self.adapter.positive_length(kwargs)
        negative = self.negative if not encoding else self._negative_for(encoding)
        if negative is None:
            raise GuidanceInputError(
                f"{type(self.pipe).__name__} encodes the negative prompt with the pipeline call's inputs (its image): "
                "run the pipeline through the guidance (`vsf(...)`) instead of direct denoiser calls")
        self._image_rows = 0
        if self.negative_image_input is not None and self.negative_image is None:  # direct calls
            self.negative_image = self._negative_image_for({})
        if (negative.is_empty and self.negative_image is None) or not self.settings.is_active(step, total):
            self.run.set_text(positive_len, None)
            return args, kwargs
        if negative.is_empty:  # a negative image alone
            self.run.set_text(positive_len, None, False, self.negative_image.length)
            return args, self._with_negative_image(kwargs)
        if batch % negative.embeds.shape[0]:
            raise GuidanceInputError(
                f"{negative.embeds.shape[0]} negative prompts do not fit a batch of {batch} images "
                "(give one negative, or one per prompt)"
            )
        negative = negative.for_batch(batch).to(device=text.device, dtype=text.dtype)
        image_len = 0 if self.negative_image is None else self.negative_image.length
        self.run.set_text(positive_len, negative, self.adapter.negative_first, image_len)
        kwargs = self.adapter.extend_inputs(kwargs, negative)
        return args, kwargs if not image_len else self._with_negative_image(kwargs)

    def _with_negative_image(self, kwargs):
        """The denoiser kwargs with the negative image first in the image stream; its output rows are
        dropped again after the call (`_after_forward`)."""
        self._image_rows = self.negative_image.length
        return self.adapter.extend_image_inputs(kwargs, self.negative_image)

    def _after_forward(self, module, args, output):
        """Forward hook: drop the negative image's rows (the first of the image stream) from the output."""
        rows, self._image_rows = self._image_rows, 0
        return drop_leading_rows(output, rows) if rows else output


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


def drop_leading_rows(output, rows: int):
    """A denoiser output (tensor, tuple, or diffusers output with `.sample`) without its first `rows`
    image-stream rows."""
    if isinstance(output, torch.Tensor):
        return output[:, rows:]
    if isinstance(output, tuple):
        return (output[0][:, rows:],) + tuple(output[1:])
    if hasattr(output, "sample"):
        output.sample = output.sample[:, rows:]
        return output
    raise GuidanceInputError(f"cannot drop the negative image's rows from a {type(output).__name__} output")


def generate(pipe, prompt, negative_prompt, settings: VSFSettings | None = None, **kwargs):
    """One-shot helper: `generate(pipe, "a cat", "blurry", from_preset("VSF Strong"), num_inference_steps=8)`."""
    with VSFGuidance(pipe, negative_prompt, settings) as vsf:
        return vsf(prompt=prompt, **kwargs)

