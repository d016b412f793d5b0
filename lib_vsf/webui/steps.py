"""Which sampler step a model call belongs to, on the A1111-family hosts (A1111, Forge, Forge Neo, reForge).

The spec ("Per-step scheduling"): `step` is the 0-based index of the sampler step the model call belongs
to — every call inside step i (a second-order corrector, a restart) counts as step i — and `total` is
the number of steps of that sampling pass (img2img and hires passes count their own).

What the hosts hand to `on_cfg_denoiser` does not say that. `params.sampling_step` is
`state.sampling_step`, which the sampler's `callback_state` sets to i only *after* step i's first model
call (k-diffusion samplers) or after the whole step (the timestep samplers DDIM/PLMS): model calls read
the previous step's index, 0 for both step 0 and step 1. Even corrected by one, it cannot tell a Heun
corrector (called after the callback, at exactly `sigmas[i + 1]`) from step i + 1's first call (called
at the same sigma, after the same callback). Nor can the sigma: its position in the schedule is
ambiguous at that endpoint, and `s_churn` and restarts move it outside its interval.

What is exact at the time of the call, in order of preference:

1. **The sampler's own loop index.** Every k-diffusion sampler (A1111's pinned k-diffusion, Forge's and
   Neo's bundled copies: Euler, Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ 2S a / SDE / 2M / 2M SDE / 3M
   SDE, HeunPP2, IPNDM, DEIS, LCM, ...) and the hosts' timestep samplers (DDIM, DDIM CFG++, PLMS) are
   `f(model, x, sigmas | timesteps, ...)` that call `model` — the host's CFG denoiser, directly —
   only inside `for i in trange(len(schedule) - 1)`. So the frame that called the CFG denoiser, when its
   `model` *is* that denoiser and it holds an int `i` and the schedule, gives `step = i` and
   `total = len(schedule) - 1`, for every call of the step, correctors included. (DDIM/PLMS run one
   step fewer than requested, `len(timesteps) - 1`; that is the pass's real number of steps.) That `i`
   is the running loop's index, not one left over from an earlier loop (the restart sampler's own frame
   holds such an `i`), is checked twice: the line being run lies inside a `for i in ...` loop of the
   function's source (read once per function), and the host's lagged `sampling_step` is i - 1 or i;
   a sigma schedule must also have the host's step count (a sampler that does its first step before
   its loop and then loops over the rest of the schedule fails that).
   (Checked against the sources of A1111 82a973c0 with k-diffusion ab527a9a, Forge dfdcbab6, Forge Neo
   6e1e0d5a and reForge 3b56b268.)
2. **The CFG denoiser's call counter**, for samplers whose model calls come from elsewhere (A1111's
   restart sampler calls from a nested step function, UniPC from its solver, DPM fast/adaptive from
   theirs): the hosts' denoiser counts its calls in `step` (reset per pass), and `launch_sampling` sets
   `steps` and `total_steps` = the calls it expects (`steps`, x 2 for samplers declared second order,
   restart included). The host itself reads `step / total_steps` as progress (Skip Early CFG, refiner
   switch); `step * steps // total_steps` is exact for samplers with a fixed number of calls per step
   (second-order ones make one call fewer at the last step, which still maps to the last step). The
   restart sampler's steps are its Heun steps, as the host counts them (its restart segments included).
3. **The host's `sampling_step` as given**, only when neither is there (a CFG denoiser without the
   counter); it may lag one step.

Only reading is done: no frame is kept, nothing of the host is changed.
"""
from __future__ import annotations

import ast
import inspect
import operator
import sys
import textwrap
from dataclasses import dataclass
from types import CodeType
from typing import Any, Sequence

# Frames between this module and the sampler loop: step_of_call, the runner's callback, the host's
# callback dispatcher, extension wrappers around the denoiser, the denoiser's forward, torch's module
# call machinery. Well under this in every host.
MAX_FRAMES = 48
SCHEDULE_NAMES = ("sigmas", "timesteps")

SAMPLER_LOOP, CALL_COUNTER, HOST_STEP = "sampler loop", "call counter", "host sampling_step"


@dataclass(frozen=True)
class StepPosition:
    """Step `step` of `total` (0-based), and which source said so."""

    step: int
    total: int
    source: str


def step_of_call(params: Any) -> StepPosition:
    """The sampler step of the model call that fired `on_cfg_denoiser(params)` (module docstring).

    Must be called from inside that callback (it looks up the caller's stack)."""
    denoiser = getattr(params, "denoiser", None)
    if denoiser is not None:
        host_step = _as_int(getattr(params, "sampling_step", None))
        position = _sampler_loop_position(denoiser, host_step) or _call_counter_position(denoiser)
        if position is not None:
            return position
    step = _as_int(getattr(params, "sampling_step", 0)) or 0
    total = _as_int(getattr(params, "total_sampling_steps", 0)) or 0
    return StepPosition(max(step, 0), max(total, 0), HOST_STEP)


