"""Which sampler step a diffusers denoiser call belongs to, read from the scheduler at call time.

VSF-SPEC "Per-step scheduling": `step` is the 0-based index of the sampler step the model call
belongs to (a second-order scheduler's corrector call counts as the step it corrects), and `total` is
the number of steps of that sampling pass (img2img `strength` truncates the pass; it counts its own).

A diffusers pipeline loops over the timesteps of its pass and calls the denoiser once per loop entry,
then `scheduler.step()`. Second-order schedulers (Heun, KDPM2, FlowMatchHeun: `order = 2`) put two
entries per sampler step in `scheduler.timesteps` (predictor, corrector) and only one for the last
step, so a pass of N steps has 2N - 1 calls. What is exact at call time:

- `scheduler.step_index`: the entry of `scheduler.timesteps` the scheduler is at (None before the
  first `step()` of the pass); `scheduler.begin_index`: where the pass starts (img2img sets it);
- `pipe._num_timesteps`: how many entries this pass iterates (set before the loop).

Schedulers without `step_index` (DDIM, DDPM) are first order: the loop entry is the number of
denoiser calls made so far in this pipeline call. PNDM keeps a `counter` of its `step()` calls: in
PLMS mode (`skip_prk_steps`, Stable Diffusion's usual setting) it evaluates its first step twice;
otherwise its first `len(prk_timesteps)` calls are Runge-Kutta steps of 4 calls each, then one call
per step.
"""
from __future__ import annotations

import math


def _length(timesteps) -> int:
    return 0 if timesteps is None else len(timesteps)


def _is_pndm(scheduler) -> bool:
    return all(hasattr(scheduler, a) for a in ("counter", "ets", "prk_timesteps", "plms_timesteps"))


def _pndm_step(scheduler, entries: int) -> tuple[int, int]:
    calls = int(scheduler.counter)  # step() calls so far in this pass
    prk = _length(scheduler.prk_timesteps)
    if prk == 0:  # PLMS: calls 0 and 1 are step 0, call k >= 1 is step k - 1
        total = max(entries - 1, 1)
        return min(max(calls - 1, 0), total - 1), total
    total = max(math.ceil(min(entries, prk) / 4) + max(entries - prk, 0), 1)
    step = calls // 4 if calls < prk else prk // 4 + (calls - prk)
    return min(step, total - 1), total


def pass_entries(pipe) -> int:
    """Number of timestep entries the running pass iterates (`pipe._num_timesteps`, else the schedule)."""
    entries = getattr(pipe, "_num_timesteps", None)
    if isinstance(entries, int) and entries > 0:
        return entries
    return max(_length(getattr(pipe.scheduler, "timesteps", None)), 1)


def entry_index(scheduler, entries: int, calls_so_far: int) -> int:
    """0-based position, inside this pass's timesteps, of the denoiser call about to run."""
    if not hasattr(type(scheduler), "step_index"):
        return calls_so_far
    index = scheduler.step_index
    begin = getattr(scheduler, "begin_index", None)
    if begin is None:  # pass = the last `entries` of the schedule (txt2img: all of it)
        begin = max(_length(scheduler.timesteps) - entries, 0)
    if index is None:  # no step() yet in this pass
        return 0
    return int(index) - int(begin)


def sampler_step(pipe, calls_so_far: int) -> tuple[int, int]:
    """`(step, total)` of the denoiser call about to run in `pipe`'s current pass.

    `calls_so_far`: denoiser calls already made in this pipeline call (used only by schedulers that
    keep no step index)."""
    scheduler = pipe.scheduler
    entries = pass_entries(pipe)
    if _is_pndm(scheduler):
        return _pndm_step(scheduler, entries)
    order = max(int(getattr(scheduler, "order", 1) or 1), 1)
    total = max(math.ceil(entries / order), 1)
    step = entry_index(scheduler, entries, calls_so_far) // order
    return min(max(step, 0), total - 1), total
