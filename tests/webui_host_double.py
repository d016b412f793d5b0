"""A small stand-in for an A1111/Forge host, for the extension's glue tests (no WebUI needed).

Not host code: a few classes that behave, at the points the extension touches, as the hosts are
documented to behave (../shared/docs/HOSTS.md):

- fake `gradio` (components record their value and listeners) and `modules.ui_components.InputAccordion`;
- `modules.scripts` (`Script`, `AlwaysVisible`, `scripts_data` holding an `xyz_grid.py` entry),
  `modules.script_callbacks` (`on_cfg_denoiser`, `on_before_ui`), `modules.shared.opts`;
- `HostDouble.load_script()` imports `scripts/vsf.py` the way hosts load extension scripts;
- `process_images(p)` runs the hooks in the hosts' order (`process`, then `p.init`, then `p.sample` per
  batch), swallowing hook exceptions as hosts do; `Img2ImgProcessing.init` draws from the global RNG; and
  `p.sample` runs the hosts' sampling structure (see "the sampler" below): a sampler loop calls a
  CFG denoiser (`torch.nn.Module`) that fires `on_cfg_denoiser` with the hosts' lagged step
  bookkeeping and calls the "model" (`ATTENTION_MODULE.attention`), with an optional hires pass, an
  interrupt, or an exception;
- `api_args(...)`: `alwayson_scripts` copied verbatim into the script's slots, over the UI defaults;
- `DoubleAdapter`: a `HostAdapter` for `DoubleModel` that patches `ATTENTION_MODULE.attention`, and
  `ATTENTION_MODULE.cross_attention` with the Forge-family adapters' own guided call
  (`hosts._guided.guided_call`, real VSF attention);
- outputs (`DoubleModel(image_grid=(h, w))`): each model call also runs one real cross-attention of
  `h*w` image tokens over the text stream (positive + the pass's negatives, set as the adapters set it);
  after each batch the last call's output is decoded into one PIL image per sample, and the hosts'
  per-image loop runs (`p.batch_index`, `postprocess_image(p, pp)`, then that image's infotext), then
  `postprocess(p, processed)` with `processed.images`, `infotexts`, `extra_images`
  (`p.extra_result_images`, which the hosts show after the outputs and append to the API's `images`).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import os
import sys
import types
from typing import Any

import torch

from lib_vsf.patching import AttributePatch, check_callable
from lib_vsf.state import NegativeText
from lib_vsf.webui import hosts
from lib_vsf.webui.hosts._guided import guided_call
from lib_vsf.webui.hosts.base import HostAdapter, SamplingContext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- fake gradio ---------------------------------------------------------------------------------------------

class Component:
    """A gradio component: keeps its constructor kwargs, value and `.change` listeners."""

    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        self.label = kwargs.get("label")
        self.elem_id = kwargs.get("elem_id")
        self.listeners: list[dict] = []
        if _Context.stack:
            _Context.stack[-1].children.append(self)

    def change(self, fn=None, inputs=None, outputs=None, **kwargs):
        if _Context.require_blocks and not _Context.stack:
            raise AttributeError("Cannot call change outside of a gradio.Blocks context.")
        self.listeners.append({"fn": fn, "inputs": inputs or [], "outputs": outputs or []})

    def fire(self):
        """Run this component's listeners as gradio would, applying `gr.update` results."""
        for listener in self.listeners:
            result = listener["fn"](*[c.value for c in listener["inputs"]])
            results = result if isinstance(result, tuple) else (result,)
            changed = []
            for target, update in zip(listener["outputs"], results):  # gradio sets all outputs first ...
                if isinstance(update, dict) and "value" in update and target.value != update["value"]:
                    target.value = update["value"]
                    changed.append(target)
            for target in changed:  # ... then their change events run, seeing every new value
                target.fire()


class _Context(Component):
    stack: list = []
    require_blocks = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.children: list = []

    def __enter__(self):
        _Context.stack.append(self)
        return self

    def __exit__(self, *exc):
        _Context.stack.pop()
        return False


