"""Extra-network cards: metadata, previews, user files, search and caching; prompt tag toggling
and per-checkpoint VAE preferences behind the Extra networks and VAE tabs."""
import json

import pytest

from pipelines.adapters.cards import CardCatalog, build_card, save_user_metadata, top_tags
from pipelines.hashing import HashCache
from pipelines.registry import ModelPaths, ModelRegistry
from pipelines.vae_preferences import VaePreferences
from tests import factories
from ui.extra_networks_tab import toggle_tag


@pytest.fixture()
def registry(tmp_path):
    lora = tmp_path / "models" / "Lora"
    frequency = json.dumps({"10_inkwash": {"ink wash": 40, "monochrome": 12}, "5_extra": {"ink wash": 2, "brush": 7}})
    factories.write_tiny_lora(lora / "inkwash.safetensors", metadata={
        "ss_base_model_version": "sd_v1", "ss_output_name": "InkWash", "ss_tag_frequency": frequency})
    factories.write_tiny_lora(lora / "styles" / "neon.safetensors", seed=1)
    (lora / "styles" / "neon.preview.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "embeddings").mkdir()
    registry = ModelRegistry(ModelPaths(tmp_path / "models", tmp_path / "embeddings", tmp_path / "none"),
                             HashCache(tmp_path / "cache.json"))
    registry.refresh()
    return registry


def test_card_reads_kohya_metadata_preview_and_user_file(registry):
    ink = build_card(registry.find("lora", "inkwash"))
    assert (ink.alias, ink.base, ink.preview) == ("InkWash", "SD1", None)
    assert ink.tags[:3] == (("ink wash", 42), ("monochrome", 12), ("brush", 7))
    assert ink.trigger_words.startswith("ink wash, monochrome")
    assert ink.prompt_tag() == "<lora:inkwash:1>"
    neon_entry = registry.find("lora", "neon")
    neon = build_card(neon_entry)
    assert neon.base == "tiny-world" and neon.preview.name == "neon.preview.png"
    save_user_metadata(neon_entry, activation_text="neon glow", preferred_weight="0.6", notes="night scenes")
    saved = json.loads((neon_entry.path.parent / "neon.json").read_text())
    assert saved == {"activation text": "neon glow", "preferred weight": 0.6, "notes": "night scenes"}
    neon = build_card(neon_entry)
    assert (neon.trigger_words, neon.notes, neon.prompt_tag()) == ("neon glow", "night scenes", "<lora:neon:0.6>")
    with pytest.raises(ValueError, match="unknown card field"):
        save_user_metadata(neon_entry, colour="red")


def test_search_filters_by_words_and_base_and_caches_cards(registry):
    catalog = CardCatalog()
    entries = registry.loras()
    assert [c.stem for c in catalog.search(entries, "monochrome")] == ["inkwash"]  # a training tag
    assert [c.stem for c in catalog.search(entries, "", base="tiny-world")] == ["neon"]
    assert [c.stem for c in catalog.search(entries, "NEON")] == ["neon"]
    built = catalog.built
    catalog.search(entries, "")
    assert catalog.built == built  # both cards came from the cache
    save_user_metadata(registry.find("lora", "inkwash"), notes="changed")
    assert catalog.card(registry.find("lora", "inkwash")).notes == "changed"  # user file changed: rebuilt


def test_two_thousand_loras_build_only_the_shown_cards(tmp_path):
    # Speed itself is for bench/; here the work: one page of cards built, not 2000.
    from safetensors.torch import save_file
    import torch

    lora = tmp_path / "models" / "Lora"
    lora.mkdir(parents=True)
    for i in range(2000):
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora / f"l{i:04}.safetensors"),
                  metadata={"ss_tag_frequency": json.dumps({"a": {f"tag{i}": 1}})})
    (tmp_path / "embeddings").mkdir()
    registry = ModelRegistry(ModelPaths(tmp_path / "models", tmp_path / "embeddings", tmp_path / "none"),
                             HashCache(tmp_path / "cache.json"))
    registry.refresh()
    catalog = CardCatalog()
    first_page = catalog.search(registry.loras(), "", limit=200)
    assert len(first_page) == 200 and catalog.built == 200  # only what is shown is built
    assert [c.stem for c in catalog.search(registry.loras(), "tag1999")] == ["l1999"]


def test_top_tags_ignores_bad_json():
    assert top_tags("{not json") == () and top_tags("") == ()


@pytest.mark.parametrize("prompt, tag, expected", [
    ("", "<lora:a:1>", "<lora:a:1>"),
    ("a cat", "<lora:a:1>", "a cat <lora:a:1>"),
    ("a cat <lora:a:0.5>", "<lora:a:1>", "a cat"),  # toggles off whatever its weight
    ("a cat, <lora:b:1>", "<lora:a:1>", "a cat, <lora:b:1> <lora:a:1>"),
    ("a cat easyneg", "easyneg", "a cat"),
    ("a cat easyneg-v2", "easyneg", "a cat easyneg-v2 easyneg"),
])
def test_toggle_tag(prompt, tag, expected):
    assert toggle_tag(prompt, tag) == expected


