"""Pydantic models of the A1111 `/sdapi/v1` payloads: the field names and defaults A1111 v1.10
uses, so the OpenAPI schema at /docs says what the routes accept. Unknown keys are ignored
(SillyTavern sends `url` and `auth` in the body); fields Easel does not use yet are accepted
and echoed back in `parameters`, as A1111 does."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

_LENIENT = ConfigDict(extra="ignore", protected_namespaces=())


class _Processing(BaseModel):
    """Fields shared by txt2img and img2img (A1111 `StableDiffusionProcessing`)."""
    model_config = _LENIENT

    prompt: str = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    comments: Optional[dict[str, Any]] = None
    force_task_id: Optional[str] = None
    sampler_index: str = "Euler"
    script_name: Optional[str] = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: Optional[str] = None


class Txt2ImgRequest(_Processing):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: Optional[str] = None


class Img2ImgRequest(_Processing):
    init_images: Optional[list[Any]] = None
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False
    denoising_strength: Optional[float] = 0.75


class ImageResponse(BaseModel):
    images: list[str] = Field(description="raw base64 PNGs (no data: prefix), each with its infotext")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: prompt, seeds, sampler, model, infotexts, ...")


class PNGInfoRequest(BaseModel):
    model_config = _LENIENT
    image: str = Field(description="base64 image, with or without a data: prefix")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    model_config = _LENIENT
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class HypernetworkItem(BaseModel):
    name: str
    path: Optional[str] = None


class UpscalerItem(BaseModel):
    model_config = _LENIENT
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: Optional[float] = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class PromptStyleItem(BaseModel):
    name: str
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None


class EmbeddingItem(BaseModel):
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    shape: Optional[int] = None
    vectors: Optional[int] = None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)