def make_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    gr.__version__ = "double"
    for name in ("Dropdown", "Slider", "Checkbox", "Radio", "Number", "Textbox", "HTML", "Markdown", "Image"):
        setattr(gr, name, type(name, (Component,), {}))
    for name in ("Row", "Column", "Group", "Accordion", "Blocks"):
        setattr(gr, name, type(name, (_Context,), {}))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gr


class InputAccordion(_Context):
    """`modules.ui_components.InputAccordion`: a context manager whose value is the enable checkbox."""


# -- fake modules.* ------------------------------------------------------------------------------------------

class Script:
    """`modules.scripts.Script` as far as the extension uses it."""

    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError


class Options:
    def __init__(self, **data):
        object.__setattr__(self, "data", dict(data))

    def __getattr__(self, item):
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(item) from None


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class InterruptedException(BaseException):
    """The hosts' sampler interrupt (caught inside sampling, which then returns early)."""


class State:
    """`modules.shared.state`: the step bookkeeping the hosts keep for progress and callbacks."""

    def __init__(self):
        self.sampling_step = 0
        self.sampling_steps = 0
        self.interrupted = self.skipped = False


class AxisOption:
    """`xyz_grid.AxisOption(label, type, apply, format_value=..., confirm=None, cost=0, choices=None)`."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply = label, type, apply
        self.confirm, self.choices = confirm, choices


def make_modules() -> dict[str, types.ModuleType]:
    modules = types.ModuleType("modules")
    modules.__path__ = []
    scripts = types.ModuleType("modules.scripts")
    scripts.Script = Script
    scripts.AlwaysVisible = object()
    xyz_grid = types.ModuleType("xyz_grid.py")
    xyz_grid.AxisOption = AxisOption
    xyz_grid.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Steps", int, None)]
    xyz_class = type("Script", (Script,), {"__module__": "xyz_grid.py"})
    scripts.scripts_data = [types.SimpleNamespace(script_class=xyz_class, module=xyz_grid, path="xyz_grid.py")]
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.registered = {"cfg_denoiser": [], "before_ui": []}
    callbacks.on_cfg_denoiser = lambda fn, **kw: callbacks.registered["cfg_denoiser"].append(fn)
    callbacks.on_before_ui = lambda fn, **kw: callbacks.registered["before_ui"].append(fn)
    callbacks.CFGDenoiserParams = CFGDenoiserParams
    shared = types.ModuleType("modules.shared")
    shared.opts = Options(skip_early_cond=0.0, sd3_enable_t5=False)
    shared.state = State()
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = InputAccordion
    for name, mod in (("scripts", scripts), ("script_callbacks", callbacks), ("shared", shared),
                      ("ui_components", ui_components)):
        setattr(modules, name, mod)
    return {"modules": modules, "modules.scripts": scripts, "modules.script_callbacks": callbacks,
            "modules.shared": shared, "modules.ui_components": ui_components, "gradio": make_gradio()}


# -- the model and its adapter -------------------------------------------------------------------------------

def _host_attention(q, k, v):
    return q + k + v


def _host_cross_attention(q, k, v, heads):
    """The host's own attention `(q, k, v, heads)` on `[B, L, H*D]`, as the Forge-family hosts have it."""
    b, length, width = q.shape
    q, k, v = (t.reshape(t.shape[0], -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, length, width)


ATTENTION_MODULE = types.ModuleType("double_host_attention")
ATTENTION_MODULE.attention = _host_attention
ATTENTION_MODULE.cross_attention = _host_cross_attention
HOST_ATTENTION = _host_attention
HOST_CROSS_ATTENTION = _host_cross_attention
TEXT_WIDTH, HEADS, POSITIVE_TOKENS = 4, 2, 3  # the double's text stream: 3 positive tokens of width 4


class DoubleModel:
    """A supported model: `DoubleAdapter` matches it. `supported=False` makes an unknown model.
    `a1111_single_pass=True`: the adapter forces its single pass the A1111 way (the `skip_early_cond`
    option, `A1111SD3Adapter._force_single_pass`), as the A1111 SD3 and UNet adapters do."""

    def __init__(self, supported=True, a1111_single_pass=False, image_grid=None, takes_images=False):
        self.is_double = supported
        self.a1111_single_pass = a1111_single_pass
        self.image_grid = image_grid  # (h, w) image tokens: the model makes outputs (module docstring)
        self.takes_images = takes_images  # an edit model: takes reference images, so a negative image
        self.encoded: list[list[str]] = []
        self.encoded_images: list = []  # each negative image the adapter encoded (PIL)
        self.attached: list[SamplingContext] = []
        self.undone = 0


class DoubleAdapter(HostAdapter):
    """Adapter for `DoubleModel`: negatives of one token per word, a checked module-level patch."""

    name = "double"
    host = "double"
    family = "sd3"
    label = "host double"
    priority = 0

    @classmethod
    def matches(cls, sd_model):
        return bool(getattr(sd_model, "is_double", False))

    def check(self):
        check_callable(ATTENTION_MODULE, "attention", ("q", "k", "v"))

    def encode_negative(self, p, negative_prompts, settings):
        self.sd_model.encoded.append(list(negative_prompts))
        return NegativeText.from_sequences([torch.ones(len(x.split()), 4) for x in negative_prompts])

    def takes_negative_image(self):
        return self.sd_model.takes_images

    def encode_negative_image(self, p, image):
        from lib_vsf.webui.hosts._reference_tokens import ReferenceLatent

        self.sd_model.encoded_images.append(image)
        return ReferenceLatent(torch.ones(1, 4, 2, 2), 1)

    def attach(self, p, ctx):
        if ctx.single_pass and self.sd_model.a1111_single_pass:
            from lib_vsf.webui.hosts.a1111_sd3 import A1111SD3Adapter
            A1111SD3Adapter._force_single_pass(self, p, ctx)
        self.sd_model.attached.append(ctx)

        def undo():
            self.sd_model.undone += 1
        ctx.add_undo(undo)

    def patch(self, run):
        def guided_attention(q, k, v):
            run.calls += 1
            return q - k - v

        def guided_cross_attention(q, k, v, heads):
            if run.negative_len == 0 or k.shape[1] != run.text_len:
                return HOST_CROSS_ATTENTION(q, k, v, heads)
            return guided_call(q, k, v, heads, run.cross_layout(total=k.shape[1]), run, joint=False)
        return (AttributePatch().add(ATTENTION_MODULE, "attention", guided_attention)
                .add(ATTENTION_MODULE, "cross_attention", guided_cross_attention))


# -- the sampler ---------------------------------------------------------------------------------------------
#
# The hosts' step bookkeeping (../shared/docs/HOSTS.md, "Step bookkeeping"), replayed in their order:
# `launch_sampling` sets `state.sampling_steps` and `state.sampling_step = 0`; the sampler function calls
# the CFG denoiser (a `torch.nn.Module`, called directly from the sampler's loop) and calls the host's
# `callback_state`, which sets `state.sampling_step = i`, only *after* step i's first model call
# (k-diffusion samplers) or after the whole step (the timestep samplers DDIM/PLMS). So a model call reads
# the previous step's index. The sampler functions below are written here after the structure of
# k-diffusion's and the hosts' samplers (argument names, loop, where the model and the callback are
# called); their arithmetic is a trivial stand-in.

def _before_step(model, i):
    """The user's interrupt / a failure (e.g. out of memory) arriving before step i."""
    p = model.p
    if i == p.interrupt_at_step:
        raise InterruptedException()
    if i == p.fail_at_step:
        raise RuntimeError("CUDA out of memory (double)")


def _label(model, i):
    """Mark the model call just made with the sampler step it belongs to (the test's ground truth)."""
    model.p.trace[-1]["step"] = i


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """First order (k-diffusion `sample_euler`): one model call per step, then the callback."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        _before_step(model, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _label(model, i)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Second order (k-diffusion `sample_heun`): the callback after the first call, then the corrector at
    exactly `sigmas[i + 1]`, the sigma of step i + 1's first call; the last step (to sigma 0) is Euler."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        _before_step(model, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _label(model, i)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            _label(model, i)
            x = x + (d + (x_2 - denoised_2) / sigmas[i + 1]) / 2 * dt
    return x


def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A1111's restart sampler's structure (without the restarts): the model is called from a nested step
    function, never from the sampler's own loop, and a loop variable `i` left over from building the step
    list is not the current step. Every step is second order except the last."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    step_id = 0

    def heun_step(x, old_sigma, new_sigma):
        nonlocal step_id
        _before_step(model, step_id)
        denoised = model(x, old_sigma * s_in, **extra_args)
        _label(model, step_id)
        if callback is not None:
            callback({"x": x, "i": step_id, "sigma": new_sigma, "sigma_hat": old_sigma, "denoised": denoised})
        d = (x - denoised) / old_sigma
        if new_sigma == 0:
            x = x + d * (new_sigma - old_sigma)
        else:
            x_2 = x + d * (new_sigma - old_sigma)
            model(x_2, new_sigma * s_in, **extra_args)
            _label(model, step_id)
            x = x_2
        step_id += 1
        return x

    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
    for old_sigma, new_sigma in step_list:
        x = heun_step(x, old_sigma, new_sigma)
    return x


def sample_stale_index(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A sampler that calls the model from its own frame, after a loop over `i` that only built its step
    list (so `i` is not the current step there), second order except the last step."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
    for step_id, (old_sigma, new_sigma) in enumerate(step_list):
        _before_step(model, step_id)
        model(x, old_sigma * s_in, **extra_args)
        _label(model, step_id)
        if callback is not None:
            callback({"x": x, "i": step_id, "sigma": new_sigma, "sigma_hat": old_sigma, "denoised": x})
        if new_sigma != 0:
            model(x, new_sigma * s_in, **extra_args)
            _label(model, step_id)
    return x


def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """A timestep sampler (the hosts' `sd_samplers_timesteps_impl.ddim`): `timesteps` ascending, walked
    from the end, one model call per step and the callback at the *end* of the step. As in the hosts,
    `len(timesteps)` is the requested step count and the loop runs one step fewer. Like the hosts' DDIM it
    has a local `sigmas` (its eta noise levels, one per timestep) that is not a sigma schedule."""
    extra_args = extra_args or {}
    sigmas = torch.zeros(len(timesteps))  # eta = 0
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        _before_step(model, i)
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        _label(model, i)
        x = x - 0.01 * e_t + sigmas[index] * x
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x})
    return x


def plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """The hosts' `plms` structure: the first step calls the model twice (pseudo improved Euler), every
    later step once; the callback at the end of each step."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        _before_step(model, i)
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        _label(model, i)
        if i == 0:
            model(x - 0.01 * e_t, timesteps[max(index - 1, 0)].item() * s_in, **extra_args)
            _label(model, i)
        x = x - 0.01 * e_t
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x})
    return x


