"""A1111's extras routes (`extra-single-image`, `extra-batch-images`) over the hires lane's
upscalers (`pipelines.extras`). As in A1111's API nothing is saved: the upscaled PNGs come back
as raw base64, keeping the source's `parameters` and adding the `postprocessing` chunk."""
from __future__ import annotations

import base64
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from api.images import ImageLimits, decode_image

MAX_BATCH = 64


class _ExtrasBase(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    resize_mode: int = Field(0, description="0: by upscaling_resize, 1: to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class ExtrasSingleRequest(_ExtrasBase):
    image: str = Field("", description="base64 image")


class ExtrasImage(BaseModel):
    data: str
    name: Optional[str] = None


class ExtrasBatchRequest(_ExtrasBase):
    imageList: list[ExtrasImage] = Field(default_factory=list)


class ExtrasSingleResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchResponse(BaseModel):
    html_info: str
    images: list[str]


def _options(payload: _ExtrasBase):
    from pipelines import extras

    if payload.gfpgan_visibility or payload.codeformer_visibility:
        raise ValueError("face restoration (GFPGAN/CodeFormer) is not available in Easel; set its visibility to 0")
    return extras.ExtrasOptions(
        resize_mode=payload.resize_mode, upscaling_resize=payload.upscaling_resize,
        upscaling_resize_w=payload.upscaling_resize_w, upscaling_resize_h=payload.upscaling_resize_h,
        upscaling_crop=payload.upscaling_crop, upscaler_1=payload.upscaler_1, upscaler_2=payload.upscaler_2,
        extras_upscaler_2_visibility=payload.extras_upscaler_2_visibility)


def run(ctx: Any, images: list, payload: _ExtrasBase) -> tuple[list[str], str]:
    """(raw base64 PNGs, postprocessing text of the last one)."""
    from pipelines import extras, upscalers
    from pipelines.metadata import read_infotext

    options = _options(payload)
    tool = upscalers.Upscalers.for_manager(ctx.manager)  # model upscales wait for a running generation
    encoded, text = [], ""
    for image in images:
        result, text, _path = extras.process_one(tool, None, image, options)
        encoded.append(base64.b64encode(extras.png_bytes(result, read_infotext(image), text)).decode("ascii"))
    return encoded, text


def add_routes(router: Any, ctx: Any, limits: ImageLimits) -> None:
    @router.post("/extra-single-image", response_model=ExtrasSingleResponse)
    def extra_single_image(payload: ExtrasSingleRequest):
        images, text = run(ctx, [decode_image(payload.image, "image", limits)], payload)
        return {"html_info": text, "image": images[0]}

    @router.post("/extra-batch-images", response_model=ExtrasBatchResponse)
    def extra_batch_images(payload: ExtrasBatchRequest):
        if not payload.imageList:
            raise ValueError("imageList must hold at least one {data, name} image")
        if len(payload.imageList) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} images per batch, got {len(payload.imageList)}")
        decoded = [decode_image(item.data, f"imageList[{i}]", limits) for i, item in enumerate(payload.imageList)]
        images, text = run(ctx, decoded, payload)
        return {"html_info": text, "images": images}
