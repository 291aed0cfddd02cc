"""A1111 sampler/schedule names -> diffusers schedulers: tables, name resolution, built configs."""
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import samplers

# SD1.5's scheduler config as shipped (PNDM, leading spacing, steps_offset 1)
SD15_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None,
}
A1111_SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                  "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
                  "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"]
NOT_AVAILABLE = ["DPM fast", "DPM adaptive", "Restart", "DDIM CFG++"]
COMBINATIONS = [(name, schedule) for name in samplers.sampler_names() for schedule in samplers.schedules_for(name)]


def sd15_sigmas() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


# --- every table entry runs ------------------------------------------------------------------

@pytest.mark.parametrize(("sampler", "schedule"), COMBINATIONS)
def test_every_sampler_and_schedule_builds_and_steps(sampler, schedule):
    scheduler = samplers.make_scheduler(sampler, schedule, SD15_CONFIG, seed=1)
    scheduler.set_timesteps(8)
    assert len(scheduler.timesteps) >= 8
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    model_output = torch.randn(1, 4, 8, 8, generator=generator)
    timestep = scheduler.timesteps[0]
    model_input = scheduler.scale_model_input(sample, timestep)
    assert model_input.shape == sample.shape
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    out = scheduler.step(model_output, timestep, sample, **extra).prev_sample
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()
    assert not torch.equal(out, sample)


def test_a1111_sampler_list_is_covered():
    available = set(samplers.sampler_names())
    assert set(A1111_SAMPLERS) - set(NOT_AVAILABLE) <= available
    assert {"DEIS", "DDPM"} <= available
    assert not set(NOT_AVAILABLE) & available
    assert samplers.sampler_names()[0] == "DPM++ 2M"  # A1111's order and default


def test_schedule_labels_are_the_runnable_ones():
    assert samplers.schedule_labels() == ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform",
                                          "Simple", "Normal", "DDIM", "Beta"]


def test_aliases_are_unique_across_samplers():
    seen = {}
    for spec in samplers._SAMPLERS:
        for key in {k.casefold() for k in (spec.name, *spec.aliases)}:
            assert key not in seen, (key, spec.name, seen.get(key))
            seen[key] = spec.name


def test_only_the_labelled_approximations_are_flagged():
    flagged = {s.name for s in samplers.samplers() if s.approximate}
    assert flagged == {"DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE"}


# --- built configs ---------------------------------------------------------------------------

def config_of(sampler, schedule=None, base=SD15_CONFIG):
    scheduler = samplers.make_scheduler(sampler, schedule, base)
    return type(scheduler).__name__, scheduler.config


def test_dpmpp_2m_automatic_is_karras_dpmsolver_plus_plus():
    cls, config = config_of("DPM++ 2M", "Automatic")
    assert cls == "DPMSolverMultistepScheduler"
    assert config.algorithm_type == "dpmsolver++" and config.solver_order == 2
    assert config.use_karras_sigmas is True and config.use_exponential_sigmas is False
    assert config.timestep_spacing == "linspace"


def test_dpmpp_2m_sde_automatic_is_exponential():
    cls, config = config_of("DPM++ 2M SDE")
    assert (cls, config.algorithm_type, config.solver_type) == ("DPMSolverMultistepScheduler", "sde-dpmsolver++",
                                                                "midpoint")
    assert config.use_exponential_sigmas is True and config.use_karras_sigmas is False
    assert config_of("DPM++ 2M SDE Heun")[1].solver_type == "heun"
    assert config_of("DPM++ 3M SDE")[1].solver_order == 3