# name: (function, schedule argument, second order as the hosts' sampler options declare it)
SAMPLERS = {
    "Euler": (sample_euler, "sigmas", False),
    "Heun": (sample_heun, "sigmas", True),
    "Restart": (sample_restart, "sigmas", True),
    "Stale index": (sample_stale_index, "sigmas", True),
    "DDIM": (ddim, "timesteps", False),
    "PLMS": (plms, "timesteps", False),
}


class CFGDenoiser(torch.nn.Module):
    """The hosts' `sd_samplers_cfg_denoiser.CFGDenoiser` at the points the extension can read: `step`
    counts its own calls (reset per pass by `initialize`), `steps` / `total_steps` as `launch_sampling`
    sets them (`total_steps` = expected calls: steps x 2 for second-order samplers), `p`, `sampler`.
    `forward` fires `on_cfg_denoiser` with `state.sampling_step` as the host has it at that moment, calls
    the model and records what it saw in `p.trace`."""

    def __init__(self, sampler):
        super().__init__()
        self.sampler, self.p = sampler, None
        self.step, self.steps, self.total_steps = 0, None, None

    def forward(self, x, sigma, **extra_args):
        p, state = self.p, self.sampler.state
        params = CFGDenoiserParams(x, None, sigma, state.sampling_step, state.sampling_steps, "cond", "uncond", self)
        for callback in p.host.callbacks["cfg_denoiser"]:
            callback(params)
        # A1111 compares its own call counter with the expected calls (`self.step / self.total_steps`).
        p.host.skip_early_cfg(p, self.step * p.steps / (self.total_steps or p.steps))
        ctx = p.sd_model.attached[-1] if getattr(p.sd_model, "attached", None) else None
        out = ATTENTION_MODULE.attention(torch.ones(1), torch.ones(1), torch.ones(1))
        guided = bool(ctx is not None and ctx.guided_now() and float(out) < 0)
        p.trace.append({"hires": bool(p.is_hr_pass), "step": None, "call": self.step, "host_step": params.sampling_step,
                        "patched": ATTENTION_MODULE.attention is not HOST_ATTENTION, "guided": guided,
                        "alpha": ctx.run.guidance().alpha if guided else None,
                        "recorder": ctx.run.negative_map if ctx is not None else None})
        if getattr(p.sd_model, "image_grid", None):
            p.latent = _image_attention(p, ctx, self.step)
        self.step += 1
        return x * 0.5


