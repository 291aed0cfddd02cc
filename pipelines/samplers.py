"""A1111 sampler and schedule-type names -> a fresh diffusers scheduler per request.

The tables follow AUTOMATIC1111 1.10 (`sd_samplers_kdiffusion`, `sd_samplers_timesteps`,
`sd_schedulers`) plus Forge's DEIS and DDPM, mapped per /work/shared/reference/a1111-compat.md §f.
A sampler or schedule that diffusers cannot honour is an error, never a silent fallback.
diffusers is imported only when a scheduler is built, so validating names stays cheap.

Extensions add samplers through a `SamplerTable` passed in explicitly (the request carries the
app's, `request.additions.samplers`); without one only Easel's own samplers exist.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

AUTOMATIC = "Automatic"
# What the checkpoint's scheduler config says about the *model* (its noise schedule and what the
# UNet predicts). Everything else about sampling comes from our tables, so settings of the
# scheduler a previous request installed never leak into the next one.
MODEL_CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type", "rescale_betas_zero_snr", "original_inference_steps",
                     "timestep_scaling")
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_K_DIFFUSION_LOOP = "it needs a k-diffusion loop"


@dataclass(frozen=True)
class ScheduleSpec:
    name: str  # API name (`karras`)
    label: str  # UI / infotext label (`Karras`)
    aliases: tuple[str, ...] = ()
    # scheduler config keys that realise this schedule
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    unavailable: str | None = None  # why Easel cannot run it, when it cannot


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    aliases: tuple[str, ...]
    scheduler_class: str | None  # a class name in `diffusers`; None when unavailable
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # label "Automatic" stands for; None: the scheduler's own spacing (LCM)
    default_schedule: str | None = "Uniform"
    approximate: bool = False  # diffusers has no exact equivalent; the closest one is used
    schedules: tuple[str, ...] = ()  # labels it accepts besides Automatic
    unavailable: str | None = None


@dataclass(frozen=True)
class ExtraSampler:
    """A sampler an extension added: `make(model_config) -> diffusers scheduler`, where
    `model_config` holds the checkpoint's MODEL_CONFIG_KEYS (betas, prediction type, ...). It
    sets its own schedule, so it takes schedule type Automatic only."""
    name: str
    make: Callable[[dict], Any]
    source: str = ""  # the extension that added it


@dataclass(frozen=True)
class SamplerTable:
    """Easel's samplers plus `extra` ones; an empty table is Easel's own. Names are unique,
    case-insensitively, and never shadow a built-in name, alias or legacy combined name."""
    extra: tuple[ExtraSampler, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", tuple(self.extra))
        seen: set[str] = set()
        for sampler in self.extra:
            check_extra_sampler_name(sampler.name)
            if _key(sampler.name) in seen:
                raise ValueError(f"sampler '{sampler.name}' is added twice")
            seen.add(_key(sampler.name))

    def find(self, sampler: str | None) -> ExtraSampler | None:
        key = _key(sampler or "")
        return next((s for s in self.extra if _key(s.name) == key), None)

    def names(self) -> list[str]:
        return [s.name for s in self.extra]


def check_extra_sampler_name(name: str) -> None:
    """ValueError when an added sampler's name is empty or is already one of Easel's."""
    key = _key(name or "")
    if not key:
        raise ValueError("a sampler needs a name")
    if _lookup_sampler(key) is not None or _split_legacy_name(key)[0] is not None:
        raise ValueError(f"sampler name '{name}' is already Easel's: pick another name")


def _ro(**values: Any) -> Mapping[str, Any]:
    return MappingProxyType(values)


_LINSPACE = "linspace"
_SCHEDULES = (
    ScheduleSpec("automatic", AUTOMATIC),
    ScheduleSpec("uniform", "Uniform", settings=_ro(timestep_spacing=_LINSPACE)),
    ScheduleSpec("karras", "Karras", settings=_ro(timestep_spacing=_LINSPACE, use_karras_sigmas=True)),
    ScheduleSpec("exponential", "Exponential",
                 settings=_ro(timestep_spacing=_LINSPACE, use_exponential_sigmas=True)),
    ScheduleSpec("polyexponential", "Polyexponential",
                 unavailable="diffusers has no polyexponential sigmas"),
    # A1111 sgm_uniform: t = linspace(T, 0, n + 1)[:-1]  == diffusers "trailing"
    ScheduleSpec("sgm_uniform", "SGM Uniform", ("SGMUniform",), settings=_ro(timestep_spacing="trailing")),
    ScheduleSpec("kl_optimal", "KL Optimal", unavailable="diffusers has no KL-optimal sigmas"),
    # AYS needs per-architecture sigma lists passed to the pipeline call, not a scheduler config.
    ScheduleSpec("align_your_steps", "Align Your Steps",
                 unavailable="it needs per-model sigma lists that a scheduler config cannot carry"),
    # A1111 simple: every (T/n)-th sigma from the top == "trailing"
    ScheduleSpec("simple", "Simple", settings=_ro(timestep_spacing="trailing")),
    # A1111 normal: t = linspace(T, 0, n) == "linspace"
    ScheduleSpec("normal", "Normal", settings=_ro(timestep_spacing=_LINSPACE)),
    # A1111 ddim_scheduler: every (T/n)-th timestep starting at 1 == "leading" + steps_offset 1
    ScheduleSpec("ddim", "DDIM", settings=_ro(timestep_spacing="leading", steps_offset=1)),
    # diffusers' beta sigmas use alpha = beta = 0.6, A1111's defaults
    ScheduleSpec("beta", "Beta", settings=_ro(timestep_spacing=_LINSPACE, use_beta_sigmas=True)),
    # Forge-only schedule types
    ScheduleSpec("turbo", "Turbo", unavailable="diffusers has no turbo schedule"),
    ScheduleSpec("align_your_steps_GITS", "Align Your Steps GITS",
                 unavailable="it needs per-model sigma lists that a scheduler config cannot carry"),
    ScheduleSpec("align_your_steps_11", "Align Your Steps 11",
                 unavailable="it needs per-model sigma lists that a scheduler config cannot carry"),
    ScheduleSpec("align_your_steps_32", "Align Your Steps 32",
                 unavailable="it needs per-model sigma lists that a scheduler config cannot carry"),
)

_SPACINGS = ("Uniform", "SGM Uniform", "Simple", "Normal", "DDIM")
_SIGMAS = ("Karras", "Exponential", "Beta")
_ALL = ("Uniform", "Karras", "Exponential", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta")
_DPM_MULTISTEP = dict(solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                      final_sigmas_type="zero", use_lu_lambdas=False, use_flow_sigmas=False,
                      thresholding=False)

_SAMPLERS = (
    SamplerSpec("DPM++ 2M", ("k_dpmpp_2m", "dpmpp_2m"), "DPMSolverMultistepScheduler",
                _ro(algorithm_type="dpmsolver++", solver_order=2, **_DPM_MULTISTEP), "Karras", schedules=_ALL),
    # the k-diffusion port with Brownian-tree noise (needs torchsde), as InvokeAI and SD.Next use
    SamplerSpec("DPM++ SDE", ("k_dpmpp_sde", "dpmpp_sde"), "DPMSolverSDEScheduler",
                _ro(), "Karras", schedules=_ALL),
    SamplerSpec("DPM++ 2M SDE", ("k_dpmpp_2m_sde", "dpmpp_2m_sde"), "DPMSolverMultistepScheduler",
                _ro(algorithm_type="sde-dpmsolver++", solver_order=2, **_DPM_MULTISTEP), "Exponential",
                schedules=_ALL),
    SamplerSpec("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), "DPMSolverMultistepScheduler",
                _ro(algorithm_type="sde-dpmsolver++", solver_order=2,
                    **{**_DPM_MULTISTEP, "solver_type": "heun"}),
                "Exponential", approximate=True, schedules=_ALL),
    # no ancestral singlestep solver in diffusers; this one also ignores timestep_spacing
    SamplerSpec("DPM++ 2S a", ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), "DPMSolverSinglestepScheduler",
                _ro(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                    lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=False,
                    thresholding=False),
                "Karras", approximate=True, schedules=_SIGMAS),
    # diffusers' SDE variant stops at order 2; the ODE third-order solver is the closest
    SamplerSpec("DPM++ 3M SDE", ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), "DPMSolverMultistepScheduler",
                _ro(algorithm_type="dpmsolver++", solver_order=3, **_DPM_MULTISTEP), "Exponential",
                approximate=True, schedules=_ALL),
    SamplerSpec("Euler a", ("k_euler_a", "k_euler_ancestral", "euler_ancestral"),
                "EulerAncestralDiscreteScheduler", _ro(), schedules=_SPACINGS),
    SamplerSpec("Euler", ("k_euler", "euler"), "EulerDiscreteScheduler",
                _ro(interpolation_type="linear", timestep_type="discrete", final_sigmas_type="zero"),
                schedules=_ALL),
    SamplerSpec("LMS", ("k_lms", "lms"), "LMSDiscreteScheduler", _ro(), schedules=_ALL),
    SamplerSpec("Heun", ("k_heun", "heun"), "HeunDiscreteScheduler", _ro(clip_sample=False), schedules=_ALL),
    SamplerSpec("DPM2", ("k_dpm_2", "dpm_2"), "KDPM2DiscreteScheduler", _ro(), "Karras", schedules=_ALL),
    SamplerSpec("DPM2 a", ("k_dpm_2_a", "dpm_2_ancestral"), "KDPM2AncestralDiscreteScheduler", _ro(),
                "Karras", schedules=_ALL),
    SamplerSpec("DPM fast", ("k_dpm_fast", "dpm_fast"), None, unavailable=_K_DIFFUSION_LOOP),
    SamplerSpec("DPM adaptive", ("k_dpm_ad", "dpm_adaptive"), None, unavailable=_K_DIFFUSION_LOOP),
    SamplerSpec("Restart", ("restart",), None, unavailable=_K_DIFFUSION_LOOP),
    # A1111's timestep samplers use leading spacing + offset 1 and never clip or set alpha to one
    SamplerSpec("DDIM", ("ddim",), "DDIMScheduler",
                _ro(clip_sample=False, set_alpha_to_one=False, thresholding=False), "DDIM", schedules=_SPACINGS),
    SamplerSpec("DDIM CFG++", ("ddim_cfgpp",), None, unavailable=_K_DIFFUSION_LOOP),
    SamplerSpec("PLMS", ("plms",), "PNDMScheduler", _ro(skip_prk_steps=True, set_alpha_to_one=False), "DDIM",
                schedules=_SPACINGS),
    # A1111 options uni_pc_variant=bh1, uni_pc_order=3, lower_order_final, skip_type time_uniform
    SamplerSpec("UniPC", ("unipc", "uni_pc"), "UniPCMultistepScheduler",
                _ro(solver_type="bh1", solver_order=3, lower_order_final=True, predict_x0=True,
                    # bh1 divides by the log-SNR step: a final sigma of 0 makes the last step NaN.
                    # A1111's UniPC also stops at the smallest sigma, not at 0.
                    final_sigmas_type="sigma_min", use_flow_sigmas=False, thresholding=False),
                schedules=_ALL),
    # LCMScheduler picks its own timesteps (it ignores timestep_spacing and has no sigma options)
    SamplerSpec("LCM", ("k_lcm", "lcm"), "LCMScheduler", _ro(clip_sample=False, thresholding=False), None),
    # Forge additions
    SamplerSpec("DEIS", ("deis",), "DEISMultistepScheduler", _ro(solver_order=3, use_flow_sigmas=False),
                schedules=_ALL),
    SamplerSpec("DDPM", ("ddpm",), "DDPMScheduler",
                _ro(clip_sample=False, variance_type="fixed_small", thresholding=False), schedules=_SPACINGS),
    SamplerSpec("HeunPP2", ("heunpp2",), None, unavailable=_K_DIFFUSION_LOOP),
    # diffusers' IPNDMScheduler runs its own cosine schedule, not the model's betas
    SamplerSpec("IPNDM", ("ipndm",), None, unavailable=_K_DIFFUSION_LOOP),
    SamplerSpec("IPNDM_V", ("ipndm_v",), None, unavailable=_K_DIFFUSION_LOOP),
)
# ≤ 1.8 alias suffixes: k_dpmpp_2m_ka, k_dpmpp_2m_sde_exp; InvokeAI's dpmpp_2m_k
_ALIAS_SCHEDULE_SUFFIXES = (("_ka", "Karras"), ("_exp", "Exponential"), ("_k", "Karras"))
_EXAMPLE_SAMPLER = "DPM++ 2M"
_EXAMPLE_SCHEDULE = "Karras"


# --- the tables ------------------------------------------------------------------------------

def samplers() -> list[SamplerSpec]:
    """Every sampler Easel can run, in A1111's order."""
    return [s for s in _SAMPLERS if s.unavailable is None]


