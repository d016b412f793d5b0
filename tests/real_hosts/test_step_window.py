"""The step window through the hosts' real sampling paths (A1111, Forge, Forge Neo): which model calls are guided.

Skips per host unless `VSF_A1111_DIR` + `VSF_A1111_REPOS_DIR` (its `repositories/`, for k-diffusion),
`VSF_FORGE_DIR` or `VSF_NEO_DIR` point at checkouts. Needs `lark` (the hosts' prompt parser; `pip install lark`).

Everything from the sampler to the extension is the host's own code: `KDiffusionSampler.sample` /
`CompVisSampler.sample` (`get_sigmas`, `initialize`, `launch_sampling`), the host's k-diffusion (A1111's
pinned repository, Forge's `k_diffusion/`, Neo's `modules_forge/packages/k_diffusion/`) with
`sample_euler`, `sample_euler_ancestral`, `sample_heun`, `sample_dpm_2`, `sample_dpmpp_2m`,
`sample_dpmpp_2s_ancestral`, the hosts' `restart_sampler`, `ddim` and `plms`, the real
`CFGDenoiser.forward`, `script_callbacks.cfg_denoiser_callback` (which calls the extension's
`runner.on_cfg_denoiser`, registered with the real `script_callbacks.on_cfg_denoiser`) and the real
`callback_state`, which sets `state.sampling_step` after the model call. Stand-ins, none of them on that
path's step bookkeeping:

- `modules.shared`: `opts` (default values of the options the path reads), `state`, `total_tqdm`, and
  `sd_model`. A1111: an object with SD1.5's `alphas_cumprod` whose `apply_model` is the model call.
  Forge/Neo: `forge_objects.unet.model.predictor` is the host's real k-diffusion predictor (SD1.5 eps
  schedule); the model call is the host's `sampling_function`, replaced in `sd_samplers_cfg_denoiser`,
  and `sampling_prepare` / `sampling_cleanup` (loading the UNet into memory) are no-ops. Each model call
  records the guidance state the extension set for it (where a host adapter's attention patch reads it);
- `p`: the processing object's attributes that path reads, `p.rng` a seeded generator;
- `modules.devices`, `images`, `sd_vae_approx`, `sd_vae_taesd`, `sd_models`, `sd_samplers`, `errors`,
  `timer`, `util`, `extensions`, Forge/Neo's `modules_forge.main_entry`: empty modules or one-line
  functions — imported by the modules above, used only for previews, model loading and callback
  bookkeeping (`errors.report` re-raises, so a failing callback fails the test);
- third-party modules imported at module level but not used by the samplers driven here: `scipy`
  (LMS coefficients, Beta schedule), `torchdiffeq` (DPM adaptive), `torchsde` (Brownian noise for SDE
  samplers), `torchvision` (k-diffusion's image utilities), `fastapi` / `gradio` (type annotations in
  `script_callbacks`). Each raises if called.

The expected guided calls are written out from the spec ("Per-step scheduling") and each sampler's call
sequence: k-diffusion's Heun, DPM2 and DPM++ 2S a call the model twice per step (the Heun corrector at exactly the
next step's sigma, checked below) except the last step to sigma 0; the restart sampler likewise per
step; the hosts' DDIM/PLMS run `len(timesteps) - 1` = steps - 1 steps, PLMS with two calls in its first.
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
from lib_vsf.webui import runner, steps
from lib_vsf.webui.args import ScriptArgs
from vsf_host_setup import git_commit, host_modules

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
        img2img_extra_noise=0.0, no_dpmpp_sde_batch_determinism=False, forbidden_knowledge=False)


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


class ForgeModel(RecordingModel):
    """Forge/Neo's `shared.sd_model`: the samplers read the real k-diffusion predictor (SD1.5 eps schedule)
    from `forge_objects.unet.model.predictor`; the model evaluation (`sampling_function`) is recorded."""

    def __init__(self, k_prediction):
        super().__init__()
        predictor = k_prediction.Prediction(prediction_type="epsilon")
        unet = types.SimpleNamespace(model=types.SimpleNamespace(predictor=predictor),
                                     model_options={"transformer_options": {}})  # Neo writes the sigmas there
        self.forge_objects = types.SimpleNamespace(unet=unet)

    def sampling_function(self, denoiser, denoiser_params, cond_scale, cond_composition, **kwargs):
        self.apply_model(denoiser_params.x, None, None)
        zeros = torch.zeros_like(denoiser_params.x)
        return zeros, zeros, zeros


def _install(name, module):
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def webui_sampling(host):
    """`host`'s `modules.*` sampling modules and its k-diffusion, importable for the duration."""
    if importlib.util.find_spec("lark") is None:
        pytest.skip("the hosts' prompt parser needs lark (pip install lark)")
    with contextlib.ExitStack() as stack:
        if host == "a1111":
            root, repos = os.environ.get("VSF_A1111_DIR"), os.environ.get("VSF_A1111_REPOS_DIR")
            if not root or not os.path.isfile(os.path.join(root, "modules", "sd_samplers_cfg_denoiser.py")):
                pytest.skip("VSF_A1111_DIR does not point at an AUTOMATIC1111 checkout")
            kdiff = os.path.join(repos or "", "k-diffusion", "k_diffusion")
            if not repos or not os.path.isfile(os.path.join(kdiff, "sampling.py")):
                pytest.skip("VSF_A1111_REPOS_DIR does not point at A1111's repositories (k-diffusion)")
        else:
            root = stack.enter_context(host_modules(host))  # sys.path, argv, the host's `backend`
            kdiff = next(os.path.join(root, *d.split("/"))  # Forge's, or Neo's bundled copy
                         for d in ("k_diffusion", "modules_forge/packages/k_diffusion")
                         if os.path.isfile(os.path.join(root, *d.split("/"), "sampling.py")))
            # before any stand-in exists: diffusers (imported by it) records which packages are installed
            k_prediction = importlib.import_module("backend.modules.k_prediction")
        names = set(THIRD_PARTY_STAND_INS) | {"modules", "k_diffusion", "modules_forge"}
        owned = lambda n: n in names or n.split(".", 1)[0] in ("modules", "k_diffusion", "modules_forge")  # noqa: E731
        saved = {n: m for n, m in sys.modules.items() if owned(n)}
        for name in saved:
            del sys.modules[name]
        try:
            for name, attrs in THIRD_PARTY_STAND_INS.items():
                module = _module(name, **{a: _not_used(f"{name}.{a}") for a in attrs})
                module.__path__ = []
                _install(name, module)
            package = _module("modules", __path__=[os.path.join(root, "modules")])
            sys.modules["modules"] = package
            shared = _module("modules.shared", opts=_options(), parallel_processing_allowed=True,
                             total_tqdm=types.SimpleNamespace(update=lambda: None),
                             state=types.SimpleNamespace(interrupted=False, skipped=False, sampling_step=0,
                                                         sampling_steps=0, current_latent=None, preview_step=0))
            webui = {
                "shared": shared,
                "devices": _module("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"),
                                   dtype=torch.float32, torch_gc=lambda: None),
                "errors": _module("modules.errors", report=_report),
                "extensions": _module("modules.extensions", extensions=[], find_extension=lambda filename: None),
                **{n: _module(f"modules.{n}") for n in EMPTY_WEBUI_MODULES},
            }
            for name, module in webui.items():
                _install(f"modules.{name}", module)
            if host != "a1111":
                # Forge/Neo: `sd_samplers_common` imports the UI's model loader only for its sampler list
                _install("modules_forge", _module("modules_forge", __path__=[os.path.join(root, "modules_forge")]))
                _install("modules_forge.main_entry", _module("modules_forge.main_entry"))
            # k-diffusion's package init (A1111's copy) imports its training code: register the package
            # without running it and import the submodules the host uses, as that init would
            sys.modules["k_diffusion"] = _module("k_diffusion", __path__=[kdiff])
            for name in ("utils", "sampling", "external"):
                importlib.import_module(f"k_diffusion.{name}")
            if host == "a1111":
                shared.sd_model = RecordingModel()
            else:
                shared.sd_model = ForgeModel(k_prediction)
            loaded = types.SimpleNamespace(
                host=host, root=root, sd_model=shared.sd_model, shared=shared,
                script_callbacks=importlib.import_module("modules.script_callbacks"),
                prompt_parser=importlib.import_module("modules.prompt_parser"),
                kdiffusion=importlib.import_module("modules.sd_samplers_kdiffusion"),
                timesteps=importlib.import_module("modules.sd_samplers_timesteps"))
            if host != "a1111":
                # the model evaluation and Forge's model memory management (load/unload the UNet) are
                # the stand-ins here; the CFG denoiser around them is the host's
                denoiser_module = importlib.import_module("modules.sd_samplers_cfg_denoiser")
                denoiser_module.sampling_function = shared.sd_model.sampling_function
                for module in (loaded.kdiffusion, loaded.timesteps):
                    module.sampling_prepare = lambda *args, **kwargs: None
                    module.sampling_cleanup = lambda *args, **kwargs: None
            yield loaded
        finally:
            for name in [n for n in sys.modules if owned(n)]:
                del sys.modules[name]
            sys.modules.update(saved)


