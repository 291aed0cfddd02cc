"""Top bar: checkpoint and VAE dropdowns with a refresh button; switching model family applies
that family's preset (size, sampler, steps, CFG) to both generation tabs."""
from __future__ import annotations

from typing import Any

import gradio as gr

from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.presets import FORM_FIELDS, Preset, preset_for

VAE_SPECIAL = ("Automatic", "None")
PRESET_TABS = ("txt2img", "img2img")


def checkpoint_choices(registry: Any) -> list[str]:
    return [entry.label for entry in registry.checkpoints()]


def default_checkpoint_label(registry: Any) -> str | None:
    entry = registry.default_checkpoint()
    return entry.label if entry is not None else None


def vae_choices(registry: Any) -> list[str]:
    return list(VAE_SPECIAL) + [entry.name for entry in registry.vaes()]


def preset_for_checkpoint(ctx: AppContext, checkpoint: str | None) -> Preset:
    arch = None
    try:
        entry = ctx.registry.find("checkpoint", checkpoint) if checkpoint else ctx.registry.default_checkpoint()
        arch = entry.arch.value if entry is not None else None
    except ValueError:
        pass  # a typed-in name that matches nothing: keep the general defaults
    return preset_for(arch, ctx.presets)


def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    checkpoint = default_checkpoint_label(ctx.registry)
    with gr.Row(equal_height=True, elem_id="easel_topbar"):
        reg.add("checkpoint", gr.Dropdown(
            checkpoint_choices(ctx.registry), value=checkpoint or "", label="Stable Diffusion checkpoint",
            allow_custom_value=True, scale=4, elem_id="checkpoint"))
        reg.add("vae", gr.Dropdown(vae_choices(ctx.registry), value="Automatic", label="SD VAE",
                                   allow_custom_value=True, scale=2, elem_id="vae"))
        reg.add("refresh_models", gr.Button("↻ Refresh", scale=0, min_width=100, elem_id="refresh_models"))
    reg.add("preset_name", gr.State(preset_for_checkpoint(ctx, checkpoint).name))


def wire(ctx: AppContext, reg: ComponentRegistry) -> None:
    """Called after the tabs exist: the preset switch writes into their fields."""
    private = dict(api_visibility="private")

    def refresh(checkpoint: str | None, vae: str | None):
        ctx.registry.refresh()
        checkpoints = checkpoint_choices(ctx.registry)
        vaes = vae_choices(ctx.registry)
        return (gr.update(choices=checkpoints,
                          value=checkpoint if checkpoint in checkpoints else default_checkpoint_label(ctx.registry)),
                gr.update(choices=vaes, value=vae if vae in vaes else "Automatic"))

    reg["refresh_models"].click(refresh, inputs=reg.many("checkpoint", "vae"),
                                outputs=reg.many("checkpoint", "vae"), **private)

    targets = [reg[f"{tab}.{name}"] for tab in PRESET_TABS for name in FORM_FIELDS]

    def apply_preset(checkpoint: str | None, current: str):
        preset = preset_for_checkpoint(ctx, checkpoint)
        if preset.name == current:
            return [gr.skip()] * len(targets) + [current]
        values = preset.form_values()
        return [values[name] for _tab in PRESET_TABS for name in FORM_FIELDS] + [preset.name]

    reg["checkpoint"].change(apply_preset, inputs=reg.many("checkpoint", "preset_name"),
                             outputs=targets + [reg["preset_name"]], queue=False, **private)