def _image_attention(p, ctx, call):
    """One cross-attention of the model's image tokens over its text stream (seeded per batch and call);
    the negatives join the stream, as the adapters' model wrappers make them, on the guided steps."""
    h, w = p.sd_model.image_grid
    g = torch.Generator().manual_seed(1000 * (1 + int(p.iteration)) + 10 * int(p.is_hr_pass) + call)
    q = torch.randn(p.batch_size, h * w * (4 if p.is_hr_pass else 1), TEXT_WIDTH, generator=g)
    text = torch.randn(p.batch_size, POSITIVE_TOKENS, TEXT_WIDTH, generator=g)
    if ctx is not None and ctx.guided_now():
        negative = ctx.negative.for_batch(p.batch_size)
        ctx.run.set_text(POSITIVE_TOKENS, negative)
        text = torch.cat([text, negative.embeds.to(text.dtype)], dim=1)
    p.trace[-1]["q"], p.trace[-1]["text"] = q, text  # what the model's attention saw (for the tests' eq. 8)
    try:
        return ATTENTION_MODULE.cross_attention(q, text, text, HEADS)
    finally:
        if ctx is not None:
            ctx.run.set_text(0, None)


class Sampler:
    """`sd_samplers_common.Sampler` (KDiffusionSampler, CompVisSampler) as far as step bookkeeping goes."""

    def __init__(self, state, name):
        self.func, self.schedule_name, self.second_order = SAMPLERS[name]
        self.state = state
        self.model_wrap_cfg = CFGDenoiser(self)

    def callback_state(self, d):
        self.state.sampling_step = d["i"]

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps * 2 if self.second_order else steps
        self.state.sampling_steps, self.state.sampling_step = steps, 0
        try:
            return func()
        except InterruptedException:
            return "latents"  # hosts' samplers return the last latent on interrupt / skip

    def sample(self, p, steps):
        self.model_wrap_cfg.p, self.model_wrap_cfg.step = p, 0  # `initialize(p)`
        if self.schedule_name == "sigmas":
            schedule = torch.linspace(float(steps), 0.0, steps + 1)  # descending, ends at 0 like the hosts'
        else:
            schedule = torch.arange(0, 1000, 1000 // steps) + 1
        x = torch.zeros(1)
        schedule_arg = {self.schedule_name: schedule}
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args={},
                                                             callback=self.callback_state, disable=True, **schedule_arg))


