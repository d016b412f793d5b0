"""The step window through AUTOMATIC1111's real sampling path: which model calls are guided.

Skips unless `VSF_A1111_DIR` points at an A1111 checkout and `VSF_A1111_REPOS_DIR` at its `repositories/`
(k-diffusion). It also needs `lark` (A1111's prompt parser; `pip install lark`).

Everything on the path from the sampler to the extension is A1111's own code: `KDiffusionSampler.sample` /
`CompVisSampler.sample` (`get_sigmas`, `initialize`, `launch_sampling`), the pinned k-diffusion's
`sample_euler`, `sample_heun`, `sample_dpm_2`, A1111's `restart_sampler`, `ddim` and `plms`, the real
`CFGDenoiser.forward`, `script_callbacks.cfg_denoiser_callback` (which calls the extension's
`runner.on_cfg_denoiser`, registered with the real `script_callbacks.on_cfg_denoiser`) and the real
`callback_state`, which sets `state.sampling_step` after the model call. Stand-ins, none of them on that
path's logic:

- `modules.shared`: `opts` (the option values a default install has, for the options the path reads),
  `state`, `total_tqdm`, and `sd_model`: a model object with SD1.5's `alphas_cumprod` whose `apply_model`
  records the guidance state the extension set for that model call (this is where a host adapter's
  attention patch would read it) and returns zeros;
- `p`: the processing object's attributes that path reads, `p.rng` a seeded generator;
- `modules.devices`, `images`, `sd_vae_approx`, `sd_vae_taesd`, `sd_models`, `sd_samplers`, `errors`,
  `timer`, `util`, `extensions`: empty modules or one-line functions — imported by the modules above,
  used only for previews, model loading and callback bookkeeping (`errors.report` re-raises, so a
  failing callback fails the test);
- third-party modules imported at module level but not used by the samplers driven here: `scipy`
  (LMS coefficients, Beta schedule), `torchdiffeq` (DPM adaptive), `torchsde` (Brownian noise for SDE
  samplers), `torchvision` (k-diffusion's image utilities), `fastapi` / `gradio` (type annotations in
  `script_callbacks`). Each raises if called.

The expected guided calls are written out from the spec ("Per-step scheduling") and each sampler's call
sequence: k-diffusion's Heun and DPM2 call the model twice per step (the Heun corrector at exactly the
next step's sigma, checked below) except the last step to sigma 0; the restart sampler likewise per
step; A1111's DDIM/PLMS run `len(timesteps) - 1` = steps - 1 steps, PLMS with two calls in its first.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch

from lib_vsf.settings import VSFSettings
from lib_vsf.state import NegativeText
from lib_vsf.webui import runner
from lib_vsf.webui.args import ScriptArgs
from vsf_host_setup import git_commit

THIRD_PARTY_STAND_INS = {
    "scipy": (), "scipy.integrate": ("quad",), "scipy.stats": ("beta",),
    "torchdiffeq": ("odeint",),
    "torchsde": ("BrownianTree",), "torchsde._brownian": (), "torchsde._brownian.brownian_interval": ("_randn",),
    "torchvision": (), "torchvision.transforms": (), "torchvision.transforms.functional": (),
    "fastapi": ("FastAPI",), "gradio": ("Blocks",),
}
EMPTY_WEBUI_MODULES = ("images", "sd_vae_approx", "sd_vae_taesd", "sd_models", "sd_samplers", "timer", "util")


def _not_used(name):
    def fail(*_args, **_kwargs):
        raise AssertionError(f"{name} is a test stand-in and was not expected to be used")
    return fail


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _report(*_args, **_kwargs):
    raise  # noqa: PLE0704 - `errors.report` is called from an `except` block: re-raise what it reports


def _options():
    """The options A1111's sampling path reads, at their default values."""
    return types.SimpleNamespace(
        data={}, always_discard_next_to_last_sigma=False, use_old_karras_scheduler_sigmas=False, sigma_min=0.0,
        sigma_max=0.0, rho=0.0, sgm_noise_multiplier=False, enable_quantization=False, eta_ancestral=1.0, eta_ddim=0.0,
        s_churn=0.0, s_tmin=0.0, s_tmax=0.0, s_noise=1.0, skip_early_cond=0.0, s_min_uncond_all=False,
        pad_cond_uncond=False, pad_cond_uncond_v0=False, batch_cond_uncond=True, live_preview_content="Prompt",
        live_previews_enable=False, show_progress_every_n_steps=-1, refiner_switch_by_sample_steps=False,
        img2img_extra_noise=0.0, no_dpmpp_sde_batch_determinism=False)


