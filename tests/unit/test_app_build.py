"""build_app / build_ui without a server: nothing is loaded, the API surface is exactly the three
documented endpoints, and the UI's pure helpers (form values -> request, ImageEditor mask,
presets, infotext -> form, job streaming, auth) behave."""
import json
import re
import threading
from pathlib import Path

import pytest
from PIL import Image

import app
from pipelines.jobs import JobQueue, Progress
from pipelines.metadata import parse_infotext
from pipelines.request import GenerationResult
from pipelines.settings import Settings
from tests import factories
from ui.control_form import control_fields

PUBLIC_ENDPOINTS = {"/txt2img", "/img2img", "/png_info", "/merge_checkpoints", "/merge_loras",
                    "/extras_single_image", "/extras_batch_images", "/extras_batch_directory", "/queue", "/cancel",
                    "/history", "/txt2img_xyz_plot", "/img2img_xyz_plot", "/prompts_from_file", "/controlnet_preview"}
XYZ_PARAMETERS = ["xyz_x_type", "xyz_x_values", "xyz_y_type", "xyz_y_values", "xyz_z_type", "xyz_z_values", "xyz_save"]
PROMPTS_FROM_FILE_PARAMETERS = ["pff_text", "pff_file", "pff_iterate_seed"]
PREVIEW_PARAMETERS = ["image", "module", "resolution", "pixel_perfect", "resize_mode", "threshold_a", "threshold_b",
                      "width", "height"]
TXT2IMG_PARAMETERS = ["prompt", "negative_prompt", "sampler", "schedule", "steps", "cfg_scale", "width",
                      "height", "seed", "batch_count", "batch_size", "styles", "clip_skip", "emphasis", "wildcard_mode", "tiling", "subseed", "subseed_strength", "enable_hr", "hr_scale", "hr_upscaler",
                      "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint", "hr_sampler", "hr_prompt",
                      "hr_negative_prompt", "denoising_strength", "refiner_checkpoint", "refiner_switch_at",
                      "checkpoint", "vae"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    factories.write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors", seed=0)
    factories.write_tiny_vae(root / "models" / "VAE" / "warm.safetensors", seed=1)
    return root


@pytest.fixture(scope="module")
def built(data_dir):
    from ui.layout import build_ui

    ctx = app.build_context(Settings(data_dir=data_dir))
    blocks, components = build_ui(ctx)
    return blocks, ctx, components


# --- building ------------------------------------------------------------------------------

def test_build_loads_no_model_and_starts_no_worker(built, data_dir):
    _blocks, ctx, _components = built
    snapshot = ctx.manager.snapshot()
    assert snapshot["checkpoint"] is None and snapshot["loads"] == {}
    assert snapshot["ram_cache"]["used_bytes"] == 0
    assert ctx.jobs.current() is None and ctx.jobs.queued_count() == 0
    # this app's queue has no worker yet (other tests' workers may still be winding down)
    assert not ctx.jobs.running
    # Only folders and the (empty) history index were created: no cache.json (nothing hashed),
    # no outputs.
    files = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file())
    assert files == ["history.json", "models/Stable-diffusion/tiny.safetensors", "models/VAE/warm.safetensors"]
    assert json.loads((data_dir / "history.json").read_text())["entries"] == []
    for folder in ("outputs", "models/VAE", "models/Lora", "embeddings"):
        assert (data_dir / folder).is_dir()


def test_build_app_returns_blocks_and_context(tmp_path):
    import gradio as gr

    blocks, ctx = app.build_app(Settings(data_dir=tmp_path / "fresh"))
    assert isinstance(blocks, gr.Blocks)
    assert ctx.settings.data_dir == tmp_path / "fresh"
    assert ctx.registry.checkpoints() == [] or all(e.builtin for e in ctx.registry.checkpoints())
    assert {p.name for p in ctx.presets} >= {"default", "tiny-world"}


def test_an_a1111_models_dir_is_read_but_never_written(tmp_path, data_dir):
    a1111 = tmp_path / "webui"
    before = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*"))
    ctx = app.build_context(Settings(data_dir=tmp_path / "data", models_dir=data_dir / "models",
                                     embeddings_dir=a1111 / "embeddings"))
    assert [e.name for e in ctx.registry.checkpoints() if not e.builtin] == ["tiny.safetensors"]
    assert sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")) == before
    assert not a1111.exists()