# -- processing ----------------------------------------------------------------------------------------------

class Processing:
    """`StableDiffusionProcessing` as far as the extension and the host double's sampler need."""

    def __init__(self, host: "HostDouble", sd_model=None, batch_size=2, n_iter=1, steps=4, enable_hr=False,
                 negative_prompt="blurry, text", negative_prompts=None, fail_at_step=None, interrupt_at_step=None,
                 sampler_name="Euler", extra_result_images=True):
        self.host = host
        self.sd_model = sd_model if sd_model is not None else DoubleModel()
        self.batch_size, self.n_iter, self.steps, self.enable_hr = batch_size, n_iter, steps, enable_hr
        self.all_negative_prompts = negative_prompts or [negative_prompt] * (batch_size * n_iter)
        self.negative_prompts = None
        self.hr_negative_prompts = None
        self.is_hr_pass = False
        self.extra_generation_params: dict[str, Any] = {}
        self.comments: dict[str, int] = {}
        self.script_args: list = []
        self.fail_at_step, self.interrupt_at_step = fail_at_step, interrupt_at_step
        self.sampler_name = sampler_name  # a key of SAMPLERS
        self.sampler = None
        self.trace: list[dict] = []  # one entry per model call: its sampler step, what the model saw
        # Outputs (a model with `image_grid`): the hosts' per-image bookkeeping and results.
        self.iteration, self.batch_index, self.latent = 0, None, None
        if extra_result_images:  # A1111 >= 1.7, Forge, Neo; False: an older host without the list
            self.extra_result_images: list = []
        self.processed = None
        self.latents: list[torch.Tensor] = []  # each batch's last model output, as decoded

    def comment(self, text):
        self.comments[text] = 1

    def init(self, all_prompts, all_seeds, all_subseeds):
        """`StableDiffusionProcessingTxt2Img.init`: nothing the extension can see."""

    def sample(self, **kwargs):
        """txt2img sampling: first pass and, with hires fix, a second pass; both call the hook."""
        out = self._pass(hires=False)
        if self.enable_hr:
            self.is_hr_pass = True
            self.hr_negative_prompts = self.negative_prompts
            out = self._pass(hires=True)
        return out

    def _pass(self, hires: bool):
        # The hosts create the pass's sampler, then run `process_before_every_sampling`, then sample.
        self.sampler = Sampler(self.host.modules["modules.shared"].state, self.sampler_name)
        self.host.run_hook("process_before_every_sampling", self)
        return self.sampler.sample(self, self.steps)


