"""Checkpoint Merger tab: model + model (+ VAE, + LoRAs) and LoRA + LoRA.

Public endpoints `merge_checkpoints` and `merge_loras`. Outputs go only into the models folders
(models/Stable-diffusion, models/Lora) under a validated plain file name; after a merge the
registry is rescanned and the checkpoint dropdowns (top bar, merger, txt2img's hires and refiner)
list the new file at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr

from pipelines import hires, merger
from pipelines.access import shared_change_refusal
from ui import hires_controls
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.errors import user_error
from ui.topbar import checkpoint_choices

TAB = "merger"
KEEP_A_VAE = "Keep model A's VAE"
NO_MODEL = ""


def parse_lora_list(registry: Any, text: str | None) -> list[merger.LoraWeight]:
    """"name:weight, name2:weight" (weight 1 when left out) -> LoRA files with weights."""
    loras = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep:
            name, weight = item, "1"
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"LoRA weight must be a number in {item!r} (write name:0.8)") from None
        loras.append(merger.LoraWeight(registry.find("lora", name.strip()).path, value))
    return loras


def _output(ctx: AppContext, folder: Path, values: dict[str, Any], username: str | None) -> Path:
    """The merge's target file. Replacing an existing model changes it for every user, so with
    logins only admins may overwrite; a new name is anyone's to take."""
    name, overwrite = values.get("output_name") or "", bool(values.get("overwrite"))
    if overwrite and merger.output_path(folder, name, overwrite=True).exists():
        refusal = shared_change_refusal(ctx.authenticator, username, "overwrite a model")
        if refusal:
            raise ValueError(refusal)
    return merger.output_path(folder, name, overwrite=overwrite)


def merge_checkpoints_from_values(ctx: AppContext, values: dict[str, Any],
                                  progress: Callable[[float, str], None], username: str | None = None) -> Path:
    """`username`: the logged-in user (None without logins)."""
    registry = ctx.registry
    primary = values.get("primary")
    if not primary:
        raise ValueError("choose model A")

    def path_of(name: str | None) -> Path | None:
        return registry.find("checkpoint", name).path if name else None

    vae = values.get("vae") or KEEP_A_VAE
    output = _output(ctx, registry.paths.checkpoints, values, username)
    registry.paths.checkpoints.mkdir(parents=True, exist_ok=True)
    path = merger.merge_checkpoints(
        output, path_of(primary), path_of(values.get("secondary")), path_of(values.get("tertiary")),
        method=values.get("method") or merger.WEIGHTED_SUM, multiplier=float(values.get("multiplier", 0.5)),
        bake_vae=None if vae == KEEP_A_VAE else registry.find("vae", vae).path,
        loras=parse_lora_list(registry, values.get("loras")), half=values.get("precision") == "fp16",
        progress=progress)
    registry.refresh()
    return path


def merge_loras_from_values(ctx: AppContext, values: dict[str, Any], progress: Callable[[float, str], None],
                            username: str | None = None) -> Path:
    registry = ctx.registry
    folder = registry.paths.lora[0]
    output = _output(ctx, folder, values, username)
    folder.mkdir(parents=True, exist_ok=True)
    rank = values.get("rank")
    path = merger.merge_loras(output, parse_lora_list(registry, values.get("loras")),
                              mode=values.get("mode") or "concat", rank=int(rank) if rank else None,
                              half=values.get("precision") == "fp16", progress=progress)
    registry.refresh()
    return path


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    choices = checkpoint_choices(ctx.registry)
    vaes = [KEEP_A_VAE] + [e.name for e in ctx.registry.vaes()]
    p = f"{TAB}."
    with gr.Tab("Checkpoint Merger", id=TAB):
        gr.Markdown("Weighted sum: A·(1−M) + B·M. Add difference: A + (B − C)·M. LoRAs (`name:weight, ...`) are "
                    "added to the result. Files are written to models/Stable-diffusion (LoRA merges to models/Lora).")
        with gr.Row():
            reg.add(p + "primary", gr.Dropdown(choices, label="Model A", allow_custom_value=True, elem_id="merger_a"))
            reg.add(p + "secondary", gr.Dropdown([NO_MODEL] + choices, value=NO_MODEL, label="Model B",
                                                 allow_custom_value=True, elem_id="merger_b"))
            reg.add(p + "tertiary", gr.Dropdown([NO_MODEL] + choices, value=NO_MODEL, label="Model C",
                                                allow_custom_value=True, elem_id="merger_c"))
        with gr.Row():
            reg.add(p + "method", gr.Radio(list(merger.MERGE_METHODS), value=merger.WEIGHTED_SUM, label="Method"))
            reg.add(p + "multiplier", gr.Slider(0, 1, value=0.5, step=0.05, label="Multiplier (M)"))
        with gr.Row():
            reg.add(p + "vae", gr.Dropdown(vaes, value=KEEP_A_VAE, label="VAE"))
            reg.add(p + "precision", gr.Radio(["fp16", "fp32"], value="fp16", label="Save as"))
        reg.add(p + "loras", gr.Textbox("", label="Merge LoRAs into the result (name:weight, ...)",
                                        elem_id="merger_loras"))
        with gr.Row():
            reg.add(p + "output_name", gr.Textbox("", label="Output name (no folders)", elem_id="merger_name"))
            reg.add(p + "overwrite", gr.Checkbox(False, label="Overwrite"))
        reg.add(p + "run", gr.Button("Merge", variant="primary", elem_id="merger_run"))
        reg.add(p + "result", gr.Textbox("", label="Result", interactive=False, elem_id="merger_result"))
        with gr.Accordion("LoRA + LoRA", open=False):
            reg.add(p + "lora_list", gr.Textbox("", label="LoRAs (name:weight, ...)", elem_id="merger_lora_list"))
            with gr.Row():
                reg.add(p + "lora_mode", gr.Radio(list(merger.LORA_MERGE_MODES), value="concat",
                                                  label="Concatenate (exact) or SVD to a rank"))
                reg.add(p + "lora_rank", gr.Number(32, precision=0, label="SVD rank"))
                reg.add(p + "lora_precision", gr.Radio(["fp16", "fp32"], value="fp16", label="Save as"))
            reg.add(p + "lora_output_name", gr.Textbox("", label="Output name (no folders)"))
            reg.add(p + "lora_run", gr.Button("Merge LoRAs", elem_id="merger_lora_run"))
            reg.add(p + "lora_result", gr.Textbox("", label="Result", interactive=False))