HOSTS = ("a1111", "forge", "neo")


@pytest.fixture(scope="module", params=HOSTS)
def webui(request):
    with webui_sampling(request.param) as host:
        host.script_callbacks.on_cfg_denoiser(runner.on_cfg_denoiser)
        host.host_steps = []  # the host's `sampling_step` and sigma at each model call, as extensions see them
        host.script_callbacks.on_cfg_denoiser(
            lambda params: host.host_steps.append((params.sampling_step, float(params.sigma[0]))))
        print(f"{request.param} {git_commit(host.root)}")
        yield host


def run_sampler(host, sampler_name, steps, settings):
    """One txt2img sampling pass of `steps` with A1111's sampler `sampler_name`, VSF on with `settings`.
    Returns (the recorded model calls, the host's sampling_step/sigma per call, the sampler)."""
    data = next((d for d in host.kdiffusion.samplers_data_k_diffusion + host.timesteps.samplers_data_timesteps
                 if d.name == sampler_name), None)
    if data is None:
        pytest.skip(f"{host.host} has no {sampler_name} sampler")
    sampler = data.constructor(host.sd_model)
    sampler.config = data  # as `sd_samplers.create_sampler` does
    p = Processing(sd_model=host.sd_model, steps=steps, cfg_scale=1.0, is_hr_pass=False, enable_hr=False,
                   scheduler="Automatic", hr_scheduler=None, sampler_noise_scheduler_override=None,
                   extra_generation_params={}, eta=None, rng=ImageRNG((1, 4, 2, 2)), refiner_checkpoint_info=None,
                   refiner_switch_at=None, scripts=None, s_churn=0.0, s_tmin=0.0, s_tmax=0.0, s_noise=1.0)
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
    "Euler a": (4, [0, 1, 2, 3]),
    "DPM++ 2M": (4, [0, 1, 2, 3]),
    "DPM++ 2S a": (4, [0, 0, 1, 1, 2, 2, 3]),  # second call unless sigma_down is 0 (the last step)
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
def test_window_over_the_last_step_guides_only_its_calls(webui, sampler_name):
    total, truth = CALLS[sampler_name]
    start = (total - 1) / total  # 0.75 for 4 steps: only the last step
    calls, host_steps, _, _ = run_sampler(webui, sampler_name, 4, VSFSettings(start=start, end=1.0))
    assert len(calls) == len(truth)
    assert [c["guided"] for c in calls] == expected_guided(truth, total, start, 1.0)
    assert [c["guided"] for c in calls][-1] is True and sum(c["guided"] for c in calls) == 1
    assert {c["total"] for c in calls} == {total}