class Img2ImgProcessing(Processing):
    """`StableDiffusionProcessingImg2Img`: `init` (after the scripts' `process`, before any `sample`)
    VAE-encodes the init image, and the latent distribution's `sample()` draws from the *global* torch
    RNG (`torch.randn(mean.shape)`: A1111 ldm/sgm `DiagonalGaussianDistribution`, Forge/Neo
    `backend/nn/vae.py`); `sample` then seeds its own noise (`p.rng.next()`, `torch.manual_seed(seed)`)
    and denoises. `samples` holds the result, which therefore depends on the global RNG state at `init`."""

    def __init__(self, host, seed=7, latent_shape=(4, 8, 8), **kwargs):
        super().__init__(host, **kwargs)
        self.seed, self.latent_shape = seed, latent_shape
        self.init_latent = None
        self.samples = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.extra_generation_params["Denoising strength"] = 0.75
        image = torch.full((self.batch_size, *self.latent_shape), 0.5)
        self.init_latent = image + 0.1 * torch.randn(image.shape)  # the VAE's latent sample, global RNG

    def sample(self, **kwargs):
        torch.manual_seed(self.seed)
        noise = torch.randn(self.init_latent.shape)
        super().sample(**kwargs)
        self.samples = self.init_latent + 0.75 * noise
        return self.samples


