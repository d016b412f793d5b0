"""One `Generation` per WebUI generation: the script hooks call into it, and it undoes everything.

Lifecycle (all hosts):

- `start(p, script_args)` (script `process` hook): parse the arguments (and XYZ overrides); when VSF is
  on, create the `Generation`, keep it on `p` (never on a class: two API requests never share it),
  and wrap `p.sample` so that every sampling pass ends in a `finally` that undoes the pass — on
  success, exception, interrupt and skip alike. Bad arguments replace `p.sample` with a function that
  raises the `VSFSettingsError` (script hooks swallow exceptions; `p.sample` is where a failure
  reaches the UI and the HTTP API as an error), so nothing is generated and nothing changes.
- `begin_pass(p)` (`process_before_every_sampling`, also for the hires-fix pass): find the adapter
  for `p.sd_model`, check the host code, encode this pass's negative prompts, let the adapter attach
  (negative into the text stream, one conditional pass) and apply its attention patch. Unsupported
  model or host, a host that changed, or an empty negative prompt: one note, nothing patched, the
  image is exactly what the host makes without the extension. Every note goes under the image
  (`p.comment`), into the infotext as `VSF note` (the only place HTTP API users see it) and to the
  console (the `vsf` logger at WARNING, shown on every host).
- `on_cfg_denoiser(params)` (registered once per process): the sampler step of the model call, for
  the step window and the alpha schedule (`steps.py`).
- `end_pass()` (the `p.sample` wrapper's `finally`, `postprocess`, and any new `begin_pass`): run the
  pass's undo list in reverse, each step guarded, so one failing undo cannot leave the others undone.
- `add_map_image(p, pp)` (`postprocess_image`, once per output image, before the host writes that
  image's infotext): with "Show where the negative acts" on, the map of the pass that made the image
  (`negative_map.py`) becomes one labelled image in `p.extra_result_images` (what the hosts show after
  the outputs in the gallery and append to the API's `images`; neither `processed.images` nor the
  infotexts, so their indexing, the batch count and the grid stay the host's own), and its figure
  "Negative share: mean X%, max Y%" goes under the image and into that image's `VSF note`. Off: no
  recorder, so no extra tensor in any attention call, and no image.
- `finish(p, processed)` (`postprocess`): end the pass, unwrap `p.sample`, drop the generation from
  `p` (a host without `p.extra_result_images` gets the map images appended to `processed` here).
"""
from __future__ import annotations

import logging
import traceback
import weakref
from typing import Any, Sequence

from ..patching import AttributePatch, PatchError
from ..settings import VSFSettingsError
from ..state import GuidanceRun, NegativeText
from . import attention_backend, hosts, infotext, negative_map, steps
from .args import ScriptArgs, parse_script_args
from .hosts.base import HostAdapter, SamplingContext
from .xyz import OVERRIDES_ATTR, apply_overrides

log = logging.getLogger("vsf")
# Notes are per-image messages for the user. Forge Neo configures the root logger at ERROR by default
# (`modules/logging_config.py`), which would hide them from its console; A1111 and Forge print WARNING
# anyway. Our own logger's level lets them through on every host unless someone set it explicitly.
if log.level == logging.NOTSET:
    log.setLevel(logging.WARNING)

GENERATION_ATTR = "vsf_generation"
EMPTY_NEGATIVE = ("VSF: the negative prompt is empty, so there is nothing to steer away from; this image was "
                  "generated without VSF.")
UNSUPPORTED = ("VSF: {model} is not supported on this host yet; this image was generated without VSF "
               "(supported: {supported}).")

# The generation whose sampling runs now: the fallback for step callbacks that carry no `p`.
_current: "weakref.ReferenceType[Generation] | None" = None
# The generation whose pass holds patches right now (a strong reference on purpose: if a host ever
# bypassed both the `p.sample` wrapper and `postprocess`, the next `start()` still undoes the pass).
_patched: "Generation | None" = None


