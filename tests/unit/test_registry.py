import hashlib
import json
import os
from pathlib import Path

import pytest

from pipelines import hashing
from pipelines.arch import Arch
from pipelines.hashing import HashCache
from pipelines.registry import TINYWORLD_LABEL, ModelEntry, ModelNotFoundError, ModelPaths, ModelRegistry
from tests import stripped


def _diffusers_pipeline(folder, cross_dim=768):
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": cross_dim, "in_channels": 4}))
    stripped.write_stripped(folder / "unet" / "diffusion_pytorch_model.safetensors", {"conv_in.weight": (320, 4, 3, 3)})


@pytest.fixture()
def tree(tmp_path):
    """An A1111-like data dir: one stripped file per architecture, subfolders, a diffusers
    folder, a pickle, a corrupt file, hidden files, a sidecar VAE and a built-in model."""
    root = tmp_path / "a1111"
    sd = root / "models" / "Stable-diffusion"
    stripped.write_stripped(sd / "sd15.safetensors", stripped.sd1_layout(),
                            {"modelspec.title": "sd15", "modelspec.thumbnail": "data:image/png;base64,AAAA"})
    stripped.write_stripped(sd / "sd15.vae.safetensors", stripped.vae_layout())
    (sd / "sd15.preview.png").write_bytes(b"\x89PNG")
    stripped.write_stripped(sd / "Inpaint" / "sd15-inpainting.safetensors", stripped.sd1_layout(inpaint=True))
    stripped.write_stripped(sd / "sd21-768.safetensors", stripped.sd2_layout())
    (sd / "sd21-768.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    stripped.write_stripped(sd / "v10.safetensors", stripped.sd2_layout())
    stripped.write_stripped(sd / "v2.safetensors", stripped.sd2_layout())
    stripped.write_stripped(sd / "xl" / "sdxl_base.safetensors", stripped.sdxl_layout())
    stripped.write_stripped(sd / "xl" / "sdxl_refiner.safetensors", stripped.sdxl_refiner_layout())
    (sd / "old.ckpt").write_bytes(os.urandom((1 << 20) + 0x10000))
    (sd / "broken.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json")
    stripped.write_stripped(sd / ".hidden.safetensors", stripped.sd1_layout())
    stripped.write_stripped(sd / ".trash" / "gone.safetensors", stripped.sd1_layout())
    (sd / "notes.txt").write_text("not a model")
    _diffusers_pipeline(sd / "diffusers-sd15")

    vae = root / "models" / "VAE"
    stripped.write_stripped(vae / "vae-ft-mse.safetensors", stripped.vae_layout())
    (vae / "kl-f8.pt").write_bytes(b"pickle")
    (vae / "diffusers-vae").mkdir(parents=True)
    (vae / "diffusers-vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    stripped.write_stripped(vae / "diffusers-vae" / "diffusion_pytorch_model.safetensors", stripped.vae_layout())
    stripped.write_stripped(vae / "misplaced-lora.safetensors", stripped.kohya_lora_sd1_layout())
    _diffusers_pipeline(vae / "misplaced-pipeline")  # its unet/ folder has a config.json too

    lora = root / "models" / "Lora"
    stripped.write_stripped(lora / "styleA_v3.safetensors", stripped.kohya_lora_sd1_layout(), stripped.KOHYA_SD1_METADATA)
    stripped.write_stripped(lora / "xl" / "xl_style.safetensors", stripped.kohya_lora_sdxl_layout(),
                            stripped.KOHYA_SDXL_METADATA | {"ssmd_cover_images": "[\"huge\"]"})
    lyco = root / "models" / "LyCORIS"
    stripped.write_stripped(lyco / "loha.safetensors", stripped.kohya_lora_sd1_layout())
    stripped.write_stripped(lyco / "styleA_v3.safetensors", stripped.kohya_lora_sd1_layout())  # same name as in Lora

    stripped.write_stripped(root / "models" / "ControlNet" / "control_v11p_sd15_canny.safetensors",
                            {"control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)})
    (root / "models" / "hypernetworks").mkdir()
    (root / "models" / "hypernetworks" / "hn.pt").write_bytes(b"pickle")
    stripped.write_stripped(root / "embeddings" / "easynegative.safetensors", {"emb_params": (8, 768)})
    (root / "embeddings" / "old-style.pt").write_bytes(b"pickle")

    builtin = tmp_path / "assets" / "tinyworld"
    stripped.write_stripped(builtin / "tinyworld.safetensors", stripped.tinyworld_layout(), stripped.TINYWORLD_METADATA)
    return root, builtin


def make_registry(root, builtin, cache_file):
    paths = ModelPaths(models_dir=root / "models", embeddings_dir=root / "embeddings", builtin_dir=builtin)
    registry = ModelRegistry(paths, HashCache(cache_file))
    registry.refresh()
    return registry


@pytest.fixture()
def registry(tree, tmp_path):
    return make_registry(*tree, tmp_path / "cache.json")


@pytest.fixture()
def no_hashing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("something hashed")

    for name in ("sha256_file", "sha256_folder", "addnet_hash", "autov1", "_kohya_addnet_hash"):
        monkeypatch.setattr(hashing, name, fail)


def test_paths():
    paths = ModelPaths(models_dir=Path("/m"), embeddings_dir=Path("/e"), builtin_dir=Path("/b"))
    assert paths.checkpoints.as_posix() == "/m/Stable-diffusion"
    assert paths.vae.as_posix() == "/m/VAE"
    assert [p.as_posix() for p in paths.lora] == ["/m/Lora", "/m/LyCORIS"]
    assert paths.controlnet.as_posix() == "/m/ControlNet"
    assert paths.hypernetworks.as_posix() == "/m/hypernetworks"


def test_checkpoints_sorted_with_arch_and_builtin_last(registry):
    listed = [(e.name, e.arch, e.format, e.builtin) for e in registry.checkpoints()]
    assert listed == [
        ("diffusers-sd15", Arch.SD1, "diffusers", False),
        ("Inpaint/sd15-inpainting.safetensors", Arch.SD1_INPAINT, "safetensors", False),
        ("old.ckpt", Arch.UNKNOWN, "ckpt", False),  # pickles are not opened while scanning
        ("sd15.safetensors", Arch.SD1, "safetensors", False),
        ("sd21-768.safetensors", Arch.SD2_V, "safetensors", False),  # from the .yaml sidecar
        ("v2.safetensors", Arch.SD2, "safetensors", False),  # natural order: v2 before v10
        ("v10.safetensors", Arch.SD2, "safetensors", False),
        ("xl/sdxl_base.safetensors", Arch.SDXL, "safetensors", False),
        ("xl/sdxl_refiner.safetensors", Arch.SDXL_REFINER, "safetensors", False),
        ("tinyworld.safetensors", Arch.TINYWORLD, "safetensors", True),
    ]


def test_entry_fields(registry, tree):
    root, builtin = tree
    sd15 = registry.find("checkpoint", "sd15.safetensors")
    path = root / "models" / "Stable-diffusion" / "sd15.safetensors"
    assert sd15.path == path and sd15.kind == "checkpoint"
    assert (sd15.size, sd15.mtime) == (path.stat().st_size, path.stat().st_mtime)
    assert sd15.label == "sd15.safetensors"
    assert sd15.sidecar_vae == root / "models" / "Stable-diffusion" / "sd15.vae.safetensors"
    assert sd15.metadata == {"modelspec.title": "sd15"}  # the thumbnail is dropped, as A1111 does
    tiny = registry.checkpoints()[-1]
    assert tiny.label == TINYWORLD_LABEL and tiny.path == builtin / "tinyworld.safetensors"
    assert tiny.metadata["modelspec.architecture"] == "easel/tiny-world-v1"
    assert registry.find("checkpoint", "v2").sidecar_vae is None
    diffusers = registry.find("checkpoint", "diffusers-sd15")
    assert diffusers.size == sum(p.stat().st_size for p in diffusers.path.rglob("*") if p.is_file())


def test_other_kinds(registry):
    assert [(e.name, e.format) for e in registry.vaes()] == [
        ("diffusers-vae", "diffusers"), ("kl-f8.pt", "ckpt"), ("vae-ft-mse.safetensors", "safetensors")]
    assert [(e.name, e.arch) for e in registry.loras()] == [
        ("loha.safetensors", Arch.SD1), ("styleA_v3.safetensors", Arch.SD1), ("xl/xl_style.safetensors", Arch.SDXL)]
    assert registry.loras()[1].path.parent.name == "Lora"  # Lora wins over LyCORIS on a clash
    assert "ssmd_cover_images" not in registry.loras()[2].metadata
    assert registry.loras()[2].metadata["ss_output_name"] == "xlstyle"
    assert [(e.name, e.arch) for e in registry.controlnets()] == [("control_v11p_sd15_canny.safetensors", Arch.SD1)]
    assert [e.name for e in registry.hypernetworks()] == ["hn.pt"]
    assert [(e.name, e.arch) for e in registry.embeddings()] == [
        ("easynegative.safetensors", Arch.SD1), ("old-style.pt", Arch.UNKNOWN)]


def test_skipped_records_damaged_and_misplaced_files_only(registry, tree):
    root, _ = tree
    models = root / "models"
    skipped = registry.skipped
    assert set(skipped) == {models / "Stable-diffusion" / "broken.safetensors",
                            models / "VAE" / "misplaced-lora.safetensors",
                            models / "VAE" / "misplaced-pipeline" / "unet",
                            models / "LyCORIS" / "styleA_v3.safetensors"}
    assert "re-download" in skipped[models / "Stable-diffusion" / "broken.safetensors"]
    assert "not a VAE" in skipped[models / "VAE" / "misplaced-lora.safetensors"]
    assert "not a VAE" in skipped[models / "VAE" / "misplaced-pipeline" / "unet"]


def test_missing_folders_are_empty(tmp_path):
    registry = make_registry(tmp_path / "nothing", tmp_path / "no-builtin", tmp_path / "cache.json")
    assert registry.checkpoints() == registry.vaes() == registry.loras() == registry.embeddings() == []
    assert registry.controlnets() == registry.hypernetworks() == []
    assert registry.default_checkpoint() is None
    with pytest.raises(ModelNotFoundError, match="there are none in .*Stable-diffusion. Add files there"):
        registry.find("checkpoint", "x")


def test_default_checkpoint(tree, tmp_path):
    root, builtin = tree
    registry = make_registry(root, builtin, tmp_path / "c.json")
    assert registry.default_checkpoint().name == "diffusers-sd15"
    only_builtin = make_registry(tmp_path / "empty", builtin, tmp_path / "c.json")
    assert only_builtin.default_checkpoint().label == TINYWORLD_LABEL
    # A refiner can't be the main model; the built-in is a better default than it.
    refiner_only = tmp_path / "r"
    stripped.write_stripped(refiner_only / "models" / "Stable-diffusion" / "r.safetensors", stripped.sdxl_refiner_layout())
    assert make_registry(refiner_only, builtin, tmp_path / "c.json").default_checkpoint().builtin


@pytest.mark.parametrize("query", [
    "xl/sdxl_base.safetensors", "xl/sdxl_base", "sdxl_base", "xl_sdxl_base", "xl\\sdxl_base.safetensors",
    "SDXL_Base", "xl/sdxl_base.safetensors [0123456789]",  # title with an unknown hash: the name decides
])
def test_find_checkpoint_aliases(registry, query):
    assert registry.find("checkpoint", query).name == "xl/sdxl_base.safetensors"


def test_find_builtin_by_label_and_lora_by_alias(registry):
    assert registry.find("checkpoint", TINYWORLD_LABEL).builtin
    assert registry.find("checkpoint", "tinyworld").builtin
    assert registry.find("lora", "styleA").name == "styleA_v3.safetensors"  # kohya ss_output_name
    assert registry.find("lora", "xl_style").name == "xl/xl_style.safetensors"
    assert registry.find("vae", "vae-ft-mse").name == "vae-ft-mse.safetensors"
    assert registry.find("embedding", "easynegative").arch is Arch.SD1


def test_find_by_hashes(registry, tree):
    root, _ = tree
    sd15 = registry.find("checkpoint", "sd15")
    data = sd15.path.read_bytes()
    full = hashlib.sha256(data).hexdigest()
    with pytest.raises(ModelNotFoundError):  # not hashed yet: hash look-ups only use known hashes
        registry.find("checkpoint", full[:10])
    assert registry.shorthash(sd15) == full[:10]
    assert registry.sha256(sd15) == full
    assert registry.title(sd15) == f"sd15.safetensors [{full[:10]}]"
    assert registry.find("checkpoint", full[:10]) == sd15
    assert registry.find("checkpoint", full) == sd15
    assert registry.find("checkpoint", f"sd15.safetensors [{full[:10]}]") == sd15
    assert registry.find("checkpoint", f"renamed.safetensors [{full[:10]}]") == sd15  # the hash decides
    # AutoV1 (old infotexts) is a 64 KiB read, computed on demand.
    old = (root / "models" / "Stable-diffusion" / "old.ckpt").read_bytes()
    assert registry.find("checkpoint", hashlib.sha256(old[0x100000:0x110000]).hexdigest()[:8]).name == "old.ckpt"


def test_hashes_land_in_cache_json(registry, tmp_path):
    sd15 = registry.find("checkpoint", "sd15")
    lora = registry.find("lora", "styleA")
    tiny = registry.find("checkpoint", "tinyworld")
    registry.shorthash(sd15)
    registry.shorthash(tiny)
    lora_data = lora.path.read_bytes()
    header_end = 8 + int.from_bytes(lora_data[:8], "little")
    assert registry.addnet_hash(lora) == hashlib.sha256(lora_data[header_end:]).hexdigest()
    saved = json.loads((tmp_path / "cache.json").read_text())
    assert set(saved["hashes"]) == {"checkpoint/sd15.safetensors", "builtin/checkpoint/tinyworld.safetensors"}
    assert saved["hashes"]["checkpoint/sd15.safetensors"] == {
        "mtime": sd15.mtime, "size": sd15.size, "sha256": hashlib.sha256(sd15.path.read_bytes()).hexdigest()}
    assert set(saved["hashes-addnet"]) == {"lora/styleA_v3.safetensors"}


def test_touched_file_is_rehashed(registry, tree, tmp_path):
    sd15 = registry.find("checkpoint", "sd15")
    registry.shorthash(sd15)
    st = sd15.path.stat()
    os.utime(sd15.path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    registry.refresh()
    touched = registry.find("checkpoint", "sd15")
    assert touched.mtime != sd15.mtime
    assert registry.title(touched) == "sd15.safetensors"  # the cached hash is stale now
    assert registry.shorthash(touched) == hashlib.sha256(touched.path.read_bytes()).hexdigest()[:10]
    assert json.loads((tmp_path / "cache.json").read_text())["hashes"]["checkpoint/sd15.safetensors"]["mtime"] == touched.mtime


def test_refresh_and_listing_never_hash(tree, tmp_path, no_hashing):
    registry = make_registry(*tree, tmp_path / "cache.json")
    titles = [registry.title(e) for e in registry.checkpoints()]
    assert titles[0] == "diffusers-sd15"
    assert registry.find("lora", "styleA") is not None
    assert not (tmp_path / "cache.json").exists()


def test_refresh_sees_added_and_removed_files(registry, tree):
    root, _ = tree
    sd = root / "models" / "Stable-diffusion"
    stripped.write_stripped(sd / "new.safetensors", stripped.sd1_layout())
    (sd / "v10.safetensors").unlink()
    assert "new.safetensors" not in [e.name for e in registry.checkpoints()]
    registry.refresh()
    names = [e.name for e in registry.checkpoints()]
    assert "new.safetensors" in names and "v10.safetensors" not in names


def test_unknown_name_error_lists_choices(registry):
    with pytest.raises(ModelNotFoundError) as caught:
        registry.find("checkpoint", "nope")
    message = str(caught.value)
    assert message.startswith("Checkpoint 'nope' not found. Press refresh after adding files, or pick one of: "
                              "diffusers-sd15, Inpaint/sd15-inpainting.safetensors, old.ckpt")
    assert message.endswith(TINYWORLD_LABEL)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ModelNotFoundError, match="^LoRA 'zzz' not found"):
        registry.find("lora", "zzz")
    with pytest.raises(ModelNotFoundError, match="^Checkpoint 'broken.safetensors' was skipped by the scan: "
                                                 "broken.safetensors: not a safetensors file .*re-download it"):
        registry.find("checkpoint", "broken.safetensors")
    with pytest.raises(ModelNotFoundError, match="'misplaced-lora' was skipped by the scan: .*not a VAE"):
        registry.find("vae", "misplaced-lora")
    with pytest.raises(ValueError, match="unknown model kind 'ckpt'"):
        registry.find("ckpt", "sd15")


def test_lists_are_built_lazily_and_entries_are_hashable(tree, tmp_path):
    root, builtin = tree
    paths = ModelPaths(models_dir=root / "models", embeddings_dir=root / "embeddings", builtin_dir=builtin)
    registry = ModelRegistry(paths, HashCache(tmp_path / "cache.json"))  # no refresh() call
    assert len(registry.checkpoints()) == 10
    assert len({e for e in registry.checkpoints()}) == 10


def test_entry_defaults_match_what_the_manager_builds(tmp_path):
    entry = ModelEntry(kind="vae", name="x.vae.pt", path=tmp_path / "x.vae.pt", format="ckpt", arch=Arch.UNKNOWN,
                       size=1, mtime=0.0, metadata={}, builtin=False)
    assert entry.label == "x.vae.pt" and entry.sidecar_vae is None
    assert (entry.stem, entry.model_name) == ("x.vae", "x.vae")


def test_a_second_refresh_of_2000_loras_and_embeddings_reads_no_headers(tmp_path):
    """Headers of LoRAs and embeddings are cached by (path, mtime, size) between refreshes: a
    rescan of a big folder costs stats only; a changed or added file is read again."""
    from pipelines import probe

    root = tmp_path / "big"
    lora, embeddings = root / "models" / "Lora", root / "embeddings"
    template = stripped.write_stripped(tmp_path / "template.safetensors", stripped.kohya_lora_sd1_layout(),
                                       stripped.KOHYA_SD1_METADATA)
    embedding = stripped.write_stripped(tmp_path / "emb.safetensors", {"emb_params": (2, 768)})
    for i in range(10):
        (lora / f"sub{i}").mkdir(parents=True)
    embeddings.mkdir(parents=True)
    for i in range(1800):  # hard links: 2000 files (paths) for the price of two
        os.link(template, lora / f"sub{i % 10}" / f"style{i}.safetensors")
    for i in range(200):
        os.link(embedding, embeddings / f"word{i}.safetensors")
    reads = []

    def counting(path):
        reads.append(path)
        return probe.read_safetensors_header(path)

    paths = ModelPaths(models_dir=root / "models", embeddings_dir=embeddings, builtin_dir=tmp_path / "none")
    registry = ModelRegistry(paths, HashCache(tmp_path / "cache.json"), read_header=counting)
    registry.refresh()
    assert len(reads) == 2000 and len(registry.loras()) == 1800 and len(registry.embeddings()) == 200
    first = {e.name: (e.arch, dict(e.metadata)) for e in registry.loras()}
    reads.clear()
    registry.refresh()
    assert reads == []
    assert {e.name: (e.arch, dict(e.metadata)) for e in registry.loras()} == first
    assert registry.find("embedding", "word7").arch == Arch.SD1

    changed = lora / "sub3" / "style3.safetensors"
    changed.unlink()  # a new file in its place (writing through the link would change all of them)
    stripped.write_stripped(changed, stripped.kohya_lora_sdxl_layout(), stripped.KOHYA_SDXL_METADATA)
    os.link(template, lora / "new.safetensors")
    registry.refresh()
    assert sorted(reads) == sorted([changed, lora / "new.safetensors"])
    assert registry.find("lora", "style3").arch == Arch.SDXL