def _sampler_loop_position(denoiser: Any, host_step: int | None) -> StepPosition | None:
    """Source 1: the loop index of the sampler function that called `denoiser`."""
    frame = sys._getframe(1)
    try:
        depth = 0
        while frame is not None and not _is_frame_of(frame, denoiser):  # up to the denoiser's forward
            frame, depth = frame.f_back, depth + 1
            if depth > MAX_FRAMES:
                return None
        # past the denoiser (and wrappers around its forward) and torch's `Module.__call__`
        while frame is not None and (_is_frame_of(frame, denoiser) or _is_torch_frame(frame)):
            frame, depth = frame.f_back, depth + 1
            if depth > MAX_FRAMES:
                return None
        if frame is None:
            return None
        if not _inside_step_loop(frame.f_code, frame.f_lineno):
            return None
        parameters = frame.f_code.co_varnames[:frame.f_code.co_argcount]
        return _loop_position(frame.f_locals, denoiser, host_step, parameters)
    finally:
        del frame  # a frame reference would keep the whole stack alive


def _loop_position(local_vars: Any, denoiser: Any, host_step: int | None,
                   parameters: Sequence[str] = ("model", "x") + SCHEDULE_NAMES) -> StepPosition | None:
    """Step from the locals of the frame that called `denoiser`: its `i` and its schedule *argument*
    (`parameters`: the function's argument names; DDIM also has a local `sigmas` that is not it)."""
    if local_vars.get("model") is not denoiser:
        return None
    step = _as_int(local_vars.get("i"))
    name = next((n for n in SCHEDULE_NAMES if n in parameters and local_vars.get(n) is not None), None)
    if step is None or name is None:
        return None
    try:
        total = len(local_vars[name]) - 1
    except TypeError:
        return None
    if not 0 <= step < total:
        return None
    # A sigma schedule has the host's step count (`launch_sampling`'s `steps`, also for img2img); one that
    # does not was cut by the sampler itself (a first step done before its loop), so `i` is not the step.
    # The timestep samplers run fewer steps than the host counts (see above): no such check there.
    host_steps = _as_int(getattr(denoiser, "steps", None))
    if name == "sigmas" and host_steps is not None and total != host_steps:
        return None
    # A model call inside step i sees the host's lagged step i - 1 or i. Anything else means `i` is not
    # the running loop's index (a variable left over from an earlier loop): use the call counter.
    if host_step is not None and not step - 1 <= host_step <= step:
        return None
    return StepPosition(step, total, SAMPLER_LOOP)


# code object of a sampler function -> line spans of its `for i in ...` loop bodies (read once from source)
_step_loops: dict[CodeType, tuple[tuple[int, int], ...]] = {}


def _inside_step_loop(code: CodeType, line: int | None) -> bool:
    """The line being run in `code` lies inside a `for i in ...` loop of that function's source, so `i`
    is the running loop's index (not one left over from an earlier loop, nor unbound yet)."""
    if code not in _step_loops:
        _step_loops[code] = _loop_spans(code)
    return line is not None and any(first <= line <= last for first, last in _step_loops[code])


def _loop_spans(code: CodeType) -> tuple[tuple[int, int], ...]:
    try:
        lines, start = inspect.getsourcelines(code)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, IndentationError):  # no source: the counter decides
        return ()
    offset = max(start, 1) - 1
    return tuple((offset + node.body[0].lineno, offset + node.end_lineno) for node in ast.walk(tree)
                 if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == "i")


def _call_counter_position(denoiser: Any) -> StepPosition | None:
    """Source 2: the denoiser's call counter over the calls the host expects for the pass."""
    calls = _as_int(getattr(denoiser, "step", None))
    steps = _as_int(getattr(denoiser, "steps", None))
    expected = _as_int(getattr(denoiser, "total_steps", None))
    if calls is None or steps is None or expected is None or calls < 0 or steps < 1 or expected < steps:
        return None
    # DPM adaptive may call more often than expected: its extra calls belong to the last step
    return StepPosition(min(calls * steps // expected, steps - 1), steps, CALL_COUNTER)


def _is_frame_of(frame: Any, obj: Any) -> bool:
    return frame.f_locals.get("self") is obj


def _is_torch_frame(frame: Any) -> bool:
    name = frame.f_globals.get("__name__") or ""
    return name == "torch" or name.startswith("torch.")


def _as_int(value: Any) -> int | None:
    """`value` as an int when it is an integer (Python or a 0-d integer tensor / numpy scalar), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return None