@pytest.mark.parametrize(("sampler", "cls"), [
    ("DPM++ SDE", "DPMSolverSDEScheduler"), ("DPM2", "KDPM2DiscreteScheduler"),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler"), ("DPM++ 2S a", "DPMSolverSinglestepScheduler")])
def test_karras_by_default(sampler, cls):
    name, config = config_of(sampler)
    assert name == cls and config.use_karras_sigmas is True


def test_unipc_uses_a1111_defaults():
    cls, config = config_of("UniPC")
    assert (cls, config.solver_type, config.solver_order, config.lower_order_final) == \
        ("UniPCMultistepScheduler", "bh1", 3, True)


def test_euler_uses_linspace_and_starts_at_sigma_max():
    cls, config = config_of("Euler")
    assert cls == "EulerDiscreteScheduler" and config.timestep_spacing == "linspace"
    scheduler = samplers.make_scheduler("Euler", None, SD15_CONFIG)
    scheduler.set_timesteps(20)
    assert float(scheduler.sigmas[0]) == pytest.approx(sd15_sigmas()[-1], rel=1e-4)
    assert float(scheduler.timesteps[0]) == pytest.approx(999)


def test_ddim_and_plms_keep_leading_spacing_with_offset():
    for sampler, cls in (("DDIM", "DDIMScheduler"), ("PLMS", "PNDMScheduler")):
        name, config = config_of(sampler)
        assert name == cls
        assert (config.timestep_spacing, config.steps_offset, config.set_alpha_to_one) == ("leading", 1, False)
    assert config_of("DDIM")[1].clip_sample is False
    assert config_of("PLMS")[1].skip_prk_steps is True
    ddim = samplers.make_scheduler("DDIM", "Automatic", SD15_CONFIG)
    ddim.set_timesteps(10)
    # A1111: range(0, 1000, 100) + 1, descending
    assert ddim.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_karras_and_uniform_give_different_sigmas_for_euler():
    karras = samplers.make_scheduler("Euler", "Karras", SD15_CONFIG)
    uniform = samplers.make_scheduler("Euler", "Uniform", SD15_CONFIG)
    karras.set_timesteps(10)
    uniform.set_timesteps(10)
    assert not torch.allclose(karras.sigmas, uniform.sigmas)
    # Karras rho = 7 between the model's sigma range, then 0
    table = sd15_sigmas()
    ramp = np.linspace(0, 1, 10)
    lo, hi = table[0] ** (1 / 7), table[-1] ** (1 / 7)
    expected = (hi + ramp * (lo - hi)) ** 7
    np.testing.assert_allclose(karras.sigmas[:-1].numpy(), expected, rtol=1e-3)
    assert float(karras.sigmas[-1]) == 0.0


def test_exponential_sigmas_are_log_linear():
    scheduler = samplers.make_scheduler("Euler", "exponential", SD15_CONFIG)
    scheduler.set_timesteps(10)
    steps = np.diff(np.log(scheduler.sigmas[:-1].numpy()))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-3)


def test_sgm_uniform_is_trailing_and_ddim_schedule_is_leading():
    sgm = samplers.make_scheduler("Euler", "SGM Uniform", SD15_CONFIG)
    sgm.set_timesteps(10)
    assert sgm.timesteps.round().tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    leading = samplers.make_scheduler("Euler", "DDIM", SD15_CONFIG)
    leading.set_timesteps(10)
    assert leading.timesteps.round().tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_every_available_sampler_keeps_v_prediction():
    base = {**SD15_CONFIG, "prediction_type": "v_prediction"}
    for name in samplers.sampler_names():
        scheduler = samplers.make_scheduler(name, None, base)
        assert scheduler.config.prediction_type == "v_prediction", name


def test_zero_terminal_snr_is_kept_or_refused():
    base = {**SD15_CONFIG, "rescale_betas_zero_snr": True}
    assert samplers.make_scheduler("Euler", None, base).config.rescale_betas_zero_snr is True
    assert samplers.make_scheduler("DPM++ 2M", None, base).config.rescale_betas_zero_snr is True
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        samplers.make_scheduler("LMS", None, base)


def test_previous_scheduler_settings_do_not_leak():
    # generate passes pipe.scheduler.config, which is the previous request's scheduler
    previous = samplers.make_scheduler("DPM++ 2M SDE", "Karras", SD15_CONFIG)
    euler = samplers.make_scheduler("Euler", "Uniform", dict(previous.config))
    assert euler.config.use_karras_sigmas is False
    dpm = samplers.make_scheduler("DPM++ 2M", "Exponential", dict(previous.config))
    assert dpm.config.algorithm_type == "dpmsolver++"
    assert (dpm.config.use_karras_sigmas, dpm.config.use_exponential_sigmas) == (False, True)


def test_fresh_scheduler_per_call():
    first = samplers.make_scheduler("Euler", None, SD15_CONFIG)
    second = samplers.make_scheduler("Euler", None, SD15_CONFIG)
    assert first is not second
    first.set_timesteps(5)
    second.set_timesteps(12)
    first.step(torch.zeros(1, 4, 8, 8), first.timesteps[0], torch.ones(1, 4, 8, 8))
    assert len(first.timesteps) == 5 and len(second.timesteps) == 12
    assert first.step_index == 1 and second.step_index is None


def test_dpmpp_sde_noise_follows_the_seed():
    def one_step(seed):
        scheduler = samplers.make_scheduler("DPM++ SDE", None, SD15_CONFIG, seed=seed)
        scheduler.set_timesteps(6)
        sample = torch.ones(1, 4, 8, 8)
        t = scheduler.timesteps[0]
        return scheduler.step(torch.zeros_like(sample), t, sample).prev_sample

    assert torch.equal(one_step(7), one_step(7))
    assert not torch.equal(one_step(7), one_step(8))


# --- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("sampler", "schedule", "expected"), [
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
    ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M Karras", "karras", ("DPM++ 2M", "Karras")),
    ("Euler a", None, ("Euler a", "Automatic")),
    ("LMS Karras", "", ("LMS", "Karras")),
    ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Exponential")),
    ("DPM++ 2M SDE Heun Karras", None, ("DPM++ 2M SDE Heun", "Karras")),
    ("DPM++ SDE Karras", None, ("DPM++ SDE", "Karras")),
    ("DPM2 a Karras", None, ("DPM2 a", "Karras")),
    ("Euler SGMUniform", None, ("Euler", "SGM Uniform")),
    ("dpm++ 2m  karras", None, ("DPM++ 2M", "Karras")),
    ("DPM++ 2M", "sgm_uniform", ("DPM++ 2M", "SGM Uniform")),
    ("DPM++ 2M", "KARRAS", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M", "automatic", ("DPM++ 2M", "Automatic")),
    ("Euler", "normal", ("Euler", "Normal")),
    ("DDIM", None, ("DDIM", "Automatic")),
    ("DDIM", "ddim", ("DDIM", "DDIM")),
    ("k_euler", None, ("Euler", "Automatic")),
    ("k_euler_a", None, ("Euler a", "Automatic")),
    ("k_euler_ancestral", None, ("Euler a", "Automatic")),
    ("k_lms", None, ("LMS", "Automatic")),
    ("k_heun", None, ("Heun", "Automatic")),
    ("k_dpm_2", None, ("DPM2", "Automatic")),
    ("k_dpm_2_a", None, ("DPM2 a", "Automatic")),
    ("k_dpmpp_2m", None, ("DPM++ 2M", "Automatic")),
    ("k_dpmpp_sde", None, ("DPM++ SDE", "Automatic")),
    ("k_dpmpp_2m_sde", None, ("DPM++ 2M SDE", "Automatic")),
    ("k_dpmpp_2s_a", None, ("DPM++ 2S a", "Automatic")),
    ("k_dpmpp_3m_sde", None, ("DPM++ 3M SDE", "Automatic")),
    ("k_dpmpp_2m_ka", None, ("DPM++ 2M", "Karras")),
    ("k_dpmpp_2m_sde_exp", None, ("DPM++ 2M SDE", "Exponential")),
    ("k_lcm", None, ("LCM", "Automatic")),
    ("unipc", None, ("UniPC", "Automatic")),
    ("plms", None, ("PLMS", "Automatic")),
])
def test_resolve(sampler, schedule, expected):
    assert samplers.resolve(sampler, schedule) == expected


