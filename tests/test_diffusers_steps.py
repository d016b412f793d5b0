"""Per-step scheduling on real diffusers schedulers (VSF-SPEC "Per-step scheduling").

`step` is the sampler step a denoiser call belongs to: a second-order scheduler's corrector call
counts as the step it corrects, and `total` is the number of steps of the pass (an img2img pass with
`strength` counts its own steps). Which sampler step each call belongs to is read here from the
scheduler itself (`state_in_first_order`: a predictor call starts a new step), independently of
lib_vsf; which calls were guided is read from what the denoiser receives (the text stream grows by
the negative tokens only on guided calls).
"""
import pytest
import torch

from lib_vsf import VSFSettings, from_preset
from lib_vsf.diffusers import VSFGuidance
from tiny_pipelines import sd3_pipeline, sd15_pipeline

PROMPT = "a photo of cat"
NEGATIVE = "blurry text watermark"
STEPS = 4


def _with_scheduler(pipe, name):
    import diffusers

    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def sd15():
    return sd15_pipeline()


@pytest.fixture(scope="module")
def sd3():
    return sd3_pipeline()


class CallLog:
    """Forward pre-hook registered after VSFGuidance's own: sees what the denoiser is really given."""

    def __init__(self, pipe, denoiser):
        self.pipe, self.calls, self.alphas = pipe, [], []
        self.handle = denoiser.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        scheduler = self.pipe.scheduler
        first_order = getattr(scheduler, "state_in_first_order", True)
        self.calls.append({"text_len": kwargs["encoder_hidden_states"].shape[1], "first_order": bool(first_order)})
        self.alphas.append([])

    def scheduler_steps(self):
        """Sampler step of each call, as the scheduler defines it: a first-order call starts a step."""
        steps, step = [], -1
        for call in self.calls:
            step += call["first_order"]
            steps.append(step)
        return steps

    def guided(self, positive_len):
        return [call["text_len"] > positive_len for call in self.calls]


def run_logged(pipe, denoiser_name, settings, positive_len, call_kwargs, spy_module=None, spy_name=None):
    """Run `pipe` under VSFGuidance; return the call log (steps, guided calls, alphas per call)."""
    denoiser = getattr(pipe, denoiser_name)
    with VSFGuidance(pipe, NEGATIVE, settings) as vsf:
        log = CallLog(pipe, denoiser)
        original = getattr(spy_module, spy_name) if spy_module else None
        if spy_module:
            def spy(q, k, v, layout, guidance, *rest):
                log.alphas[-1].append(guidance.alpha)
                return original(q, k, v, layout, guidance, *rest)
            setattr(spy_module, spy_name, spy)
        try:
            vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **call_kwargs)
        finally:
            log.handle.remove()
            if spy_module:
                setattr(spy_module, spy_name, original)
    return log


def expected_guided(steps, total, start, end):
    """VSF-SPEC: guided iff step / total lies in [start, end)."""
    return [start <= s / total < end for s in steps]


SD15_ARGS = dict(height=16, width=16, num_inference_steps=STEPS)
SD3_ARGS = dict(height=16, width=16, num_inference_steps=STEPS, max_sequence_length=16)


# windows whose edge falls inside a step: counting calls as steps half-guides that step
@pytest.mark.parametrize("scheduler, window", [
    ("HeunDiscreteScheduler", (0.3, 1.0)), ("HeunDiscreteScheduler", (0.0, 0.6)),
    ("KDPM2DiscreteScheduler", (0.3, 1.0)), ("KDPM2DiscreteScheduler", (0.0, 0.6)),
])
def test_second_order_unet_schedulers_guide_whole_steps(sd15, scheduler, window):
    pipe = _with_scheduler(sd15, scheduler)
    try:
        log = run_logged(pipe, "unet", from_preset("VSF Strong", start=window[0], end=window[1]), 77, SD15_ARGS)
    finally:
        _with_scheduler(sd15, "EulerDiscreteScheduler")
    steps = log.scheduler_steps()
    assert len(log.calls) == 2 * STEPS - 1 and steps[-1] == STEPS - 1  # predictor + corrector, last step Euler
    assert log.guided(77) == expected_guided(steps, STEPS, *window)