class Generation:
    """State of one generation (see the module docstring)."""

    def __init__(self, p: Any, args: ScriptArgs):
        self.requested = args  # as parsed: `Model default` is resolved per model in `begin_pass`
        self.args = args
        self.run = GuidanceRun(args.settings)
        self.ctx: SamplingContext | None = None
        self.adapter: HostAdapter | None = None
        self.passes = 0  # sampling passes guided so far (first pass, hires pass)
        self.host_backend: str | None = None  # the host's attention library, preferred by VSF's fast path
        self.warnings: list[str] = []
        self._p = weakref.ref(p)
        self._negatives: dict[tuple, NegativeText] = {}
        self._negative_images: dict[tuple, Any] = {}
        self._sample_patch: AttributePatch | None = None
        # "Show where the negative acts": the recorder of the last pass that finished guided (None when
        # the pass that made the current images was unguided), outputs seen since that pass began, and
        # map images for a host without `p.extra_result_images`.
        self.map_recorder = None
        self._outputs_seen = 0
        self.map_images: list[Any] = []

    # -- messages ------------------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        """Show `message` once per generation under the image (and in the console)."""
        if message in self.warnings:
            return
        self.warnings.append(message)
        log.warning("[VSF] %s", message)
        p = self._p()
        if p is None:
            return
        if callable(getattr(p, "comment", None)):
            p.comment(message)  # under the image in the UI (the HTTP API's `info` has no comments)
        infotext.write_notes(p, self.warnings)  # in the infotext, for API users and saved images

    # -- sampling passes ----------------------------------------------------------------------------
    def begin_pass(self, p: Any) -> bool:
        """Prepare guidance for the sampling pass about to run; False when it runs unguided."""
        global _current
        self.end_pass()
        self.map_recorder, self._outputs_seen = None, 0
        sd_model = getattr(p, "sd_model", None)
        adapter = hosts.find_adapter(sd_model)
        if adapter is None:
            supported = ", ".join(dict.fromkeys(cls.label for cls in hosts.load_adapters() if cls.label))
            self.warn(UNSUPPORTED.format(model=hosts.describe_model(sd_model), supported=supported))
            return False
        self.args = self.requested.for_family(adapter.family)
        self.run.settings = self.args.settings
        ctx = None
        try:
            adapter.check()
            negative = self._negative_for(p, adapter)
            image = self._negative_image_for(p, adapter)
            if negative.is_empty and image is None:  # nothing to steer away from: the host's own image
                self.warn(EMPTY_NEGATIVE)
                return False
            self.run.negative_image = image
            ctx = SamplingContext(self.run, negative, self.args.single_pass)
            self.ctx = ctx
            adapter.attach(p, ctx)
            patch = adapter.patch(self.run)
            patch.apply()
            ctx.add_undo(patch.restore)
            self.host_backend = attention_backend.prefer_host_backend(ctx)
        except PatchError as exc:
            self.end_pass()
            self.warn(f"VSF is off for this image: {exc}")
            return False
        except Exception as exc:  # noqa: BLE001 - never a stack trace in the UI; console keeps it
            log.error("[VSF] could not set up guidance:\n%s", traceback.format_exc())
            self.end_pass()
            self.warn(f"VSF is off for this image: {type(exc).__name__}: {exc}")
            return False
        self.adapter = adapter
        self.passes += 1
        _current = weakref.ref(self)
        _mark_patched(self)
        note = adapter.backend_note()
        if note:
            self.warn(note)
        if self.args.show_map:
            recorder = self.run.record_negative_map()  # a fresh one per pass: the map of this pass only
            if recorder.undefined_reason is not None:
                self.warn(negative_map.NO_MAP.format(reason=recorder.undefined_reason))
        infotext.write(p, self.args)
        return True

    def end_pass(self) -> None:
        """Undo everything the current pass changed (idempotent)."""
        ctx, self.ctx = self.ctx, None
        _mark_patched(None, only_if=self)
        recorder, self.run.negative_map = self.run.negative_map, None
        if ctx is None:
            return
        if recorder is not None:
            self.map_recorder = recorder
        note = attention_backend.used_backend_note(self.host_backend)
        while ctx.undo:
            undo = ctx.undo.pop()
            try:
                undo()
            except Exception:  # noqa: BLE001 - keep undoing the rest
                log.error("[VSF] restoring failed:\n%s", traceback.format_exc())
        self.run.set_text(0, None)
        self.run.negative_image = None
        if note:
            self.warn(note)

    def on_step(self, params: Any) -> None:
        """Step callback: the sampler step of this model call for the window and the alpha schedule
        (`steps.step_of_call`: the hosts' `sampling_step` lags one step), and the uncond for adapters."""
        position = steps.step_of_call(params)
        self.run.set_step(position.step, position.total)
        if self.ctx is not None:
            self.ctx.host_state["text_uncond"] = getattr(params, "text_uncond", None)

    def _negative_for(self, p: Any, adapter: HostAdapter) -> NegativeText:
        prompts = _pass_negative_prompts(p)
        key = (adapter.name, id(adapter.sd_model), tuple(prompts))
        if key not in self._negatives:
            self._negatives[key] = adapter.encode_negative(p, prompts, self.args.settings)
        return self._negatives[key]

    def _negative_image_for(self, p: Any, adapter: HostAdapter) -> Any:
        """The negative image as `adapter`'s model takes it, encoded once per generation and size (the
        hires pass reuses the first pass's, as the host's references); None without one."""
        image = self.args.negative_image
        if image is None:
            return None
        if not adapter.takes_negative_image():
            raise PatchError(negative_image_refusal(adapter.sd_model))
        key = (adapter.name, id(adapter.sd_model), getattr(p, "width", None), getattr(p, "height", None))
        if key not in self._negative_images:
            self._negative_images = {key: adapter.encode_negative_image(p, image)}  # one held at a time
        return self._negative_images[key]

    # -- "Show where the negative acts" ------------------------------------------------------------------
    def add_map_image(self, p: Any, pp: Any) -> None:
        """The map of output `pp.image` (see the module docstring); nothing when the option is off."""
        if not self.args.show_map:
            return
        row = getattr(p, "batch_index", None)
        row = row if isinstance(row, int) else self._outputs_seen
        self._outputs_seen += 1
        recorder = self.map_recorder
        if recorder is None:  # this image's last pass ran unguided: its notes say why
            if self.passes:
                self.warn(negative_map.NO_MAP.format(reason="the pass that made it was not guided"))
            return
        image = getattr(pp, "image", None)
        if image is None or not hasattr(image, "size"):
            return
        try:
            made = negative_map.map_for_output(recorder, image, row)
        except Exception as exc:  # noqa: BLE001 - a map must never cost the image
            log.error("[VSF] negative-attention map failed:\n%s", traceback.format_exc())
            made = f"{type(exc).__name__}: {exc}"
        if made is None:  # a later frame of a video: its map went with the first frame
            return
        if isinstance(made, str):
            if recorder.undefined_reason is None:  # NAG / NASA: said once when the pass began
                self.warn(negative_map.NO_MAP.format(reason=made))
            return
        extra = getattr(p, "extra_result_images", None)
        (extra if isinstance(extra, list) else self.map_images).append(made.image)
        batch = int(getattr(p, "batch_size", 1) or 1)
        if batch * int(getattr(p, "n_iter", 1) or 1) == 1:
            line = made.note
        else:
            line = f"Image {int(getattr(p, 'iteration', 0) or 0) * batch + row + 1}: {made.note}"
        log.warning("[VSF] %s", line)
        if callable(getattr(p, "comment", None)):
            p.comment(line)  # under the image
        infotext.write_notes(p, [*self.warnings, made.note])  # this image's infotext, which the host writes next

    # -- p.sample wrapper -----------------------------------------------------------------------------
    def wrap_sample(self, p: Any) -> None:
        """Wrap `p.sample` so that each sampling ends with `end_pass()` in a `finally`."""
        original = p.sample
        generation = weakref.ref(self)

        def sample(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                current = generation()
                if current is not None:
                    current.end_pass()

        sample.__vsf_original__ = original
        self._sample_patch = AttributePatch().add(p, "sample", sample).apply()

    def close(self) -> None:
        """End the pass and unwrap `p.sample`."""
        global _current
        self.end_pass()
        if self._sample_patch is not None:
            self._sample_patch.restore()
            self._sample_patch = None
        if _current is not None and _current() is self:
            _current = None


def _mark_patched(generation: "Generation | None", only_if: "Generation | None" = None) -> None:
    global _patched
    if only_if is None or _patched is only_if:
        _patched = generation


def _pass_negative_prompts(p: Any) -> list[str]:
    """Negative prompts of the images of the current batch, for the pass about to run."""
    prompts = None
    if getattr(p, "is_hr_pass", False):
        prompts = getattr(p, "hr_negative_prompts", None)
    if not prompts:
        prompts = getattr(p, "negative_prompts", None)
    if not prompts:
        prompt = getattr(p, "negative_prompt", "") or ""
        prompts = [prompt] * max(int(getattr(p, "batch_size", 1) or 1), 1)
    return [str(x or "") for x in prompts]


NEGATIVE_IMAGE_MODELS = "Flux Kontext, Qwen-Image-Edit"


def negative_image_refusal(sd_model: Any) -> str:
    return (f"a negative image needs a model that takes reference images ({NEGATIVE_IMAGE_MODELS} on Forge Neo); "
            f"the loaded model ({hosts.describe_model(sd_model)}) does not. Remove the negative image or load such a model.")


def _negative_image_error(p: Any, args: ScriptArgs) -> str | None:
    """Why this request's negative image cannot be used with the loaded model, or None (none given, VSF off,
    or a model that takes one)."""
    if not args.enabled or args.negative_image is None:
        return None
    sd_model = getattr(p, "sd_model", None)
    adapter = hosts.find_adapter(sd_model)
    try:
        if adapter is not None and adapter.takes_negative_image():
            return None
    except Exception:  # noqa: BLE001 - a host that changed: refused below, as a model without references
        log.error("[VSF] could not tell whether the model takes reference images:\n%s", traceback.format_exc())
    return negative_image_refusal(sd_model)


def _refuse(error: Exception):
    def refused(*_args, **_kwargs):
        raise error
    return refused


def _install_refusal(p: Any, error: Exception) -> AttributePatch:
    """Make the request fail with `error` at the first host step that can carry it out. Every host calls
    `p.init` right after the scripts' `process` hook and before anything else of the generation; img2img's
    `init` VAE-encodes the init image with the global torch RNG (and writes infotext, may save the init
    image), so refusing there leaves the RNG, and so the next image, exactly as they were. `p.sample`
    refuses too, for a host path that skips `init`."""
    patch = AttributePatch()
    if callable(getattr(p, "init", None)):
        patch.add(p, "init", _refuse(error))
    return patch.add(p, "sample", _refuse(error)).apply()


def argument_error(message: str) -> VSFSettingsError:
    """The error a bad request fails with. On the hosts (FastAPI present) it is also an
    `HTTPException` with status 422, so `/sdapi/v1/*` answers "422, detail: <message>" through the
    host's own exception handler instead of a 500 with a server-side traceback; in the UI it reads
    as the message."""
    try:
        from fastapi import HTTPException  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - no FastAPI (tests, CLI): a plain settings error
        return VSFSettingsError(message)

    class VSFRequestError(VSFSettingsError, HTTPException):
        def __init__(self, text: str):
            HTTPException.__init__(self, status_code=422, detail=text)
            self.args = (text,)

        def __str__(self) -> str:
            return str(self.detail)

    return VSFRequestError(message)


def start(p: Any, script_args: Sequence[Any]) -> Generation | None:
    """Script `process` hook: parse the arguments and set up the generation (module docstring)."""
    finish(p)  # a reused `p` (or a failed earlier run) starts clean
    if _patched is not None:  # never start on top of another generation's live patches
        _patched.end_pass()
    try:
        args = apply_overrides(parse_script_args(script_args), getattr(p, OVERRIDES_ATTR, None))
        refusal = _negative_image_error(p, args)
        if refusal is not None:
            raise VSFSettingsError(refusal)
    except VSFSettingsError as exc:
        log.error("[VSF] %s", exc)
        setattr(p, GENERATION_ATTR, _install_refusal(p, argument_error(f"Value Sign Flip: {exc}")))
        return None
    if not args.enabled:
        return None
    generation = Generation(p, args)
    generation.wrap_sample(p)
    setattr(p, GENERATION_ATTR, generation)
    return generation


def generation_of(p: Any) -> Generation | None:
    """The generation kept on `p`, if VSF is on for it."""
    generation = getattr(p, GENERATION_ATTR, None)
    return generation if isinstance(generation, Generation) else None


def begin_pass(p: Any) -> bool:
    """Script `process_before_every_sampling` hook."""
    generation = generation_of(p)
    return generation.begin_pass(p) if generation is not None else False


def add_map_image(p: Any, pp: Any) -> None:
    """Script `postprocess_image` hook: the output's negative-attention map when asked for."""
    generation = generation_of(p)
    if generation is not None:
        generation.add_map_image(p, pp)


def finish(p: Any, processed: Any = None) -> None:
    """Script `postprocess` hook: undo everything and forget the generation."""
    held = getattr(p, GENERATION_ATTR, None)
    if isinstance(held, Generation):
        held.close()
        if held.map_images and isinstance(getattr(processed, "images", None), list):
            # A host without `p.extra_result_images`: after the outputs, each with an infotext entry so
            # that the gallery's index still finds one (the generation's first, as a grid's).
            processed.images.extend(held.map_images)
            infotexts = getattr(processed, "infotexts", None)
            if isinstance(infotexts, list) and infotexts:
                infotexts.extend([infotexts[0]] * len(held.map_images))
    elif isinstance(held, AttributePatch):  # the refusal installed for bad arguments
        held.restore()
    if held is not None:
        try:
            delattr(p, GENERATION_ATTR)
        except AttributeError:
            pass


def on_cfg_denoiser(params: Any) -> None:
    """Step callback, registered once: route the step to the generation whose sampler this is."""
    p = getattr(getattr(params, "denoiser", None), "p", None)
    generation = generation_of(p) if p is not None else None
    if generation is None and _current is not None:
        generation = _current()
    if generation is not None:
        generation.on_step(params)