def test_only_the_documented_endpoints_are_public(built):
    blocks, _ctx, _components = built
    info = blocks.get_api_info(all_endpoints=True)  # includes "undocumented" ones too
    assert set(info["named_endpoints"]) == PUBLIC_ENDPOINTS
    assert info["unnamed_endpoints"] == {}
    for fn in blocks.fns.values():
        if "/" + str(fn.api_name) not in PUBLIC_ENDPOINTS:
            assert fn.api_visibility == "private", fn.api_name


def test_txt2img_endpoint_parameters_are_named_and_optional(built):
    blocks, _ctx, _components = built
    params = blocks.get_api_info()["named_endpoints"]["/txt2img"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert [n for n in names if not re.match(r"cn\d+_|gligen_", n)] == TXT2IMG_PARAMETERS
    assert set(control_fields(3)) <= set(names)  # the ControlNet units, by name
    assert all(p["parameter_has_default"] for p in params)
    img2img = {p["parameter_name"]: p for p in blocks.get_api_info()["named_endpoints"]["/img2img"]["parameters"]}
    assert {"mode", "init_image", "mask", "denoising_strength", "resize_mode", "inpaint_area"} <= set(img2img)
    assert all(p["parameter_has_default"] for p in img2img.values())


def test_script_and_preview_endpoints_take_the_form_by_name_with_defaults(built):
    blocks, _ctx, _components = built
    endpoints = blocks.get_api_info()["named_endpoints"]
    for name, own, form in (("/txt2img_xyz_plot", XYZ_PARAMETERS, "/txt2img"), ("/img2img_xyz_plot", XYZ_PARAMETERS, "/img2img"),
                            ("/prompts_from_file", PROMPTS_FROM_FILE_PARAMETERS, "/txt2img")):
        params = endpoints[name]["parameters"]
        names = [p["parameter_name"] for p in params]
        # The tab's own form fields (without the ControlNet units), then the script's.
        form_names = [p["parameter_name"] for p in endpoints[form]["parameters"] if not re.match(r"cn\d+_|gligen_", p["parameter_name"])]
        assert sorted(n for n in names if n not in own) == sorted(form_names), name
        assert [n for n in names if n in own] == own, name
        assert all(p["parameter_has_default"] for p in params), name
    preview = endpoints["/controlnet_preview"]["parameters"]
    assert [p["parameter_name"] for p in preview] == PREVIEW_PARAMETERS
    assert all(p["parameter_has_default"] for p in preview)


def test_generation_events_share_one_device_slot(built):
    blocks, _ctx, _components = built
    generate = [fn for fn in blocks.fns.values() if fn.api_name in ("txt2img", "img2img")]
    assert len(generate) == 2
    # The job queue below orders them fairly between users, so Gradio lets several in at once.
    from ui.generation import DEVICE_EVENT_SLOTS

    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in generate} == {("device", DEVICE_EVENT_SLOTS)}


def test_top_bar_lists_models_and_the_preset_follows_the_model(built):
    _blocks, _ctx, c = built
    assert c["checkpoint"].value == "tiny.safetensors"
    assert [choice[0] for choice in c["checkpoint"].choices][0] == "tiny.safetensors"
    assert [choice[0] for choice in c["vae"].choices] == ["Automatic", "None", "warm.safetensors"]
    # The tiny checkpoint is a tiny-world model: its preset sets the size and sampler.
    for tab in ("txt2img", "img2img"):
        assert (c[f"{tab}.width"].value, c[f"{tab}.height"].value) == (64, 64)
        assert (c[f"{tab}.sampler"].value, c[f"{tab}.steps"].value, c[f"{tab}.cfg_scale"].value) == ("Euler a", 20, 5)


def test_preset_follows_the_checkpoint_family(built):
    from ui.topbar import preset_for_checkpoint

    _blocks, ctx, _components = built
    assert preset_for_checkpoint(ctx, "tiny.safetensors").name == "tiny-world"
    assert preset_for_checkpoint(ctx, "").name == "tiny-world"  # the default checkpoint's family
    assert preset_for_checkpoint(ctx, "typed-in-nonsense").name == "default"