@pytest.mark.parametrize("window", [(0.3, 1.0), (0.0, 0.6)])
def test_flow_match_heun_on_sd3_guides_whole_steps(sd3, window):
    pipe = _with_scheduler(sd3, "FlowMatchHeunDiscreteScheduler")
    try:
        positive_len = 77 + 16  # CLIP 77 + T5 max_sequence_length
        log = run_logged(pipe, "transformer", from_preset("VSF Strong", start=window[0], end=window[1]),
                         positive_len, SD3_ARGS)
    finally:
        _with_scheduler(sd3, "FlowMatchEulerDiscreteScheduler")
    steps = log.scheduler_steps()
    assert len(log.calls) == 2 * STEPS - 1 and steps == [0, 0, 1, 1, 2, 2, 3]
    assert log.guided(positive_len) == expected_guided(steps, STEPS, *window)


def test_alpha_schedule_follows_scheduler_steps_on_heun(sd15):
    import lib_vsf.diffusers.unet as unet_module

    pipe = _with_scheduler(sd15, "HeunDiscreteScheduler")
    schedule = (1.0, 2.0, 3.0)  # stretched over 4 steps: steps 0, 1 -> 1.0; 2 -> 2.0; 3 -> 3.0
    try:
        log = run_logged(pipe, "unet", VSFSettings(alpha_schedule=schedule), 77, SD15_ARGS,
                         spy_module=unet_module, spy_name="cross_attention")
    finally:
        _with_scheduler(sd15, "EulerDiscreteScheduler")
    steps = log.scheduler_steps()
    # settings: index = int(step * len(schedule) / total)
    assert all(log.alphas) and [set(a) for a in log.alphas] == [{schedule[s * 3 // STEPS]} for s in steps]


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_img2img_strength_pass_counts_its_own_steps(sd15, scheduler):
    """strength 0.5 of 6 steps: the pass runs 3 steps; [0.5, 1) guides only its last step."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = _with_scheduler(StableDiffusionImg2ImgPipeline(**sd15.components), scheduler)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    log = run_logged(pipe, "unet", from_preset("VSF Strong", start=0.5, end=1.0), 77,
                     dict(image=image, strength=0.5, num_inference_steps=6))
    steps = log.scheduler_steps()
    pass_steps = 3
    assert steps[-1] == pass_steps - 1
    assert len(log.calls) == (2 * pass_steps - 1 if scheduler.startswith("Heun") else pass_steps)
    assert log.guided(77) == expected_guided(steps, pass_steps, 0.5, 1.0)
    assert any(log.guided(77)) and not all(log.guided(77))


def test_pndm_plms_first_step_has_two_calls(sd15):
    """PNDM with skip_prk_steps (Stable Diffusion's usual scheduler) evaluates its first step twice."""
    from diffusers import PNDMScheduler

    original = sd15.scheduler
    sd15.scheduler = PNDMScheduler(skip_prk_steps=True)
    try:
        log = run_logged(sd15, "unet", from_preset("VSF Strong", start=0.4, end=1.0), 77, SD15_ARGS)
    finally:
        sd15.scheduler = original
    steps = [0, 0, 1, 2, 3]  # PLMS: the first step's second evaluation, then one call per step
    assert len(log.calls) == STEPS + 1
    assert log.guided(77) == expected_guided(steps, STEPS, 0.4, 1.0)


def test_pndm_runge_kutta_steps_have_four_calls(sd15):
    """PNDM without skip_prk_steps: 3 Runge-Kutta steps of 4 calls each, then one call per step."""
    from diffusers import PNDMScheduler

    original = sd15.scheduler
    sd15.scheduler = PNDMScheduler(skip_prk_steps=False)
    try:
        log = run_logged(sd15, "unet", from_preset("VSF Strong", start=0.3, end=0.6), 77, SD15_ARGS)
    finally:
        sd15.scheduler = original
    steps = [0] * 4 + [1] * 4 + [2] * 4 + [3]
    assert len(log.calls) == len(steps)
    assert log.guided(77) == expected_guided(steps, STEPS, 0.3, 0.6)


def test_scheduler_without_step_index_counts_calls_of_this_pipeline_call(sd15):
    """DDIM keeps no step index: one call per step, counted from 0 again in every pipeline call."""
    original = sd15.scheduler
    sd15.scheduler = _with_scheduler(sd15, "DDIMScheduler").scheduler
    try:
        assert not hasattr(type(sd15.scheduler), "step_index")
        with VSFGuidance(sd15, NEGATIVE, from_preset("VSF Strong", start=0.5, end=1.0)) as vsf:
            log = CallLog(sd15, sd15.unet)
            for _ in range(2):  # the second call must not continue the first one's count
                vsf(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **SD15_ARGS)
            log.handle.remove()
        assert log.guided(77) == 2 * expected_guided(range(STEPS), STEPS, 0.5, 1.0)
    finally:
        sd15.scheduler = original
