"""The sd-webui-controlnet extension's routes (at the host root, `/controlnet/*`) over the
control lane's engine: models from the registry, preprocessors from
`pipelines.control.preprocessors`. `detect` takes both `controlnet_input_images` (the
extension) and `controlnet_images` (what webuiapi sends)."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from api.errors import JSONErrorRoute
from api.images import ImageLimits, decode_image, encode_png

API_VERSION = 2  # the extension's API generation that its clients check for
# Control type -> (keywords for preprocessors, keywords for model files), as the extension groups them.
_CONTROL_TYPES = {
    "Canny": (("canny",), ("canny",)),
    "Depth": (("depth",), ("depth",)),
    "NormalMap": (("normal",), ("normal",)),
    "OpenPose": (("openpose",), ("openpose", "pose")),
    "MLSD": (("mlsd",), ("mlsd",)),
    "Lineart": (("lineart",), ("lineart",)),
    "SoftEdge": (("softedge", "hed", "pidinet"), ("softedge", "hed")),
    "Scribble/Sketch": (("scribble", "threshold", "invert"), ("scribble", "sketch")),
    "Segmentation": (("seg",), ("seg",)),
    "Shuffle": (("shuffle",), ("shuffle",)),
    "Tile/Blur": (("tile", "blur"), ("tile", "blur")),
}


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list, description="webuiapi's name for the same list")
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: Optional[list[str]] = None
    low_vram: bool = False


class DetectResponse(BaseModel):
    images: list[str]
    info: str


def model_titles(registry: Any) -> list[str]:
    """The extension's `name [hash8]` titles once a file is hashed, else the file stem (both
    resolve in a unit's `model`)."""
    titles = []
    for entry in registry.controlnets():
        sha = registry.cached_sha256(entry)
        titles.append(f"{entry.stem} [{sha[:8]}]" if sha else entry.stem)
    return titles


def module_detail(models_dir, table=None) -> dict[str, Any]:
    """Sliders and availability per preprocessor, the extensions' (`table`) after Easel's."""
    from pipelines.control import preprocessors

    detail = {}
    for pre in preprocessors.all_preprocessors(table):
        name = pre.name
        sliders = [{"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}]
        for slider in (pre.threshold_a, pre.threshold_b):
            if slider is not None:
                sliders.append({"name": slider.label, "value": slider.default, "min": slider.minimum,
                                "max": slider.maximum, "step": slider.step})
        detail[name] = {"model_free": name == "none", "sliders": sliders,
                        "available": preprocessors.unavailable_reason(pre, models_dir) is None}
    return detail


def control_types(registry: Any, table=None) -> dict[str, Any]:
    from pipelines.control import preprocessors

    modules = preprocessors.names(table)
    models = model_titles(registry)
    types = {"All": {"module_list": modules, "model_list": ["None", *models], "default_option": "none",
                     "default_model": "None"}}
    for label, (module_keys, model_keys) in _CONTROL_TYPES.items():
        mods = [m for m in modules if any(k in m for k in module_keys)]
        mdls = [m for m in models if any(k in m.lower() for k in model_keys)]
        types[label] = {"module_list": ["none", *mods], "model_list": ["None", *mdls],
                        "default_option": mods[0] if mods else "none", "default_model": mdls[0] if mdls else "None"}
    return types


def preprocessor_table(ctx: Any):
    """The extensions' preprocessors of the app (none for a bare context)."""
    additions = getattr(ctx, "additions", None)
    return additions.preprocessors if additions is not None else None


def build_router(ctx: Any, authenticate, limits: ImageLimits) -> APIRouter:
    router = APIRouter(prefix="/controlnet", route_class=JSONErrorRoute, dependencies=[Depends(authenticate)],
                       tags=["controlnet"])

    @router.get("/version")
    def version() -> dict[str, int]:
        return {"version": API_VERSION}

    @router.get("/model_list")
    def model_list(update: bool = Query(True)) -> dict[str, list[str]]:
        if update:
            ctx.registry.refresh()
        return {"model_list": model_titles(ctx.registry)}

    @router.get("/module_list")
    def module_list(alias_names: bool = Query(False)) -> dict[str, Any]:
        from pipelines.control import preprocessors

        table = preprocessor_table(ctx)
        return {"module_list": preprocessors.names(table), "module_detail": module_detail(ctx.settings.models_root, table)}

    @router.get("/control_types")
    def control_types_route() -> dict[str, Any]:
        return {"control_types": control_types(ctx.registry, preprocessor_table(ctx))}

    @router.get("/settings")
    def settings() -> dict[str, int]:
        return {"control_net_unit_count": int(getattr(ctx.settings, "control_net_unit_count", 3))}

    @router.post("/detect", response_model=DetectResponse)
    def detect(payload: DetectRequest):
        from pipelines.control import preprocessors

        sources = payload.controlnet_input_images or payload.controlnet_images
        if not sources:
            raise ValueError("controlnet_input_images (or controlnet_images) must hold at least one base64 image")
        masks = [index for index, mask in enumerate(payload.controlnet_masks or []) if mask]
        if masks:
            # The extension feeds masks only to its inpaint preprocessors; Easel has none, and
            # every preprocessor here ignores a mask, so refuse it rather than drop it.
            preprocessors.get(payload.controlnet_module)  # an unknown module is the first problem
            raise ValueError(f"controlnet_masks[{masks[0]}]: the '{payload.controlnet_module}' preprocessor takes no "
                             "mask (Easel has no inpaint preprocessor); leave controlnet_masks out")
        images = []
        for index, text in enumerate(sources):
            image = decode_image(text, f"controlnet_input_images[{index}]", limits)
            detected = preprocessors.detect(payload.controlnet_module, image,
                                            resolution=payload.controlnet_processor_res,
                                            threshold_a=payload.controlnet_threshold_a,
                                            threshold_b=payload.controlnet_threshold_b,
                                            models_dir=ctx.settings.models_root, table=preprocessor_table(ctx))
            images.append(encode_png(detected, None))
        return {"images": images, "info": "Success"}

    return router