def schedules() -> list[ScheduleSpec]:
    """Every schedule type Easel can run, in A1111's order (Automatic first)."""
    return [s for s in _SCHEDULES if s.unavailable is None]


def sampler_names(table: SamplerTable | None = None) -> list[str]:
    """Easel's sampler names, then the table's extra ones (for menus and /sdapi/v1/samplers)."""
    return [s.name for s in samplers()] + (table.names() if table else [])


def schedule_labels() -> list[str]:
    return [s.label for s in schedules()]


def sampler_spec(sampler: str) -> SamplerSpec:
    """The spec for a sampler name or alias (legacy schedule suffixes are not stripped here)."""
    spec = _lookup_sampler(_key(sampler))
    if spec is None:
        raise ValueError(_unknown_sampler(sampler))
    _ensure_sampler_available(spec)
    return spec


def schedules_for(sampler: str, table: SamplerTable | None = None) -> list[str]:
    """Schedule labels that `sampler` accepts, Automatic first (for the UI dropdown)."""
    if table is not None and table.find(sampler) is not None:
        return [AUTOMATIC]
    spec = sampler_spec(sampler)
    return [AUTOMATIC] + [label for label in schedule_labels() if label in spec.schedules]


# --- names -----------------------------------------------------------------------------------

def resolve(sampler: str, schedule: str | None = None, table: SamplerTable | None = None) -> tuple[str, str]:
    """Canonical (sampler name, schedule label). Accepts aliases (`k_dpmpp_2m`), legacy combined
    names ("DPM++ 2M Karras"), API schedule names (`karras`) and labels, case-insensitively;
    and the extra samplers of `table`."""
    extra = table.find(sampler) if table is not None else None
    if extra is not None:
        return extra.name, _extra_schedule(extra, schedule)
    spec, named = _find_sampler(sampler, table)
    chosen = _find_schedule(schedule) if schedule not in (None, "") else _schedule_by_label(AUTOMATIC)
    if named is not None:
        if chosen.label not in (AUTOMATIC, named.label):
            raise ValueError(
                f"Sampler '{sampler}' already names schedule type '{named.label}', which conflicts with "
                f"'{chosen.label}'; pick sampler '{spec.name}' with the schedule type you want")
        chosen = named
    if chosen.unavailable is not None:
        raise ValueError(f"Schedule type '{chosen.label}' is not available in Easel ({chosen.unavailable}); "
                         f"pick e.g. {_EXAMPLE_SCHEDULE}")
    if chosen.label != AUTOMATIC and chosen.label not in spec.schedules:
        allowed = ", ".join(schedules_for(spec.name))
        raise ValueError(f"Schedule type '{chosen.label}' does not work with sampler '{spec.name}' "
                         f"(diffusers' {spec.scheduler_class} cannot honour it); pick one of: {allowed}")
    return spec.name, chosen.label