@pytest.mark.parametrize("sampler_name", list(CALLS))
def test_window_over_the_first_step_guides_only_its_calls(webui, sampler_name):
    total, truth = CALLS[sampler_name]
    end = 1 / total
    calls, _, _, _ = run_sampler(webui, sampler_name, 4, VSFSettings(start=0.0, end=end))
    assert [c["guided"] for c in calls] == expected_guided(truth, total, 0.0, end)
    assert [c["step"] for c in calls if c["guided"]] == [0] * truth.count(0)


@pytest.mark.parametrize("sampler_name", ["Euler", "Heun", "DPM2", "DPM++ 2S a", "Restart"])
def test_alpha_schedule_value_per_step(webui, sampler_name):
    _, truth = CALLS[sampler_name]
    schedule = (1.0, 2.0, 4.0, 8.0)  # one value per step of 4: step i uses schedule[i]
    calls, _, _, _ = run_sampler(webui, sampler_name, 4, VSFSettings(alpha_schedule=schedule))
    assert [c["alpha"] for c in calls] == [schedule[step] for step in truth]


def test_the_host_sampling_step_lags_and_heun_corrector_shares_the_next_steps_sigma(webui):
    """What made the window late: A1111 hands `sampling_step` 0, 0, 1, 2 to the four Euler calls; and
    Heun's corrector runs at exactly the sigma of the next step's first call, so the sigma alone cannot
    place it. Both checked on the real path, next to the steps the extension derives."""
    calls, host_steps, _, _ = run_sampler(webui, "Euler", 4, VSFSettings())
    assert [s for s, _ in host_steps] == [0, 0, 1, 2]
    assert [c["step"] for c in calls] == [0, 1, 2, 3]
    calls, host_steps, sampler, p = run_sampler(webui, "Heun", 4, VSFSettings())
    sigmas = sampler.get_sigmas(p, 4)
    expected_sigmas = [sigmas[0], sigmas[1], sigmas[1], sigmas[2], sigmas[2], sigmas[3], sigmas[3]]
    assert [s for _, s in host_steps] == pytest.approx([float(s) for s in expected_sigmas], rel=1e-6)
    assert [s for s, _ in host_steps] == [0, 0, 0, 1, 1, 2, 2]
    assert [c["step"] for c in calls] == [0, 0, 1, 1, 2, 2, 3]