class Processing(types.SimpleNamespace):
    """`StableDiffusionProcessingTxt2Img`: the attributes the sampling path reads (the runner keeps a weak
    reference to it, as to the host's object)."""


class ImageRNG:
    """`p.rng` (`modules.rng.ImageRNG`): the noise A1111 hands to k-diffusion's `torch.randn_like`."""

    def __init__(self, shape):
        self.shape, self.generator = shape, torch.Generator().manual_seed(1)

    def next(self):
        return torch.randn(self.shape, generator=self.generator)


class RecordingModel:
    """`shared.sd_model` for an SD1.5-like eps model: what CompVisDenoiser / CompVisTimestepsDenoiser read.
    `apply_model` records, for each model call, the step, total, whether guidance is on and its alpha."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.model = types.SimpleNamespace(conditioning_key="crossattn")
        self.cond_stage_key = "txt"
        self.parameterization = "eps"
        self.generation = None
        self.calls = []

    def apply_model(self, x, t, cond):
        run = self.generation.run
        self.calls.append({"step": run.step, "total": run.total_steps, "guided": run.active,
                           "alpha": run.guidance().alpha if run.active else None})
        return torch.zeros_like(x)


@contextlib.contextmanager
def a1111_sampling():
    """A1111's `modules.*` sampling modules and the pinned k-diffusion, importable for the duration."""
    root, repos = os.environ.get("VSF_A1111_DIR"), os.environ.get("VSF_A1111_REPOS_DIR")
    if not root or not os.path.isfile(os.path.join(root, "modules", "sd_samplers_cfg_denoiser.py")):
        pytest.skip("VSF_A1111_DIR does not point at an AUTOMATIC1111 checkout")
    kdiff = os.path.join(repos or "", "k-diffusion", "k_diffusion")
    if not repos or not os.path.isfile(os.path.join(kdiff, "sampling.py")):
        pytest.skip("VSF_A1111_REPOS_DIR does not point at A1111's repositories (k-diffusion)")
    if importlib.util.find_spec("lark") is None:
        pytest.skip("A1111's prompt parser needs lark (pip install lark)")
    names = set(THIRD_PARTY_STAND_INS) | {"modules", "k_diffusion"}
    owned = lambda n: n in names or n.split(".", 1)[0] in ("modules", "k_diffusion")  # noqa: E731
    saved = {n: m for n, m in sys.modules.items() if owned(n)}
    for name in saved:
        del sys.modules[name]
    try:
        for name, attrs in THIRD_PARTY_STAND_INS.items():
            module = _module(name, **{a: _not_used(f"{name}.{a}") for a in attrs})
            module.__path__ = []
            sys.modules[name] = module
            if "." in name:
                parent, _, child = name.rpartition(".")
                setattr(sys.modules[parent], child, module)
        # k-diffusion's __init__ imports its training code too; register the package without running it
        # and import the submodules A1111 uses, as that __init__ would
        sys.modules["k_diffusion"] = _module("k_diffusion", __path__=[kdiff])
        for name in ("utils", "sampling", "external"):
            importlib.import_module(f"k_diffusion.{name}")
        package = _module("modules", __path__=[os.path.join(root, "modules")])
        sys.modules["modules"] = package
        sd_model = RecordingModel()
        webui = {
            "shared": _module("modules.shared", opts=_options(), sd_model=sd_model, parallel_processing_allowed=True,
                              total_tqdm=types.SimpleNamespace(update=lambda: None),
                              state=types.SimpleNamespace(interrupted=False, skipped=False, sampling_step=0,
                                                          sampling_steps=0, current_latent=None)),
            "devices": _module("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"),
                               dtype=torch.float32, torch_gc=lambda: None),
            "errors": _module("modules.errors", report=_report),
            "extensions": _module("modules.extensions", extensions=[], find_extension=lambda filename: None),
            **{n: _module(f"modules.{n}") for n in EMPTY_WEBUI_MODULES},
        }
        for name, module in webui.items():
            sys.modules[f"modules.{name}"] = module
            setattr(package, name, module)
        yield types.SimpleNamespace(
            root=root, sd_model=sd_model, shared=webui["shared"],
            script_callbacks=importlib.import_module("modules.script_callbacks"),
            prompt_parser=importlib.import_module("modules.prompt_parser"),
            kdiffusion=importlib.import_module("modules.sd_samplers_kdiffusion"),
            timesteps=importlib.import_module("modules.sd_samplers_timesteps"))
    finally:
        for name in [n for n in sys.modules if owned(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def a1111():
    with a1111_sampling() as host:
        host.script_callbacks.on_cfg_denoiser(runner.on_cfg_denoiser)
        host.host_steps = []  # the host's `sampling_step` and sigma at each model call, as extensions see them
        host.script_callbacks.on_cfg_denoiser(
            lambda params: host.host_steps.append((params.sampling_step, float(params.sigma[0]))))
        print(f"A1111 {git_commit(host.root)}")
        yield host


def run_sampler(host, sampler_name, steps, settings):
    """One txt2img sampling pass of `steps` with A1111's sampler `sampler_name`, VSF on with `settings`.
    Returns (the recorded model calls, the host's sampling_step/sigma per call, the sampler)."""
    data = next(d for d in host.kdiffusion.samplers_data_k_diffusion + host.timesteps.samplers_data_timesteps
                if d.name == sampler_name)
    sampler = data.constructor(host.sd_model)
    sampler.config = data  # as `sd_samplers.create_sampler` does
    p = Processing(steps=steps, cfg_scale=1.0, is_hr_pass=False, enable_hr=False, scheduler="Automatic",
                              hr_scheduler=None, sampler_noise_scheduler_override=None, extra_generation_params={},
                              eta=None, rng=ImageRNG((1, 4, 2, 2)), refiner_checkpoint_info=None, refiner_switch_at=None, scripts=None,
                              s_churn=0.0, s_tmin=0.0, s_tmax=0.0, s_noise=1.0)
    generation = runner.Generation(p, ScriptArgs(True, settings))
    generation.run.set_text(1, NegativeText.from_sequences([torch.ones(3, 8)]))  # a negative of 3 tokens
    setattr(p, runner.GENERATION_ATTR, generation)
    host.sd_model.generation, host.sd_model.calls = generation, []
    host.host_steps.clear()
    parser = host.prompt_parser
    cond = parser.MulticondLearnedConditioning(shape=(1,), batch=[[parser.ComposableScheduledPromptConditioning(
        [parser.ScheduledPromptConditioning(steps, torch.zeros(77, 8))])]])
    uncond = [[parser.ScheduledPromptConditioning(steps, torch.zeros(77, 8))]]
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampler.sample(p, x, cond, uncond, image_conditioning=torch.zeros(1, 5, 1, 1))
    return host.sd_model.calls, list(host.host_steps), sampler, p


# Per sampler, for 4 requested steps: the pass's number of steps, and the step of each model call.
CALLS = {
    "Euler": (4, [0, 1, 2, 3]),
    "Heun": (4, [0, 0, 1, 1, 2, 2, 3]),
    "DPM2": (4, [0, 0, 1, 1, 2, 2, 3]),
    "Restart": (4, [0, 0, 1, 1, 2, 2, 3]),
    "DDIM": (3, [0, 1, 2]),
    "PLMS": (3, [0, 0, 1, 2]),
}


def expected_guided(steps_of_calls, total, start, end):
    """Spec: a call is guided when its step's fraction `step / total` lies in [start, end)."""
    return [start <= step / total < end for step in steps_of_calls]


@pytest.mark.parametrize("sampler_name", list(CALLS))
def test_window_over_the_last_step_guides_only_its_calls(a1111, sampler_name):
    total, truth = CALLS[sampler_name]
    start = (total - 1) / total  # 0.75 for 4 steps: only the last step
    calls, host_steps, _, _ = run_sampler(a1111, sampler_name, 4, VSFSettings(start=start, end=1.0))
    assert len(calls) == len(truth)
    assert [c["guided"] for c in calls] == expected_guided(truth, total, start, 1.0)
    assert [c["guided"] for c in calls][-1] is True and sum(c["guided"] for c in calls) == 1
    assert {c["total"] for c in calls} == {total}


@pytest.mark.parametrize("sampler_name", list(CALLS))
def test_window_over_the_first_step_guides_only_its_calls(a1111, sampler_name):
    total, truth = CALLS[sampler_name]
    end = 1 / total
    calls, _, _, _ = run_sampler(a1111, sampler_name, 4, VSFSettings(start=0.0, end=end))
    assert [c["guided"] for c in calls] == expected_guided(truth, total, 0.0, end)
    assert [c["step"] for c in calls if c["guided"]] == [0] * truth.count(0)


@pytest.mark.parametrize("sampler_name", ["Euler", "Heun", "DPM2", "Restart"])
def test_alpha_schedule_value_per_step(a1111, sampler_name):
    _, truth = CALLS[sampler_name]
    schedule = (1.0, 2.0, 4.0, 8.0)  # one value per step of 4: step i uses schedule[i]
    calls, _, _, _ = run_sampler(a1111, sampler_name, 4, VSFSettings(alpha_schedule=schedule))
    assert [c["alpha"] for c in calls] == [schedule[step] for step in truth]


def test_the_host_sampling_step_lags_and_heun_corrector_shares_the_next_steps_sigma(a1111):
    """What made the window late: A1111 hands `sampling_step` 0, 0, 1, 2 to the four Euler calls; and
    Heun's corrector runs at exactly the sigma of the next step's first call, so the sigma alone cannot
    place it. Both checked on the real path, next to the steps the extension derives."""
    calls, host_steps, _, _ = run_sampler(a1111, "Euler", 4, VSFSettings())
    assert [s for s, _ in host_steps] == [0, 0, 1, 2]
    assert [c["step"] for c in calls] == [0, 1, 2, 3]
    calls, host_steps, sampler, p = run_sampler(a1111, "Heun", 4, VSFSettings())
    sigmas = sampler.get_sigmas(p, 4)
    expected_sigmas = [sigmas[0], sigmas[1], sigmas[1], sigmas[2], sigmas[2], sigmas[3], sigmas[3]]
    assert [s for _, s in host_steps] == pytest.approx([float(s) for s in expected_sigmas], rel=1e-6)
    assert [s for s, _ in host_steps] == [0, 0, 0, 1, 1, 2, 2]
    assert [c["step"] for c in calls] == [0, 0, 1, 1, 2, 2, 3]


def test_restart_sampler_with_restarts_counts_its_own_steps(a1111):
    """At 20 steps A1111's restart sampler inserts restart segments: 20 Heun steps (its progress counts
    these), each calling the model twice except the last; a window from 0.75 guides steps 15-19."""
    calls, _, _, _ = run_sampler(a1111, "Restart", 20, VSFSettings(start=0.75, end=1.0))
    truth = [call // 2 for call in range(39)]
    assert len(calls) == 39
    assert [c["guided"] for c in calls] == expected_guided(truth, 20, 0.75, 1.0)
