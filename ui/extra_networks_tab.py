"""Extra networks (LoRA / Embeddings / Hypernetworks cards) and VAE tabs.

Cards come from pipelines.adapters.cards (cached per file version); clicking one toggles its
tag (`<lora:name:w>`, the embedding's word, `<hypernet:name:w>`) in the chosen prompt box, like
A1111's extra-networks cards. The VAE tab shows the files, the active VAE from the manager's
snapshot, and remembers the VAE picked for each checkpoint.
"""
from __future__ import annotations

import re
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw

from pipelines.adapters.cards import Card, CardCatalog, save_user_metadata
from pipelines.adapters.paste import find_by_hash
from pipelines.vae_preferences import VaePreferences
from ui.components import ComponentRegistry
from ui.context import AppContext
from ui.topbar import vae_choices

KINDS = (("lora", "LoRA"), ("embedding", "Embeddings"), ("hypernetwork", "Hypernetworks"))
TARGETS = ("txt2img prompt", "txt2img negative prompt", "img2img prompt", "img2img negative prompt")
BASES = ("", "SD1", "SD2", "SDXL", "tiny-world", "unknown")
_TARGET_FIELDS = {"txt2img prompt": "txt2img.prompt", "txt2img negative prompt": "txt2img.negative_prompt",
                  "img2img prompt": "img2img.prompt", "img2img negative prompt": "img2img.negative_prompt"}


# --- pure helpers (tested without a browser) ------------------------------------------------

def toggle_tag(prompt: str, tag: str) -> str:
    """Add `tag` at the end of the prompt, or remove it when the prompt already has it (for
    `<lora:name:...>` any weight counts as having it)."""
    prompt = prompt or ""
    match = re.match(r"<(\w+):([^:>]+)", tag)
    pattern = (re.escape(f"<{match.group(1)}:{match.group(2)}") + r"(:[^>]*)?>") if match \
        else r"(?<![\w-])" + re.escape(tag) + r"(?![\w-])"
    if re.search(pattern, prompt):
        return re.sub(r"\s{2,}", " ", re.sub(r",?\s*" + pattern, "", prompt, count=1)).strip()
    return f"{prompt.rstrip()} {tag}".strip() if prompt.strip() else tag


def card_caption(card: Card) -> str:
    return f"{card.alias} · {card.base}" if card.kind != "embedding" else f"{card.stem} · {card.base}"


def card_details(card: Card) -> str:
    lines = [f"### {card.alias}", f"`{card.name}` · base **{card.base}** · inserts `{card.prompt_tag()}`"]
    if card.trigger_words:
        lines.append(f"**Trigger words:** {card.trigger_words}")
    if card.tags:
        lines.append("**Training tags:** " + ", ".join(f"{t} ({n})" for t, n in card.tags))
    if card.description:
        lines.append(card.description)
    return "\n\n".join(lines)