def _extra_schedule(extra: ExtraSampler, schedule: str | None) -> str:
    if schedule not in (None, "") and _find_schedule(schedule).label != AUTOMATIC:
        origin = f" (from extension '{extra.source}')" if extra.source else ""
        raise ValueError(f"Sampler '{extra.name}'{origin} sets its own schedule: use schedule type Automatic")
    return AUTOMATIC


def effective_schedule(sampler: str, schedule: str | None = None) -> str | None:
    """The schedule label actually used: Automatic resolved per sampler as A1111 does
    (None: the scheduler's own timesteps, for LCM)."""
    name, label = resolve(sampler, schedule)
    return _sampler_by_name(name).default_schedule if label == AUTOMATIC else label


def _key(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def _lookup_sampler(key: str) -> SamplerSpec | None:
    for spec in _SAMPLERS:
        if key == spec.name.casefold() or key in (a.casefold() for a in spec.aliases):
            return spec
    return None


def _lookup_schedule(key: str) -> ScheduleSpec | None:
    for spec in _SCHEDULES:
        if key in (spec.name.casefold(), spec.label.casefold(), *(a.casefold() for a in spec.aliases)):
            return spec
    return None


def _find_sampler(sampler: str, table: SamplerTable | None = None) -> tuple[SamplerSpec, ScheduleSpec | None]:
    """The sampler, and the schedule a legacy combined name carries (None if it carries none)."""
    key = _key(sampler or "")
    if not key:
        raise ValueError(f"No sampler given; pick e.g. {_EXAMPLE_SAMPLER}")
    spec, named = _lookup_sampler(key), None
    if spec is None:
        spec, named = _split_legacy_name(key)
    if spec is None:
        raise ValueError(_unknown_sampler(sampler, table))
    _ensure_sampler_available(spec)
    return spec, named


def _split_legacy_name(key: str) -> tuple[SamplerSpec | None, ScheduleSpec | None]:
    for schedule in _SCHEDULES[1:]:
        for suffix in (schedule.label, *schedule.aliases):
            suffix = " " + suffix.casefold()
            if key.endswith(suffix) and (spec := _lookup_sampler(key[: -len(suffix)])) is not None:
                return spec, schedule
    for suffix, label in _ALIAS_SCHEDULE_SUFFIXES:
        if key.endswith(suffix) and (spec := _lookup_sampler(key[: -len(suffix)])) is not None:
            return spec, _schedule_by_label(label)
    return None, None


def _find_schedule(schedule: str) -> ScheduleSpec:
    spec = _lookup_schedule(_key(schedule))
    if spec is None:
        raise ValueError(f"Unknown schedule type '{schedule}'; pick one of: {', '.join(schedule_labels())}")
    return spec


def _schedule_by_label(label: str) -> ScheduleSpec:
    return next(s for s in _SCHEDULES if s.label == label)


def _sampler_by_name(name: str) -> SamplerSpec:
    return next(s for s in _SAMPLERS if s.name == name)


def _ensure_sampler_available(spec: SamplerSpec) -> None:
    if spec.unavailable is not None:
        raise ValueError(f"Sampler '{spec.name}' is not available in Easel ({spec.unavailable}); "
                         f"pick e.g. {_EXAMPLE_SAMPLER}")


def _unknown_sampler(sampler: str, table: SamplerTable | None = None) -> str:
    return f"Unknown sampler '{sampler}'; pick one of: {', '.join(sampler_names(table))}"


# --- schedulers ------------------------------------------------------------------------------

def scheduler_config(sampler: str, schedule: str | None, base_config: Mapping[str, Any], *,
                     seed: int | None = None) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config) for a sampler + schedule on the model `base_config` describes."""
    name, _label = resolve(sampler, schedule)
    spec = _sampler_by_name(name)
    accepted = _init_keys(spec.scheduler_class)
    config = {k: base_config[k] for k in MODEL_CONFIG_KEYS if k in base_config and k in accepted}
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in accepted:
        raise ValueError(f"Sampler '{spec.name}' cannot run a zero-terminal-SNR model ({spec.scheduler_class} "
                         f"has no rescale_betas_zero_snr); pick e.g. Euler or DPM++ 2M")
    # The base config may come from a scheduler with other sigma settings: reset them all.
    config.update({flag: False for flag in _SIGMA_FLAGS if flag in accepted})
    config.update(spec.options)
    schedule_label = effective_schedule(sampler, schedule)
    if schedule_label is not None:
        settings = dict(_schedule_by_label(schedule_label).settings)
        if "timestep_spacing" not in accepted and any(settings.get(flag) for flag in _SIGMA_FLAGS):
            # Sigma schedules set linspace only so the range starts at t = T; classes without the
            # option (DPMSolverSinglestep) always start there.
            del settings["timestep_spacing"]
        config.update(settings)
    if seed is not None and "noise_sampler_seed" in accepted:
        config["noise_sampler_seed"] = seed  # A1111 seeds the Brownian tree with the image seed
    unknown = sorted(set(config) - accepted)
    if unknown:  # a table error: the diffusers class would silently drop these
        raise RuntimeError(f"{spec.scheduler_class} does not take {', '.join(unknown)}")
    return spec.scheduler_class, config


def make_scheduler(sampler: str, schedule: str | None, base_config: Mapping[str, Any], *,
                   seed: int | None = None, table: SamplerTable | None = None):
    """A fresh diffusers scheduler (schedulers are stateful and not thread-safe: never share one).

    `base_config` is the checkpoint's scheduler config (`pipe.scheduler.config`); only its model
    keys (betas, prediction_type, zero-SNR, ...) are kept. `seed` seeds DPM++ SDE's Brownian noise
    so the same seed gives the same image; other samplers take noise from the pipeline generator.
    An extra sampler of `table` gets the base config's model keys and builds its own scheduler.
    """
    extra = table.find(sampler) if table is not None else None
    if extra is not None:
        _extra_schedule(extra, schedule)
        return _make_extra(extra, base_config)
    class_name, config = scheduler_config(sampler, schedule, base_config, seed=seed)
    return _scheduler_class(class_name).from_config(config)


def _make_extra(extra: ExtraSampler, base_config: Mapping[str, Any]):
    from diffusers import SchedulerMixin

    origin = f" (extension '{extra.source}')" if extra.source else ""
    try:
        scheduler = extra.make({k: base_config[k] for k in MODEL_CONFIG_KEYS if k in base_config})
    except Exception as exc:
        raise ValueError(f"sampler '{extra.name}'{origin} failed to build its scheduler: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(scheduler, SchedulerMixin):
        raise ValueError(f"sampler '{extra.name}'{origin} returned {type(scheduler).__name__}, "
                         f"not a diffusers scheduler")
    return scheduler


def _scheduler_class(class_name: str):
    import diffusers  # deferred: importing torch + diffusers takes seconds

    return getattr(diffusers, class_name)


def _init_keys(class_name: str) -> set[str]:
    return set(inspect.signature(_scheduler_class(class_name).__init__).parameters) - {"self"}
