"""Pydantic models of the A1111 `/sdapi/v1` payloads: the field names and defaults A1111 v1.10
uses, so the OpenAPI schema at /docs says what the routes accept. Unknown keys are ignored
(SillyTavern sends `url` and `auth` in the body); fields Easel does not use yet are accepted
and echoed back in `parameters`, as A1111 does (those that would change the picture are refused
when set: `api.mapping.check_unsupported`)."""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

_LENIENT = ConfigDict(extra="ignore", protected_namespaces=())


class ControlNetUnit(BaseModel):
    """One unit of `alwayson_scripts["ControlNet"]["args"]`, with sd-webui-controlnet's field
    names and Easel's defaults. For the schema only: the units are read by
    `pipelines.control.ControlUnit.from_a1111`, which also takes the old aliases (`guidance`,
    `input_image`, `mask_image`, `lowvram`, `guessmode`) and ignores other keys, as the
    extension does."""
    model_config = _LENIENT

    enabled: bool = True
    module: str = Field("none", description="the preprocessor, as GET /controlnet/module_list names it")
    model: str = Field("None", description="a models/ControlNet file: title, name or 'name [hash]' "
                                           "(GET /controlnet/model_list)")
    weight: float = Field(1.0, ge=0, le=2)
    image: Optional[Union[str, dict[str, Any], list[Any]]] = Field(
        None, description="base64 image; or {image, mask}; or [image, mask]")
    mask: Optional[str] = Field(None, description="base64; drawn lines become the control map, all black or "
                                                  "all white means no mask")
    resize_mode: Union[int, str] = Field("Crop and Resize", description="0 Just Resize, 1 Crop and Resize, "
                                                                      "2 Resize and Fill (or the name)")
    low_vram: bool = Field(False, description="accepted, no effect in Easel")
    processor_res: int = 512
    threshold_a: float = Field(-1, description="-1: the preprocessor's default")
    threshold_b: float = Field(-1, description="-1: the preprocessor's default")
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: Union[int, str] = Field("Balanced", description="0 Balanced, 1 My prompt is more important, "
                                                                  "2 ControlNet is more important (or the name)")
    pixel_perfect: bool = False


class ControlNetScript(BaseModel):
    """`alwayson_scripts["ControlNet"]` (the key matches case-insensitively)."""
    model_config = _LENIENT
    args: list[ControlNetUnit] = Field(default_factory=list, description="one entry per unit; "
                                       "disabled units (enabled: false) are skipped")


class _AlwaysonScriptsSchema:
    """Documents `alwayson_scripts` as {"ControlNet": ControlNetScript} in the OpenAPI schema while
    it still validates as a plain dict: `api.scripts.request_values` reads the units, so a typed
    field would change what the routes accept (extra keys, alias names, error messages)."""

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = handler(core_schema)
        # handler() on the model's core schema adds it to the components and returns a $ref.
        schema["properties"] = {"ControlNet": handler(ControlNetScript.__pydantic_core_schema__)}
        schema["description"] = ("A1111 always-on scripts by title; Easel has ControlNet. Other titles are "
                                 "refused (GET /sdapi/v1/scripts lists the available ones).")
        return schema


AlwaysonScripts = Annotated[dict[str, Any], _AlwaysonScriptsSchema()]


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
    alwayson_scripts: AlwaysonScripts = Field(default_factory=dict)
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