# --- form values -> request ------------------------------------------------------------------

def test_form_values_become_a_validated_request():
    from ui.request_builder import txt2img_request

    request = txt2img_request({"prompt": "a cat", "steps": 12.0, "width": 64, "height": 128, "seed": "42",
                               "sampler": "k_euler_a", "checkpoint": "", "vae": None, "cfg_scale": 4})
    assert (request.prompt, request.steps, request.width, request.height, request.seed) == ("a cat", 12, 64, 128, 42)
    assert (request.sampler, request.checkpoint, request.vae, request.cfg_scale) == ("Euler a", None, "Automatic", 4.0)
    assert not request.enable_hr
    hires = txt2img_request({"width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
                             "hr_second_pass_steps": 3.0, "hr_checkpoint": "", "hr_sampler": "Use same sampler",
                             "denoising_strength": 0.4})
    assert (hires.enable_hr, hires.hr_scale, hires.hr_upscaler, hires.hr_second_pass_steps) == (True, 1.5, "Lanczos", 3)
    assert (hires.hr_checkpoint, hires.denoising_strength) == (None, 0.4)
    refined = txt2img_request({"width": 64, "height": 64, "refiner_checkpoint": "", "refiner_switch_at": 0.6})
    assert (refined.refiner_checkpoint, refined.refiner_switch_at) == (None, 0.6)
    with pytest.raises(ValueError, match="width must be a multiple of 8 between 64 and 4096, got 100"):
        txt2img_request({"width": 100})
    with pytest.raises(ValueError, match="steps must be a whole number"):
        txt2img_request({"steps": 2.5})


def test_inpaint_mask_comes_from_painted_layers_or_the_uploaded_mask():
    from ui.request_builder import img2img_request, split_editor_value

    background = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (8, 8, 24, 40))
    image, mask = split_editor_value({"background": background, "layers": [layer], "composite": background})
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)
    assert mask.getbbox() == (8, 8, 24, 40) and set(mask.get_flattened_data()) == {0, 255}
    assert split_editor_value({"background": background, "layers": [], "composite": None})[1] is None

    request = img2img_request({"mode": "inpaint", "inpaint_image": {"background": background, "layers": [layer]},
                               "inpaint_area": "Only masked", "width": 64, "height": 64,
                               "inpainting_mask_invert": True, "inpainting_fill": "fill"})
    assert (request.task, request.inpaint_full_res, request.inpainting_mask_invert) == ("inpaint", True, True)
    assert request.mask.getbbox() == (8, 8, 24, 40)
    uploaded = Image.new("L", (64, 64), 0)
    uploaded.paste(255, (0, 0, 4, 4))
    request = img2img_request({"mode": "inpaint", "inpaint_image": {"background": background, "layers": [layer]},
                               "mask": uploaded, "width": 64, "height": 64})
    assert request.mask.getbbox() == (0, 0, 4, 4)  # the uploaded mask wins over painting

    with pytest.raises(ValueError, match="needs an init image"):
        img2img_request({"mode": "img2img"})
    with pytest.raises(ValueError, match="needs a mask"):
        img2img_request({"mode": "inpaint", "init_image": background, "width": 64, "height": 64})
    with pytest.raises(ValueError, match="mode must be one of"):
        img2img_request({"mode": "outpaint"})


# --- presets ---------------------------------------------------------------------------------