def test_vae_preferences_per_checkpoint(tmp_path):
    prefs = VaePreferences(tmp_path / "vae-preferences.json")
    assert prefs.get("a.safetensors") is None
    prefs.set("a.safetensors", "warm.safetensors")
    prefs.set("b.safetensors", "None")
    again = VaePreferences(tmp_path / "vae-preferences.json")
    assert again.get("a.safetensors") == "warm.safetensors" and again.get("b.safetensors") == "None"


def test_vae_from_infotext(tmp_path):
    from ui.extra_networks_tab import vae_from_infotext

    factories.write_tiny_vae(tmp_path / "models" / "VAE" / "warm.safetensors")
    (tmp_path / "embeddings").mkdir()
    registry = ModelRegistry(ModelPaths(tmp_path / "models", tmp_path / "embeddings", tmp_path / "none"),
                             HashCache(tmp_path / "cache.json"))
    registry.refresh()
    shorthash = registry.shorthash(registry.find("vae", "warm.safetensors"))
    assert vae_from_infotext(registry, {"VAE": "warm.safetensors", "VAE hash": shorthash}) == "warm.safetensors"
    assert vae_from_infotext(registry, {"VAE": "renamed.safetensors", "VAE hash": shorthash}) == "warm.safetensors"
    assert vae_from_infotext(registry, {"VAE": "gone.safetensors"}) is None
    assert vae_from_infotext(registry, {"Steps": 20}) is None


def test_tab_handlers_insert_tags_and_remember_the_vae_per_checkpoint(tmp_path):
    import inspect
    from types import SimpleNamespace

    import app
    from pipelines.settings import Settings
    from ui.layout import build_ui

    data = tmp_path / "data"
    factories.write_tiny_checkpoint(data / "models" / "Stable-diffusion" / "a.safetensors")
    factories.write_tiny_vae(data / "models" / "VAE" / "warm.safetensors")
    factories.write_tiny_lora(data / "models" / "Lora" / "ink.safetensors")
    ctx = app.build_context(Settings(data_dir=data))
    blocks, reg = build_ui(ctx)

    def handler(qualname, kind=None):
        for fn in blocks.fns.values():
            closure = inspect.getclosurevars(fn.fn).nonlocals if fn.fn.__qualname__ == qualname else None
            if closure is not None and (kind is None or closure.get("kind") == kind
                                        or getattr(closure.get("entries"), "__name__", "") == kind + "s"):
                return fn.fn
        raise AssertionError(f"no handler {qualname} {kind}")

    items, names = handler("_build_cards.<locals>.show", "lora")("", "")
    assert names == ["ink.safetensors"] and items[0][1] == "ink · tiny-world"
    click = handler("_build_cards.<locals>.click", "lora")
    out = click(names, "txt2img negative prompt", "a cat", "blurry", "", "", evt=SimpleNamespace(index=0))
    assert out[1] == "blurry <lora:ink:1>" and out[5] == "ink.safetensors"
    out = click(names, "txt2img negative prompt", "a cat", "blurry <lora:ink:1>", "", "", evt=SimpleNamespace(index=0))
    assert out[1] == "blurry"  # a second click takes it out again

    handler("_build_vae_tab.<locals>.remember")("a.safetensors", "warm.safetensors")
    assert handler("_build_vae_tab.<locals>.recall")("a.safetensors", "Automatic") == (
        "warm.safetensors", "warm.safetensors")
    assert (data / "vae-preferences.json").is_file()


def _ui_handler(blocks, qualname, module, kind=None):
    """The Python function behind a wired event (qualname + module: several tabs name theirs
    `paste`), and its BlockFunction for checking the wiring."""
    import inspect

    for block_fn in blocks.fns.values():
        fn = block_fn.fn
        if getattr(fn, "__qualname__", "") != qualname or fn.__module__ != module:
            continue
        closure = inspect.getclosurevars(fn).nonlocals
        if kind is None or closure.get("kind") == kind or getattr(closure.get("entries"), "__name__", "") == kind + "s":
            return fn, block_fn
    raise AssertionError(f"no handler {module}.{qualname} {kind}")