def test_effective_schedule_resolves_automatic_per_sampler():
    expected = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2S a": "Karras", "DPM2": "Karras",
                "DPM2 a": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
                "DPM++ 3M SDE": "Exponential", "Euler": "Uniform", "Euler a": "Uniform", "LMS": "Uniform",
                "Heun": "Uniform", "UniPC": "Uniform", "DDIM": "DDIM", "PLMS": "DDIM", "LCM": None}
    for sampler, schedule in expected.items():
        assert samplers.effective_schedule(sampler, "Automatic") == schedule, sampler
    assert samplers.effective_schedule("DPM++ 2M", "Exponential") == "Exponential"


@pytest.mark.parametrize("name", NOT_AVAILABLE + ["k_dpm_fast", "k_dpm_ad", "restart", "IPNDM", "HeunPP2",
                                                  "Restart Karras"])
def test_unavailable_samplers_are_refused(name):
    with pytest.raises(ValueError, match="is not available in Easel .*k-diffusion loop.*pick e.g. DPM\\+\\+ 2M"):
        samplers.resolve(name, None)
    with pytest.raises(ValueError):
        samplers.make_scheduler(name, None, SD15_CONFIG)


def test_restart_message_is_exact():
    with pytest.raises(ValueError) as error:
        samplers.resolve("Restart", "Automatic")
    assert str(error.value) == ("Sampler 'Restart' is not available in Easel (it needs a k-diffusion loop); "
                                "pick e.g. DPM++ 2M")