def placeholder(card: Card, size: int = 160) -> Image.Image:
    image = Image.new("RGB", (size, size), (60, 62, 70))
    draw = ImageDraw.Draw(image)
    draw.text((10, size // 2 - 6), card.stem[:22], fill=(230, 230, 230))
    return image


def gallery_items(cards: list[Card]) -> list[tuple[Any, str]]:
    return [(str(card.preview) if card.preview else placeholder(card), card_caption(card)) for card in cards]


def vae_table(registry) -> list[list[Any]]:
    return [[entry.name, entry.arch.value, round(entry.size / 2**20, 1)] for entry in registry.vaes()]


def vae_from_infotext(registry, parsed: Any) -> str | None:
    """The VAE choice an A1111 infotext names (`VAE` file name, else `VAE hash`, hashing the VAE
    files if no cached hash matches), None when it names none or one that is not here (the
    current choice then stays)."""
    if not isinstance(parsed, dict):
        return None
    for key in ("VAE", "VAE hash"):
        value = str(parsed.get(key) or "").strip()
        if not value:
            continue
        try:
            return registry.find("vae", value).name
        except ValueError:
            continue
    # a VAE renamed (or never hashed) here: cached hashes miss it, so hash the folder's files
    shorthash = str(parsed.get("VAE hash") or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", shorthash):
        return None
    entry = find_by_hash(registry, "vae", shorthash)
    return entry.name if entry is not None else None


def active_vae_text(manager) -> str:
    snap = manager.snapshot()
    if not snap.get("checkpoint"):
        return "No checkpoint loaded yet: the VAE is chosen with the next generation."
    return f"Active: **{snap['vae']}** on **{snap['checkpoint']}**"


# --- tabs --------------------------------------------------------------------------------------

def build(ctx: AppContext, reg: ComponentRegistry) -> None:
    catalog = CardCatalog()  # per app: cards are built when a tab is opened, then cached
    with gr.Tab("Extra networks", id="extra_networks") as outer:
        target = reg.add("extra_networks.target", gr.Radio(list(TARGETS), value=TARGETS[0],
                                                            label="Clicking a card edits"))
        with gr.Tabs():
            for kind, title in KINDS:
                with gr.Tab(title, id=f"extra_networks_{kind}") as inner:
                    _build_cards(ctx, reg, catalog, kind, target, [inner] + ([outer] if kind == "lora" else []))
    _build_vae_tab(ctx, reg)


def _build_cards(ctx: AppContext, reg: ComponentRegistry, catalog: CardCatalog, kind: str, target,
                 opened: list) -> None:
    private = dict(api_visibility="private")
    prefix = f"extra_networks.{kind}"
    with gr.Row(equal_height=True):
        search = reg.add(f"{prefix}.search", gr.Textbox(label="Search", placeholder="name, trigger word, notes",
                                                        scale=4))
        base = reg.add(f"{prefix}.base", gr.Dropdown(list(BASES), value="", label="Base model", scale=1))
        refresh = reg.add(f"{prefix}.refresh", gr.Button("↻ Refresh", scale=0, min_width=100))
    shown = gr.State([])
    selected = gr.State(None)
    gallery = reg.add(f"{prefix}.gallery", gr.Gallery(label=None, columns=6, height=420, allow_preview=False,
                                                      show_label=False, elem_id=f"extra_networks_{kind}_gallery"))
    with gr.Row(equal_height=False):
        details = reg.add(f"{prefix}.details", gr.Markdown("Click a card to add it to the prompt."))
        with gr.Column():
            activation = gr.Textbox(label="Activation text (trigger words)", lines=1)
            weight = gr.Number(label="Preferred weight (0: none)", value=0, precision=None)
            notes = gr.Textbox(label="Notes", lines=3)
            save = reg.add(f"{prefix}.save", gr.Button("Save card"))

    entries = {"lora": ctx.registry.loras, "embedding": ctx.registry.embeddings,
               "hypernetwork": ctx.registry.hypernetworks}[kind]

    def show(query: str, base_name: str, rescan: bool = False):
        if rescan:
            ctx.registry.refresh()
        cards = catalog.search(entries(), query or "", base_name or "")
        return gallery_items(cards), [c.name for c in cards]

    for trigger in [search.submit, base.change] + [tab.select for tab in opened]:
        trigger(show, inputs=[search, base], outputs=[gallery, shown], queue=False, **private)
    refresh.click(lambda q, b: show(q, b, True), inputs=[search, base], outputs=[gallery, shown], **private)

    prompt_boxes = [reg[_TARGET_FIELDS[t]] for t in TARGETS]

    def click(names: list[str], where: str, *prompts: str, evt: gr.SelectData):
        if not names or evt.index is None or evt.index >= len(names):
            return [gr.skip()] * (len(prompts) + 5)
        card = catalog.card(ctx.registry.find(kind, names[evt.index]))
        updated = [toggle_tag(p, card.prompt_tag()) if t == where else gr.skip() for t, p in zip(TARGETS, prompts)]
        return updated + [card_details(card), card.name, card.user.get("activation text", ""),
                          card.preferred_weight or 0, card.notes]

    gallery.select(click, inputs=[shown, target, *prompt_boxes],
                   outputs=[*prompt_boxes, details, selected, activation, weight, notes], queue=False, **private)

    def save_card(name: str | None, activation_text: str, preferred_weight: float | None, user_notes: str):
        if not name:
            raise gr.Error("Click a card first", print_exception=False)
        entry = ctx.registry.find(kind, name)
        save_user_metadata(entry, activation_text=activation_text or "", notes=user_notes or "",
                           preferred_weight=preferred_weight or "")
        return card_details(catalog.card(entry))

    save.click(save_card, inputs=[selected, activation, weight, notes], outputs=[details], queue=False, **private)


def _build_vae_tab(ctx: AppContext, reg: ComponentRegistry) -> None:
    private = dict(api_visibility="private")
    preferences = VaePreferences(ctx.settings.data_dir / "vae-preferences.json")
    with gr.Tab("VAE", id="vae_tab") as tab:
        gr.Markdown("Automatic uses a `<checkpoint>.vae.safetensors` beside the checkpoint when there is one, "
                    "else the checkpoint's own VAE; None always uses the checkpoint's own. The choice is "
                    "remembered per checkpoint.")
        choice = reg.add("vae_tab.choice", gr.Radio(vae_choices(ctx.registry), value="Automatic", label="VAE"))
        active = reg.add("vae_tab.active", gr.Markdown(active_vae_text(ctx.manager)))
        table = reg.add("vae_tab.files", gr.Dataframe(vae_table(ctx.registry), headers=["file", "arch", "MiB"],
                                                      interactive=False))
        refresh = gr.Button("↻ Refresh")

    def reload(current: str):
        ctx.registry.refresh()
        choices = vae_choices(ctx.registry)
        return (gr.update(choices=choices, value=current if current in choices else "Automatic"),
                vae_table(ctx.registry), active_vae_text(ctx.manager))

    for trigger in (tab.select, refresh.click):
        trigger(reload, inputs=[reg["vae"]], outputs=[choice, table, active], queue=False, **private)
    # The tab and the top bar show one choice; picking either remembers it for the checkpoint.
    choice.input(lambda v: v, inputs=[choice], outputs=[reg["vae"]], queue=False, **private)

    def remember(checkpoint: str | None, vae: str | None):
        preferences.set(checkpoint, vae)
        return vae

    reg["vae"].input(remember, inputs=[reg["checkpoint"], reg["vae"]], outputs=[choice], queue=False, **private)

    def recall(checkpoint: str | None, current: str | None):
        preferred = preferences.get(checkpoint)
        if preferred is None or preferred not in vae_choices(ctx.registry):
            return gr.skip(), gr.skip()
        return preferred, preferred

    reg["checkpoint"].change(recall, inputs=[reg["checkpoint"], reg["vae"]], outputs=[reg["vae"], choice],
                             queue=False, **private)


def wire_paste(ctx: AppContext, reg: ComponentRegistry) -> None:
    """PNG Info -> txt2img also brings the VAE back (LoRAs, embeddings and hypernetworks come
    back with the prompt's tags and words)."""
    if "png_info.send_to_txt2img" not in reg:
        return

    def paste(parsed: Any):
        name = vae_from_infotext(ctx.registry, parsed)
        return gr.skip() if name is None else name

    reg["png_info.send_to_txt2img"].click(paste, inputs=[reg["png_info.parsed"]], outputs=[reg["vae"]],
                                          api_visibility="private", queue=False)