@pytest.fixture(scope="module")
def adapters_app(tmp_path_factory):
    """The built UI over a data folder with an embedding, a hypernetwork and a VAE."""
    import torch

    import app
    from pipelines.settings import Settings
    from ui.layout import build_ui

    data = tmp_path_factory.mktemp("adapters") / "data"
    factories.write_tiny_checkpoint(data / "models" / "Stable-diffusion" / "a.safetensors")
    factories.write_tiny_vae(data / "models" / "VAE" / "warm.safetensors")
    factories.write_tiny_hypernetwork(data / "models" / "hypernetworks" / "inkhn.pt")
    (data / "embeddings").mkdir(parents=True)
    # A1111 names an embedding by its file, not by the "name" saved inside it
    torch.save({"string_to_param": {"*": torch.zeros(2, 64)}, "name": "saved-as"}, data / "embeddings" / "glow.pt")
    ctx = app.build_context(Settings(data_dir=data))
    blocks, reg = build_ui(ctx)
    return ctx, blocks, reg


def test_embedding_and_hypernetwork_cards_insert_a1111_tags(adapters_app):
    ctx, _, _ = adapters_app
    embedding = build_card(ctx.registry.find("embedding", "glow"))
    hypernetwork = build_card(ctx.registry.find("hypernetwork", "inkhn"))
    # A1111: an embedding card inserts its bare name, a hypernetwork card `<hypernet:name:1>`
    assert (embedding.kind, embedding.prompt_tag()) == ("embedding", "glow")
    assert embedding.prompt_tag(0.5) == "glow"  # an embedding has no weight in the tag
    assert (hypernetwork.kind, hypernetwork.prompt_tag()) == ("hypernetwork", "<hypernet:inkhn:1>")
    assert hypernetwork.prompt_tag(0.4) == "<hypernet:inkhn:0.4>"


@pytest.mark.parametrize("kind, name, tag", [("embedding", "glow.pt", "glow"),
                                             ("hypernetwork", "inkhn.pt", "<hypernet:inkhn:1>")])
def test_tab_shows_and_toggles_embedding_and_hypernetwork_cards(adapters_app, kind, name, tag):
    from types import SimpleNamespace

    import gradio as gr

    _, blocks, _ = adapters_app
    show, _ = _ui_handler(blocks, "_build_cards.<locals>.show", "ui.extra_networks_tab", kind)
    items, names = show("", "")
    assert names == [name] and items[0][1].startswith(name.rsplit(".", 1)[0] + " · ")
    click, _ = _ui_handler(blocks, "_build_cards.<locals>.click", "ui.extra_networks_tab", kind)
    prompts = ("a cat", "blurry", "", "")  # txt2img prompt / negative, img2img prompt / negative
    out = click(names, "txt2img prompt", *prompts, evt=SimpleNamespace(index=0))
    assert out[0] == f"a cat {tag}" and out[5] == name
    assert out[1:4] == [gr.skip()] * 3  # the other boxes are left alone
    out = click(names, "txt2img prompt", f"a cat {tag}", *prompts[1:], evt=SimpleNamespace(index=0))
    assert out[0] == "a cat"  # a second click takes it out again
    out = click(names, "img2img negative prompt", *prompts, evt=SimpleNamespace(index=0))
    assert out[3] == tag


def test_png_info_paste_restores_the_vae_by_name_or_by_hash(adapters_app):
    import gradio as gr

    from pipelines.metadata import parse_infotext
    from ui.topbar import vae_choices

    ctx, blocks, reg = adapters_app
    paste, block_fn = _ui_handler(blocks, "wire_paste.<locals>.paste", "ui.extra_networks_tab")
    assert [c._id for c in block_fn.inputs] == [reg["png_info.parsed"]._id]
    assert [c._id for c in block_fn.outputs] == [reg["vae"]._id]
    assert (reg["png_info.send_to_txt2img"]._id, "click") in [(t[0], t[1]) for t in block_fn.targets]

    vae_dir = ctx.registry.paths.models_dir / "VAE"
    shorthash = ctx.registry.shorthash(ctx.registry.find("vae", "warm.safetensors"))  # as an infotext writes it
    infotext = "a cat\nSteps: 20, Seed: 1, Size: 64x64, VAE hash: {hash}, VAE: {name}, Version: v1"
    assert paste(parse_infotext(infotext.format(hash=shorthash, name="warm.safetensors"))) == "warm.safetensors"
    # the file renamed since: the name is gone, the hash still finds it
    (vae_dir / "warm.safetensors").rename(vae_dir / "warm-v2.safetensors")
    ctx.registry.refresh()
    try:
        assert paste(parse_infotext(infotext.format(hash=shorthash, name="warm.safetensors"))) == "warm-v2.safetensors"
        assert "warm-v2.safetensors" in vae_choices(ctx.registry)  # a value the VAE dropdown offers
        # neither name nor hash known: the current choice stays
        assert paste(parse_infotext(infotext.format(hash="0123456789", name="gone.safetensors"))) == gr.skip()
        assert paste(parse_infotext("a cat\nSteps: 20, Seed: 1")) == gr.skip()
    finally:
        (vae_dir / "warm-v2.safetensors").rename(vae_dir / "warm.safetensors")
        ctx.registry.refresh()