def test_repository_presets_load_and_cover_the_architectures(tmp_path):
    from ui.presets import Preset, load_preset, load_presets, preset_for

    presets = load_presets(app.PRESETS_DIR)
    tiny = preset_for("tinyworld", presets)
    assert (tiny.width, tiny.height, tiny.steps, tiny.cfg_scale) == (64, 64, 20, 5.0)
    assert tiny.sampler in ("Euler a", "DPM++ 2M")
    assert preset_for("sdxl", presets).width == 1024
    assert preset_for("sd1", presets).width == 512
    assert preset_for("something-new", presets).name == "default"
    assert preset_for("sd1", []) == Preset()

    (tmp_path / "bad.json").write_text(json.dumps({"schema_version": 1, "default_steps": 3}))
    with pytest.raises(ValueError, match="unknown key.*default_steps"):
        load_preset(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(ValueError, match="schema_version"):
        load_preset(tmp_path / "old.json")


def test_every_preset_names_a_known_sampler_and_schedule():
    from pipelines import samplers
    from ui.presets import load_presets

    for preset in load_presets(app.PRESETS_DIR):
        assert samplers.resolve(preset.sampler, preset.schedule) == (preset.sampler, preset.schedule)
        assert preset.width % 8 == 0 and preset.height % 8 == 0


# --- PNG Info -> txt2img ---------------------------------------------------------------------

A1111_INFOTEXT = ("a castle on a hill, (masterpiece:1.2)\nNegative prompt: blurry\n"
                  "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, "
                  "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


def test_infotext_fields_fill_the_txt2img_form():
    from ui.transfers import fields_from_infotext

    values = fields_from_infotext(parse_infotext(A1111_INFOTEXT))
    assert values == {"prompt": "a castle on a hill, (masterpiece:1.2)", "negative_prompt": "blurry",
                      "steps": 28, "sampler": "DPM++ 2M", "schedule": "Karras", "cfg_scale": 6.5,
                      "seed": 3141592653, "width": 512, "height": 768,
                      "clip_skip": 1, "emphasis": "Original",  # A1111 defaults filled in when pasting
                      "tiling": False,  # written only when on: absent means off
                      "subseed_strength": 0.0}  # likewise: no variation seed


def test_the_tiling_checkbox_reaches_the_request_and_comes_back_from_an_infotext(built):
    from ui.generation import generation_info
    from ui.request_builder import img2img_request, txt2img_request
    from ui.transfers import fields_from_generation, fields_from_infotext

    _blocks, _ctx, components = built
    assert all(components[f"{tab}.tiling"].label == "Tiling" for tab in ("txt2img", "img2img"))
    request = txt2img_request({"width": 64, "height": 64, "tiling": True})
    assert request.tiling and not txt2img_request({"width": 64, "height": 64}).tiling
    init = Image.new("RGB", (64, 64))
    assert img2img_request({"init_image": init, "width": 64, "height": 64, "tiling": True}).tiling
    result = GenerationResult(images=[init], infotexts=["x"], seeds=[1], paths=[])
    assert fields_from_generation(generation_info(request, result), 0)["tiling"] is True  # Send to img2img
    assert fields_from_infotext(parse_infotext(A1111_INFOTEXT + ", Tiling: True"))["tiling"] is True


def test_the_variation_seed_controls_reach_the_request_and_come_back_from_an_infotext(built):
    from ui.generation import generation_info
    from ui.request_builder import txt2img_request
    from ui.transfers import fields_from_generation, fields_from_infotext

    _blocks, _ctx, components = built
    assert components["txt2img.subseed"].value == -1 and components["txt2img.subseed_strength"].value == 0
    assert "img2img.subseed" not in components  # the engine mixes txt2img noise only
    request = txt2img_request({"width": 64, "height": 64, "subseed": 42, "subseed_strength": 0.25})
    assert (request.subseed, request.subseed_strength) == (42, 0.25)
    plain = txt2img_request({"width": 64, "height": 64})
    assert (plain.subseed, plain.subseed_strength) == (-1, 0.0)
    result = GenerationResult(images=[Image.new("RGB", (64, 64))] * 2, infotexts=["x", "y"], seeds=[1, 2], paths=[],
                              subseeds=[42, 43])
    info = generation_info(request, result)
    assert (info["subseed"], info["subseed_strength"]) == (42, 0.25)
    assert fields_from_generation(info, 1)["subseed"] == 43
    pasted = fields_from_infotext(parse_infotext(A1111_INFOTEXT + ", Variation seed: 7, Variation seed strength: 0.3"))
    assert (pasted["subseed"], pasted["subseed_strength"]) == (7, 0.3)


def test_png_info_reads_a_saved_png(tmp_path):
    from pipelines.metadata import image_bytes_with_infotext
    from ui.png_info import NO_PARAMETERS, image_info

    path = tmp_path / "a.png"
    path.write_bytes(image_bytes_with_infotext(Image.new("RGB", (8, 8)), A1111_INFOTEXT, "png"))
    text, parsed = image_info(str(path))
    assert text == A1111_INFOTEXT and parsed["Seed"] == "3141592653"
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert image_info(str(tmp_path / "plain.png")) == (NO_PARAMETERS, {})
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"not a readable (PNG, JPEG or WebP|image \(PNG, JPEG or WebP\))"):
        image_info(str(tmp_path / "junk.png"))


# --- streaming a job -------------------------------------------------------------------------

def _fake_run(fail: Exception | None = None, steps: int = 3):
    def run(request, progress, cancel):
        for step in range(1, steps + 1):
            progress(Progress(step, steps, 0, 1, preview=Image.new("RGB", (8, 8), (step, 0, 0))))
        if fail:
            raise fail
        image = Image.new("RGB", (request.width, request.height))
        return GenerationResult(images=[image], infotexts=["text"], seeds=[7], paths=[])
    return run


def test_stream_job_reports_progress_then_the_result(monkeypatch):
    import ui.generation as generation
    from pipelines.request import GenerationRequest

    monkeypatch.setattr(generation, "PREVIEW_INTERVAL_S", 0.0)
    reported = []
    jobs = JobQueue(_fake_run())
    try:
        outputs = list(generation.stream_job(jobs, GenerationRequest(width=64, height=64), "me",
                                             lambda fraction, desc: reported.append((round(fraction, 2), desc))))
    finally:
        jobs.stop()
    assert reported == [(0.33, "step 1/3"), (0.67, "step 2/3"), (1.0, "step 3/3")]
    previews, (gallery, info) = outputs[:-1], outputs[-1]
    assert [p[0][0].getpixel((0, 0)) for p in previews] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert gallery[0].size == (64, 64)
    assert (info["seeds"], info["infotexts"], info["seed"], info["width"]) == ([7], ["text"], 7, 64)


def test_stream_job_turns_engine_errors_into_short_ui_errors():
    import gradio as gr

    import ui.generation as generation
    from pipelines.request import GenerationRequest

    jobs = JobQueue(_fake_run(fail=ValueError("Checkpoint 'x' not found. Press refresh")))
    try:
        with pytest.raises(gr.Error, match="Checkpoint 'x' not found"):
            list(generation.stream_job(jobs, GenerationRequest(), "me"))
        jobs._run = _fake_run(fail=RuntimeError("CUDA out of memory\nlong traceback text"))
        with pytest.raises(gr.Error) as raised:
            list(generation.stream_job(jobs, GenerationRequest(), "me"))
        assert raised.value.message == "out of memory — try a smaller size or batch"
        jobs._run = _fake_run(fail=RuntimeError("shape mismatch\nlong traceback text"))
        with pytest.raises(gr.Error) as raised:
            list(generation.stream_job(jobs, GenerationRequest(), "me"))
        assert raised.value.message == "RuntimeError: shape mismatch"
    finally:
        jobs.stop()


def test_leaving_the_stream_early_cancels_the_job(monkeypatch):
    import ui.generation as generation
    from pipelines.request import GenerationRequest

    monkeypatch.setattr(generation, "PREVIEW_INTERVAL_S", 0.0)
    release = threading.Event()
    seen_cancel = []

    def run(request, progress, cancel):
        progress(Progress(1, 2, 0, 1, preview=Image.new("RGB", (8, 8))))
        release.wait(5)
        seen_cancel.append(cancel.cancelled)
        return GenerationResult(images=[], infotexts=[], seeds=[], paths=[], interrupted=cancel.cancelled)

    jobs = JobQueue(run)
    try:
        stream = generation.stream_job(jobs, GenerationRequest(), "me")
        next(stream)  # the first preview
        stream.close()  # the browser went away
        release.set()
        jobs.stop()
    finally:
        release.set()
    assert seen_cancel == [True]


# --- launch options ------------------------------------------------------------------------

def test_launch_options_bind_loopback_unless_listen(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# comment\nann:pw1\nbob:pw2,cy:pw3\n")
    settings = Settings(data_dir=tmp_path, auth="me:secret", auth_file=users)
    options = app.launch_options(settings)
    assert options["server_name"] == "127.0.0.1" and options["server_port"] == 7860
    auth = options["auth"]
    assert auth.usernames == ["me", "ann", "bob", "cy"]
    assert auth("me", "secret") and auth("cy", "pw3") and not auth("cy", "pw1") and not auth("zed", "pw1")
    assert options["allowed_paths"] == [str((tmp_path / "outputs").resolve())]
    assert str((tmp_path / "models").resolve()) in options["blocked_paths"]
    assert str(users.resolve()) in options["blocked_paths"]
    assert app.launch_options(Settings(data_dir=tmp_path, listen=True, port=9000))["server_name"] == "0.0.0.0"
    assert app.launch_options(Settings(data_dir=tmp_path))["auth"] is None
    users.write_text("nopassword\n")
    with pytest.raises(ValueError, match="user:password"):
        app.authenticator(Settings(data_dir=tmp_path, auth_file=users))


def test_online_is_decided_before_settings_exist():
    assert app.online_requested(["--port", "1", "--online"], {}) is True
    assert app.online_requested([], {"EASEL_ONLINE": "true"}) is True
    assert app.online_requested(["--port", "1"], {"EASEL_ONLINE": "0"}) is False


def test_main_refuses_bad_settings_with_a_short_message(tmp_path, capsys):
    assert app.main(["--data-dir", str(tmp_path), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "easel: port must be between 1 and 65535, got 70000"
    assert not (tmp_path / "outputs").exists()  # refused before anything was built


def test_importing_app_imports_nothing_heavy():
    """HF_HUB_OFFLINE must be set before huggingface_hub is imported, so app.py imports gradio,
    torch and diffusers only inside main()/build_app()."""
    import subprocess
    import sys

    code = ("import sys, app; heavy = {'gradio', 'torch', 'diffusers', 'transformers', 'huggingface_hub'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(app.__file__).parent, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_hires_and_refiner_fields_come_back_from_an_infotext():
    from ui.hires_controls import fields_from_infotext

    parsed = parse_infotext("a cat\nSteps: 4, Sampler: Euler, Seed: 5, Size: 64x64, Denoising strength: 0.5, "
                            "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent (nearest), "
                            "Refiner: base [abc], Refiner switch at: 0.6")
    values = fields_from_infotext(parsed)
    assert values["enable_hr"] and values["hr_scale"] == 2.0 and values["hr_second_pass_steps"] == 3
    assert (values["hr_upscaler"], values["denoising_strength"]) == ("Latent (nearest)", 0.5)
    assert (values["refiner_checkpoint"], values["refiner_switch_at"]) == ("base [abc]", 0.6)
    plain = fields_from_infotext(parse_infotext("a cat\nSteps: 4, Sampler: Euler, Seed: 5, Size: 64x64"))
    assert plain == {"enable_hr": False, "refiner_checkpoint": ""}


def test_refresh_lists_new_upscalers_and_checkpoints_in_this_lanes_dropdowns(tmp_path):
    import gradio as gr

    from tests.upscaler_factory import write_tiny_esrgan
    from ui.layout import build_ui

    data = tmp_path / "data"
    factories.write_tiny_checkpoint(data / "models" / "Stable-diffusion" / "a.safetensors")
    ctx = app.build_context(Settings(data_dir=data))
    blocks, reg = build_ui(ctx)
    write_tiny_esrgan(data / "models" / "ESRGAN" / "2x-new.pth")
    factories.write_tiny_checkpoint(data / "models" / "Stable-diffusion" / "b.safetensors", seed=1)
    [refresh] = [fn for fn in blocks.fns.values() if fn.fn.__qualname__.startswith("wire_refresh")]
    updates = dict(zip([block._id for block in refresh.outputs], refresh.fn()))
    assert "2x-new" in updates[reg["txt2img.hr_upscaler"]._id]["choices"]
    assert "2x-new" in updates[reg["extras.upscaler_1"]._id]["choices"]
    assert "b.safetensors" in updates[reg["merger.primary"]._id]["choices"]
    assert "b.safetensors" in updates[reg["txt2img.hr_checkpoint"]._id]["choices"]
    assert isinstance(blocks, gr.Blocks)