def wire(ctx: AppContext, reg: ComponentRegistry) -> None:
    """After the top bar exists: a finished merge refreshes its checkpoint list too."""
    p = f"{TAB}."

    def merge_checkpoints(primary: str, secondary: str = "", tertiary: str = "", method: str = merger.WEIGHTED_SUM,
                          multiplier: float = 0.5, vae: str = KEEP_A_VAE, precision: str = "fp16", loras: str = "",
                          output_name: str = "", overwrite: bool = False, checkpoint: str | None = None,
                          request: gr.Request = None, progress=gr.Progress()):
        """Merge checkpoints: weighted sum or add difference of models A, B (and C), optionally baking
        a VAE and adding LoRAs ("name:weight, ..."); saved as models/Stable-diffusion/<output_name>.safetensors.
        Returns a message and the refreshed checkpoint list."""
        # Gradio fills `request` (the login decides who may overwrite); None only for direct calls
        values = dict(primary=primary, secondary=secondary, tertiary=tertiary, method=method, multiplier=multiplier,
                      vae=vae, precision=precision, loras=loras, output_name=output_name, overwrite=overwrite)
        try:
            path = merge_checkpoints_from_values(ctx, values, lambda f, d: progress(f, desc=d),
                                                 username=getattr(request, "username", None))
        except ValueError as exc:
            raise user_error(exc) from exc
        choices = checkpoint_choices(ctx.registry)
        lists = [gr.update(choices=choices)] + [gr.update(choices=[NO_MODEL] + choices)] * 2
        lists += [gr.update(choices=[hires.SAME_CHECKPOINT] + choices)] * len(hires_lists)
        refiners = [hires_controls.NO_REFINER] + hires_controls.refiner_choices(ctx)
        lists += [gr.update(choices=refiners)] * len(refiner_lists)
        return [f"Saved {path.name}"] + lists + [gr.update(choices=choices, value=checkpoint)]

    # txt2img's hires and refiner checkpoint lists get the new model too (choices only: the
    # user's selection there stays)
    hires_lists = [n for n in ("txt2img.hr_checkpoint",) if n in reg]
    refiner_lists = [n for n in ("txt2img.refiner_checkpoint",) if n in reg]
    reg[p + "run"].click(
        merge_checkpoints,
        inputs_kwargs={**reg.keyword_inputs(("primary", "secondary", "tertiary", "method", "multiplier", "vae",
                                             "precision", "loras", "output_name", "overwrite"), prefix=p),
                       "checkpoint": reg["checkpoint"]},
        outputs=reg.many(p + "result", p + "primary", p + "secondary", p + "tertiary", *hires_lists, *refiner_lists,
                         "checkpoint"),
        api_name="merge_checkpoints", concurrency_id="merge", concurrency_limit=1)

    def merge_loras(loras: str, mode: str = "concat", rank: float = 32, precision: str = "fp16",
                    output_name: str = "", request: gr.Request = None, progress=gr.Progress()) -> str:
        """Merge LoRAs ("name:weight, ...") into one: concat (exact) or svd to `rank`; saved as
        models/Lora/<output_name>.safetensors. Returns a message."""
        values = dict(loras=loras, mode=mode, rank=rank, precision=precision, output_name=output_name)
        try:
            path = merge_loras_from_values(ctx, values, lambda f, d: progress(f, desc=d),
                                           username=getattr(request, "username", None))
        except ValueError as exc:
            raise user_error(exc) from exc
        return f"Saved {path.name}"

    reg[p + "lora_run"].click(
        merge_loras,
        inputs_kwargs={"loras": reg[p + "lora_list"], "mode": reg[p + "lora_mode"], "rank": reg[p + "lora_rank"],
                       "precision": reg[p + "lora_precision"], "output_name": reg[p + "lora_output_name"]},
        outputs=[reg[p + "lora_result"]], api_name="merge_loras", concurrency_id="merge", concurrency_limit=1)