@pytest.mark.parametrize(("sampler", "schedule"), [
    ("DDIM", "Karras"), ("PLMS", "Karras"), ("LCM", "Karras"), ("LCM", "Uniform"), ("Euler a", "Karras"),
    ("Euler a", "Exponential"), ("DDPM", "Beta"), ("DPM++ 2S a", "Uniform"), ("Euler a Karras", None)])
def test_incompatible_schedules_are_refused(sampler, schedule):
    with pytest.raises(ValueError, match="does not work with sampler"):
        samplers.resolve(sampler, schedule)
    with pytest.raises(ValueError, match="does not work with sampler"):
        samplers.make_scheduler(sampler, schedule, SD15_CONFIG)


@pytest.mark.parametrize("schedule", ["Align Your Steps", "align_your_steps", "KL Optimal", "Polyexponential",
                                      "Turbo"])
def test_unavailable_schedules_are_refused(schedule):
    with pytest.raises(ValueError, match="is not available in Easel.*pick e.g. Karras"):
        samplers.resolve("Euler", schedule)


def test_errors_for_unknown_names_and_conflicts():
    with pytest.raises(ValueError, match="Unknown sampler 'Foo'; pick one of: DPM\\+\\+ 2M, "):
        samplers.resolve("Foo", None)
    with pytest.raises(ValueError, match="Unknown schedule type 'wobbly'"):
        samplers.resolve("Euler", "wobbly")
    with pytest.raises(ValueError, match="No sampler given"):
        samplers.resolve("", None)
    with pytest.raises(ValueError, match="conflicts with 'Exponential'"):
        samplers.resolve("DPM++ 2M Karras", "Exponential")


def test_schedules_for_lists_what_each_sampler_accepts():
    assert samplers.schedules_for("LCM") == ["Automatic"]
    assert samplers.schedules_for("DDIM") == ["Automatic", "Uniform", "SGM Uniform", "Simple", "Normal", "DDIM"]
    assert samplers.schedules_for("k_dpmpp_2m") == samplers.schedule_labels()
    assert "Karras" not in samplers.schedules_for("Euler a")


def test_name_validation_does_not_import_diffusers():
    import subprocess
    import sys
    code = ("import sys; from pipelines import samplers; samplers.resolve('DPM++ 2M Karras', None); "
            "samplers.schedules_for('Euler'); print('diffusers' in sys.modules)")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"


def test_sigma_schedules_start_at_the_top_for_every_sigma_sampler():
    sigma_max = sd15_sigmas()[-1]
    for name in samplers.sampler_names():
        if "Karras" not in samplers.schedules_for(name):
            continue
        scheduler = samplers.make_scheduler(name, "Karras", SD15_CONFIG)
        scheduler.set_timesteps(10)
        assert math.isclose(float(scheduler.sigmas.max()), sigma_max, rel_tol=1e-3), name
