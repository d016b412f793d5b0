"""The step window and the alpha schedule on the host double, whose samplers replay the hosts' order
(tests/webui_host_double.py, "the sampler"): a model call sees the host's `sampling_step` one step late.

Spec, "Per-step scheduling": guidance is on for the model calls of the sampler steps with
`step / total` in `[start, end)`; every call inside step i (a second-order corrector) counts as step i;
`total` is the number of steps of the pass (hires passes count their own). Each expected list below is
written out from that rule for the sampler's real call sequence.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from lib_vsf.webui import runner, steps
from webui_host_double import Processing, host_double


def window(start, end):
    """UI arguments: VSF on, VSF Quality, the given start/end."""
    return [True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, start, end, True, False]


@pytest.fixture
def host():
    with host_double() as h:
        yield h


# Calls of a 4-step pass, one entry per model call: the step it belongs to.
CALLS_4_STEPS = {
    "Euler": [0, 1, 2, 3],
    "Heun": [0, 0, 1, 1, 2, 2, 3],  # corrector after each step but the last (to sigma 0)
    "Restart": [0, 0, 1, 1, 2, 2, 3],  # model called from a nested step function: the call-counter path
    "Stale index": [0, 0, 1, 1, 2, 2, 3],  # its frame's `i` is left over from building the step list
    "DDIM": [0, 1, 2],  # the hosts' timestep samplers run len(timesteps) - 1 = 3 steps for "4 steps"
    "PLMS": [0, 0, 1, 2],  # two calls in its first step
}


@pytest.mark.parametrize("sampler", sorted(CALLS_4_STEPS))
def test_the_double_replays_the_hosts_call_order(host, sampler):
    p = host.process_images(Processing(host, steps=4, sampler_name=sampler), window(0.0, 1.0))
    assert [s["step"] for s in p.trace] == CALLS_4_STEPS[sampler]
    # the host's sampling_step at each call, as the hosts set it (callback after the step's first call for
    # k-diffusion samplers, after the whole step for DDIM/PLMS): never ahead, and behind on later steps
    lagged = {"Euler": [0, 0, 1, 2], "Heun": [0, 0, 0, 1, 1, 2, 2], "Restart": [0, 0, 0, 1, 1, 2, 2],
              "Stale index": [0, 0, 0, 1, 1, 2, 2], "DDIM": [0, 0, 1], "PLMS": [0, 0, 0, 1]}
    assert [s["host_step"] for s in p.trace] == lagged[sampler]


# Windows over a 4-step pass (DDIM: 3 steps): which steps' calls are guided, from step / total in [start, end).
@pytest.mark.parametrize("sampler, start, end, guided_steps", [
    ("Euler", 0.75, 1.0, [3]),            # 3/4 = 0.75: only the last step
    ("Euler", 0.0, 0.25, [0]),            # 0/4 only; 1/4 = 0.25 is outside [0, 0.25)
    ("Euler", 0.25, 0.75, [1, 2]),
    ("Heun", 0.75, 1.0, [3]),             # the last step has one call (Euler to sigma 0)
    ("Heun", 0.0, 0.25, [0, 0]),          # step 0 and its corrector, not step 1's first call
    ("Heun", 0.5, 0.75, [2, 2]),
    ("Restart", 0.75, 1.0, [3]),
    ("Restart", 0.0, 0.25, [0, 0]),
    ("Stale index", 0.0, 0.25, [0, 0]),   # i = 3 in its frame throughout: rejected by the host-step check
    ("Stale index", 0.75, 1.0, [3]),
    ("DDIM", 0.6, 1.0, [2]),              # steps 0, 1, 2 of 3: 2/3 >= 0.6, 1/3 < 0.6
    ("DDIM", 0.0, 0.3, [0]),
    ("PLMS", 0.6, 1.0, [2]),              # 3 steps as DDIM
    ("PLMS", 0.0, 0.3, [0, 0]),           # both calls of its first step
    ("PLMS", 0.25, 0.5, [1]),             # 1/3 only: the call counter (call 1 of 4 = 0.25) would take step 0's
])
def test_step_window_guides_exactly_the_calls_of_the_steps_inside_it(host, sampler, start, end, guided_steps):
    p = host.process_images(Processing(host, steps=4, sampler_name=sampler), window(start, end))
    assert [s["step"] for s in p.trace if s["guided"]] == guided_steps
    assert all(s["patched"] for s in p.trace)  # patched for the pass; calls outside run the host's math


def test_hires_pass_counts_its_own_steps(host):
    p = host.process_images(Processing(host, steps=4, enable_hr=True, sampler_name="Heun"), window(0.75, 1.0))
    guided = [(s["hires"], s["step"]) for s in p.trace if s["guided"]]
    assert guided == [(False, 3), (True, 3)]


def test_alpha_schedule_follows_the_sampler_step(host, monkeypatch):
    # The WebUI has no alpha-schedule argument; the schedule is set on the parsed settings so that the
    # per-step alpha the attention receives (GuidanceRun.guidance) shows which step each call belongs to.
    # Schedule of 4 values over 4 steps: step i gets the i-th value (settings.alpha_at).
    parse = runner.parse_script_args

    def with_schedule(script_args):
        args = parse(script_args)
        return dataclasses.replace(args, settings=args.settings.replace(alpha_schedule=(1.0, 2.0, 4.0, 8.0)))

    monkeypatch.setattr(runner, "parse_script_args", with_schedule)
    p = host.process_images(Processing(host, steps=4, sampler_name="Heun"), window(0.0, 1.0))
    assert [s["alpha"] for s in p.trace] == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0]
    p = host.process_images(Processing(host, steps=4, sampler_name="Euler"), window(0.0, 1.0))
    assert [s["alpha"] for s in p.trace] == [1.0, 2.0, 4.0, 8.0]


def test_each_sampler_step_source_is_the_one_documented(host, monkeypatch):
    """The sampler loop is read where the sampler calls the model itself; the call counter where it
    does not (restart's nested step function); the host's value only without a CFG denoiser."""
    original, sources = steps.step_of_call, []

    def recording(params):
        position = original(params)
        sources.append(position.source)
        return position

    monkeypatch.setattr(steps, "step_of_call", recording)
    seen = {}
    for name in ("Euler", "Heun", "DDIM", "PLMS", "Restart", "Stale index"):
        sources.clear()
        host.process_images(Processing(host, steps=3, sampler_name=name), window(0.0, 1.0))
        seen[name] = set(sources)
    assert seen == {"Euler": {steps.SAMPLER_LOOP}, "Heun": {steps.SAMPLER_LOOP}, "DDIM": {steps.SAMPLER_LOOP},
                    "PLMS": {steps.SAMPLER_LOOP}, "Restart": {steps.CALL_COUNTER},
                    "Stale index": {steps.CALL_COUNTER}}
    bare = SimpleNamespace(sampling_step=2, total_sampling_steps=5, denoiser=None)
    assert original(bare) == steps.StepPosition(2, 5, steps.HOST_STEP)


def test_call_counter_maps_second_order_calls_to_their_step():
    # A second-order pass of 4 steps: the host expects 8 calls (steps x 2) and makes 7.
    denoiser = SimpleNamespace(step=0, steps=4, total_steps=8)
    params = SimpleNamespace(sampling_step=0, total_sampling_steps=4, denoiser=denoiser)
    found = []
    for call in range(7):
        denoiser.step = call
        found.append(steps.step_of_call(params).step)
    assert found == [0, 0, 1, 1, 2, 2, 3]


def test_a_loop_index_the_host_step_contradicts_is_not_used():
    # Inside step i the host's lagged sampling_step is i - 1 or i; i = 3 with the host at step 1 is an
    # index left over from something else, and the denoiser's call counter decides instead.
    denoiser = SimpleNamespace(step=2, steps=4, total_steps=4)
    frame_locals = {"model": denoiser, "i": 3, "sigmas": [4.0, 3.0, 2.0, 1.0, 0.0]}
    assert steps._loop_position(frame_locals, denoiser, host_step=1) is None
    assert steps._loop_position(frame_locals, denoiser, host_step=2) == steps.StepPosition(3, 4, steps.SAMPLER_LOOP)
    assert steps._loop_position(frame_locals, denoiser, host_step=3) == steps.StepPosition(3, 4, steps.SAMPLER_LOOP)
    assert steps._loop_position({**frame_locals, "model": object()}, denoiser, host_step=2) is None  # not its caller
    # the schedule is the function's argument: DDIM's own local `sigmas` (eta noise levels) is not it
    assert steps._loop_position(frame_locals, denoiser, 2, parameters=("model", "x", "timesteps")) is None
    # a sigma schedule shorter than the host's steps: the sampler cut it (did a step before its loop)
    cut = {**frame_locals, "sigmas": [3.0, 2.0, 1.0, 0.5, 0.0]}
    assert steps._loop_position(cut, SimpleNamespace(steps=5), host_step=2) is None