def test_restart_sampler_with_restarts_counts_its_own_steps(webui):
    """At 20 steps A1111's restart sampler inserts restart segments: 20 Heun steps (its progress counts
    these), each calling the model twice except the last; a window from 0.75 guides steps 15-19."""
    calls, _, _, _ = run_sampler(webui, "Restart", 20, VSFSettings(start=0.75, end=1.0))
    truth = [call // 2 for call in range(39)]
    assert len(calls) == 39
    assert [c["guided"] for c in calls] == expected_guided(truth, 20, 0.75, 1.0)


@pytest.mark.parametrize("sampler_name, source", [
    ("Euler", steps.SAMPLER_LOOP), ("Heun", steps.SAMPLER_LOOP), ("DPM2", steps.SAMPLER_LOOP),
    ("DPM++ 2S a", steps.SAMPLER_LOOP),
    ("DDIM", steps.SAMPLER_LOOP), ("PLMS", steps.SAMPLER_LOOP),
    ("Restart", steps.CALL_COUNTER),  # its model calls come from a nested step function
])
def test_the_step_comes_from_the_documented_source(webui, sampler_name, source, monkeypatch):
    original, sources = steps.step_of_call, []
    def recording(params):
        position = original(params)
        sources.append(position.source)
        return position

    monkeypatch.setattr(steps, "step_of_call", recording)
    run_sampler(webui, sampler_name, 4, VSFSettings())
    assert sources and set(sources) == {source}