class HostDouble:
    """Installs the fake modules, loads the script, and runs generations through its hooks."""

    def __init__(self):
        self._saved: dict[str, Any] = {}
        self.modules = make_modules()
        self.script = None
        self.script_module = None
        self.hook_errors: list[str] = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._saved[name] = sys.modules.get(name)
            sys.modules[name] = module
        hosts.register(DoubleAdapter)
        hosts.ADAPTERS.sort(key=lambda cls: (getattr(cls, "priority", 100), cls.name))
        return self

    def __exit__(self, *exc):
        for name, module in self._saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        if DoubleAdapter in hosts.ADAPTERS:
            hosts.ADAPTERS.remove(DoubleAdapter)
        ATTENTION_MODULE.attention = HOST_ATTENTION
        ATTENTION_MODULE.cross_attention = HOST_CROSS_ATTENTION
        return False

    def skip_early_cfg(self, p, step):
        """A1111's CFG denoiser (`sd_samplers_cfg_denoiser.py`), right after the `cfg_denoiser`
        callbacks of each model call: with the `skip_early_cond` option set and the step inside it, the
        uncond pass is skipped and `p.extra_generation_params["Skip Early CFG"]` is written (into the
        dict `p` holds at that moment)."""
        skip = getattr(self.opts, "skip_early_cond", 0.0)
        if skip != 0.0 and step / max(p.steps, 1) <= skip:
            p.extra_generation_params["Skip Early CFG"] = skip

    @property
    def callbacks(self):
        return self.modules["modules.script_callbacks"].registered

    @property
    def opts(self):
        return self.modules["modules.shared"].opts

    @property
    def xyz(self):
        return self.modules["modules.scripts"].scripts_data[0].module

    def load_script(self, is_img2img=False, headless=False):
        """Import scripts/vsf.py as a host does and build its UI (in a Blocks unless `headless`)."""
        spec = importlib.util.spec_from_file_location("vsf_script_under_test", os.path.join(ROOT, "scripts", "vsf.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.script_module = module
        self.script = module.ValueSignFlipScript()
        gr = self.modules["gradio"]
        _Context.require_blocks = headless
        if headless:
            self.components = self.script.ui(is_img2img)
        else:
            with gr.Blocks():
                self.components = self.script.ui(is_img2img)
        _Context.require_blocks = False
        return self.script

    def ui_defaults(self) -> list:
        return [c.value for c in self.components]

    def run_hook(self, name, p, *extra):
        """Call one script hook like the hosts' ScriptRunner: exceptions are reported, not raised."""
        hook = getattr(self.script, name, None)
        if hook is None:
            return
        try:
            hook(p, *extra, *p.script_args) if name != "postprocess" else hook(p, p.processed, *p.script_args)
        except Exception as exc:  # noqa: BLE001 - the hosts' errors.report
            self.hook_errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def process_images(self, p: Processing, script_args: list) -> Processing:
        """The hosts' process_images for one script: process, batches (sample), postprocess."""
        p.script_args = list(script_args)
        self.run_hook("process", p)
        p.init(None, None, None)  # all_prompts, all_seeds, all_subseeds: unused by the double
        images, infotexts = [], []
        for n in range(p.n_iter):
            p.iteration = n
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.is_hr_pass = False
            p.sample(conditioning=None, unconditional_conditioning=None)
            if p.latent is None:
                continue
            p.latents.append(p.latent)
            for i, image in enumerate(decode(p.latent, p.sd_model.image_grid, hires=p.is_hr_pass)):
                p.batch_index = i
                pp = types.SimpleNamespace(image=image, index=i + n * p.batch_size)  # PostprocessImageArgs
                self.run_hook("postprocess_image", p, pp)
                infotexts.append(self.infotext(p))  # each image's own infotext, after its hooks
                images.append(pp.image)
            p.latent = None
        p.processed = types.SimpleNamespace(images=images, infotexts=infotexts, index_of_first_image=0,
                                            extra_images=getattr(p, "extra_result_images", []))
        self.run_hook("postprocess", p)
        return p

    def api_images(self, p: Processing) -> list:
        """The API's `images`: `processed.images + processed.extra_images` (the hosts' api.py)."""
        return p.processed.images + p.processed.extra_images

    def api_args(self, args) -> list:
        """`alwayson_scripts[title]["args"]` over the UI defaults, copied verbatim (as the hosts' API)."""
        values = self.ui_defaults()
        for i, value in enumerate(args[:len(values)]):
            values[i] = value
        return values

    def infotext(self, p: Processing) -> str:
        """A parameters line as the hosts write it (values with commas or colons quoted)."""
        parts = ["Steps: 4", "Sampler: Euler"]
        for key, value in p.extra_generation_params.items():
            text = str(value)
            if any(c in text for c in ',:"'):
                text = '"' + text.replace('"', '\\"') + '"'
            parts.append(f"{key}: {text}")
        return "a cat\nNegative prompt: blurry\n" + ", ".join(parts)

    def paste(self, params: dict) -> list:
        """Values the UI shows after pasting `params` (the hosts' connect_paste: None = no update)."""
        current = {id(c): c.value for c in self.components}
        for component, key in self.script.infotext_fields:
            value = key(params) if callable(key) else params.get(key)
            if value is not None:
                current[id(component)] = value
        return [current[id(c)] for c in self.components]

    def as_request(self, p: Processing, script_args: list) -> Processing:
        """`p` as the UI/API hands it to a selectable script: `p.scripts` is the script runner, whose
        always-on scripts own slices of `p.script_args` (slot 0 is the selectable script's index)."""
        self.script.args_from, self.script.args_to = 1, 1 + len(self.components)
        p.scripts = types.SimpleNamespace(alwayson_scripts=[self.script])
        p.script_args = [0, *script_args, "X/Y/Z plot args"]
        return p

    def run_xyz(self, p: Processing, axes: list, script_args: list) -> list:
        """The X/Y/Z plot's `run` (xyz_grid.py): every axis's `confirm(p, values)` in X, Y, Z order before
        any cell, then one cell per combination (`copy(p)`, each axis's `apply`, `process_images`), a
        cell's exception reported and the cell left empty (`errors.display`, `Processed(p, [])`)."""
        self.as_request(p, script_args)
        options = [(next(o for o in self.xyz.axis_options if o.label == label), values) for label, values in axes]
        for option, values in options:
            if option.confirm:
                option.confirm(p, values)
        cells = []
        for combination in itertools.product(*(values for _, values in options)):
            cell = copy.copy(p)
            cell.comments, cell.trace = {}, []
            for (option, values), value in zip(options, combination):
                option.apply(cell, value, values)
            try:
                cells.append(self.process_images(cell, script_args))
            except Exception as exc:  # noqa: BLE001 - the host's errors.display
                self.hook_errors.append(f"xyz cell: {type(exc).__name__}: {exc}")
                cells.append(None)
        return cells

    def xyz_cell(self, p: Processing, **axes) -> Processing:
        """A copy of `p` with VSF axis values applied, as the XYZ script does per cell."""
        cell = copy.copy(p)
        cell.extra_generation_params = dict(p.extra_generation_params)
        cell.comments, cell.trace = {}, []
        for label, value in axes.items():
            option = next(o for o in self.xyz.axis_options if o.label == label)
            option.apply(cell, value, [value])
        return cell


PIXELS_PER_TOKEN = 8  # the double's decoder: one image token is 8 x 8 pixels (a UNet's finest level)


def decode(latent: torch.Tensor, grid, hires: bool = False) -> list:
    """One RGB image per sample of `[B, h*w, 4]`: channels 0-2 of each token as an 8x8 pixel block."""
    from PIL import Image

    h, w = (2 * grid[0], 2 * grid[1]) if hires else grid
    pixels = (torch.sigmoid(latent[..., :3]) * 255).round().to(torch.uint8).reshape(-1, h, w, 3)
    return [Image.fromarray(x.numpy(), "RGB").resize((w * PIXELS_PER_TOKEN, h * PIXELS_PER_TOKEN), Image.NEAREST)
            for x in pixels]


@contextlib.contextmanager
def host_double(**kwargs):
    """A HostDouble with the script loaded."""
    with HostDouble() as host:
        host.load_script(**kwargs)
        yield host
