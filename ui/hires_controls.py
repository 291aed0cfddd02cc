"""txt2img's Hires fix and Refiner accordions, registered as "<tab>.<A1111 API field name>"."""
from __future__ import annotations

import gradio as gr

from pipelines import hires, refiner, samplers, upscalers
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.topbar import checkpoint_choices

NO_REFINER = ""


def build(ctx: AppContext, reg: ComponentRegistry, tab: str) -> None:
    models_dir = ctx.registry.paths.models_dir
    checkpoints = checkpoint_choices(ctx.registry)
    p = f"{tab}."
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{tab}_hires"):
        reg.add(p + "enable_hr", gr.Checkbox(False, label="Enable hires fix", elem_id=f"{tab}_enable_hr"))
        with gr.Row():
            reg.add(p + "hr_upscaler", gr.Dropdown(upscalers.upscaler_names(models_dir, latent=True), value="Latent",
                                                   label="Upscaler", elem_id=f"{tab}_hr_upscaler"))
            reg.add(p + "hr_second_pass_steps", gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: same)",
                                                          elem_id=f"{tab}_hires_steps"))
            reg.add(p + "denoising_strength", gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                                        elem_id=f"{tab}_denoising_strength"))
        with gr.Row():
            reg.add(p + "hr_scale", gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id=f"{tab}_hr_scale"))
            reg.add(p + "hr_resize_x", gr.Slider(0, 2048, value=0, step=8, label="Resize width to (0: use scale)",
                                                 elem_id=f"{tab}_hr_resize_x"))
            reg.add(p + "hr_resize_y", gr.Slider(0, 2048, value=0, step=8, label="Resize height to (0: use scale)",
                                                 elem_id=f"{tab}_hr_resize_y"))
        with gr.Row():
            reg.add(p + "hr_checkpoint", gr.Dropdown([hires.SAME_CHECKPOINT] + checkpoints, value=hires.SAME_CHECKPOINT,
                                                     label="Hires checkpoint", allow_custom_value=True))
            reg.add(p + "hr_sampler", gr.Dropdown([hires.SAME_SAMPLER] + samplers.sampler_names(ctx.additions.samplers),
                                                  value=hires.SAME_SAMPLER, label="Hires sampling method"))
        reg.add(p + "hr_prompt", gr.Textbox("", label="Hires prompt (empty: same)", lines=2))
        reg.add(p + "hr_negative_prompt", gr.Textbox("", label="Hires negative prompt (empty: same)", lines=2))
    with gr.Accordion("Refiner", open=False, elem_id=f"{tab}_refiner"):
        with gr.Row():
            reg.add(p + "refiner_checkpoint", gr.Dropdown(
                [NO_REFINER] + refiner_choices(ctx), value=NO_REFINER, label="Refiner checkpoint (SDXL)",
                allow_custom_value=True, elem_id=f"{tab}_refiner_checkpoint"))
            reg.add(p + "refiner_switch_at", gr.Slider(0.01, 1, value=0.8, step=0.01, label="Switch at",
                                                       elem_id=f"{tab}_refiner_switch_at"))


def refiner_choices(ctx: AppContext) -> list[str]:
    return [e.label for e in ctx.registry.checkpoints() if e.arch in refiner.REFINER_ARCHS]


# infotext -> form: A1111 keys of the hires and refiner fields
PASTE_FIELDS = ("enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_second_pass_steps", "hr_upscaler",
                "denoising_strength", "hr_checkpoint", "hr_sampler", "hr_prompt", "hr_negative_prompt",
                "refiner_checkpoint", "refiner_switch_at")


def fields_from_infotext(parsed: dict) -> dict:
    """Parsed infotext -> hires/refiner form values. Hires is on when the infotext names a hires
    upscaler, scale or size; keys that are missing or unreadable are left out."""
    def number(key, kind):
        try:
            return kind(float(parsed[key]))
        except (KeyError, TypeError, ValueError):
            return None

    values: dict = {}
    hires_on = any(k in parsed for k in ("Hires upscale", "Hires upscaler")) or bool(number("Hires resize-1", int))
    values["enable_hr"] = hires_on
    if hires_on:
        for field, key, kind in (("hr_scale", "Hires upscale", float), ("hr_resize_x", "Hires resize-1", int),
                                 ("hr_resize_y", "Hires resize-2", int), ("hr_second_pass_steps", "Hires steps", int),
                                 ("denoising_strength", "Denoising strength", float)):
            value = number(key, kind)
            if value is not None:
                values[field] = value
        for field, key in (("hr_upscaler", "Hires upscaler"), ("hr_checkpoint", "Hires checkpoint"),
                           ("hr_sampler", "Hires sampler"), ("hr_prompt", "Hires prompt"),
                           ("hr_negative_prompt", "Hires negative prompt")):
            if isinstance(parsed.get(key), str):
                values[field] = parsed[key]
    values["refiner_checkpoint"] = parsed.get("Refiner") or NO_REFINER
    switch = number("Refiner switch at", float)
    if switch is not None:
        values["refiner_switch_at"] = switch
    return values


def wire_paste(reg: ComponentRegistry, tab: str = "txt2img") -> None:
    """PNG Info's "Send to txt2img" also fills the hires and refiner fields (a second listener,
    beside the one in ui/transfers.py that fills the common fields)."""
    if "png_info.send_to_txt2img" not in reg:
        return

    def paste(parsed):
        values = fields_from_infotext(parsed) if isinstance(parsed, dict) and parsed else {}
        return [values.get(field, gr.skip()) for field in PASTE_FIELDS]

    reg["png_info.send_to_txt2img"].click(paste, inputs=[reg["png_info.parsed"]],
                                          outputs=[reg[f"{tab}.{f}"] for f in PASTE_FIELDS],
                                          api_visibility="private", queue=False)


def wire_refresh(ctx: AppContext, reg: ComponentRegistry, tab: str = "txt2img") -> None:
    """The top bar's Refresh also updates this lane's lists: upscaler models (hires, Extras), the
    hires / refiner checkpoints and the merger's model and VAE lists. One listener rescans once
    (listeners of one click run independently, so it cannot rely on the top bar's rescan)."""
    from ui import merger_tab

    p = f"{tab}."
    extras = [n for n in ("extras.upscaler_1", "extras.upscaler_2") if n in reg]
    merger = [n for n in ("merger.primary", "merger.secondary", "merger.tertiary", "merger.vae") if n in reg]

    def refresh():
        ctx.registry.refresh()
        models_dir = ctx.registry.paths.models_dir
        checkpoints = checkpoint_choices(ctx.registry)
        updates = [gr.update(choices=upscalers.upscaler_names(models_dir, latent=True)),
                   gr.update(choices=[hires.SAME_CHECKPOINT] + checkpoints),
                   gr.update(choices=[NO_REFINER] + refiner_choices(ctx))]
        updates += [gr.update(choices=upscalers.upscaler_names(models_dir))] * len(extras)
        if merger:
            vaes = [merger_tab.KEEP_A_VAE] + [e.name for e in ctx.registry.vaes()]
            updates += ([gr.update(choices=checkpoints)] + [gr.update(choices=[merger_tab.NO_MODEL] + checkpoints)] * 2
                        + [gr.update(choices=vaes)])
        return updates

    outputs = reg.many(p + "hr_upscaler", p + "hr_checkpoint", p + "refiner_checkpoint", *extras, *merger)
    reg["refresh_models"].click(refresh, outputs=outputs, api_visibility="private", queue=False)
