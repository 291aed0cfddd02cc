"""Sample extensions written by tests: folders and real local git repositories."""
import subprocess
import textwrap
from pathlib import Path

GIT = ["git", "-c", "user.name=Easel Test", "-c", "user.email=test@easel.invalid",
       "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]

SAMPLE_TEMPLATE = '''
from PIL import ImageDraw, ImageOps

BORDER = {border!r}
SEED_SHIFT = {seed_shift}
SAMPLER = "Sample DDIM trailing"
made_schedulers = []  # what the sampler built (the tests check it ran)


def trailing_ddim(config):
    # a diffusers scheduler class with a config tweak: DDIM on "trailing" timesteps
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config({{**config, "timestep_spacing": "trailing", "clip_sample": False,
                                           "set_alpha_to_one": False}})
    made_schedulers.append(scheduler)
    return scheduler


def register(api):
    api.declare_setting("label", "sample", "shown in the sample tab")

    def build(ui):
        import gradio as gr
        gr.Markdown("Sample extension: " + api.setting("label"), elem_id="sample_ext_markdown")

    api.add_tab("Sample", build)
    api.add_accordion("txt2img", "Sample options", lambda ui: None)

    @api.on("before_generate")
    def shift_seed(request):
        return request.with_changes(seed=request.seed + SEED_SHIFT)

    @api.on("after_image")
    def border(image, request):
        image = image.copy()
        ImageDraw.Draw(image).rectangle([0, 0, image.width - 1, image.height - 1], outline=BORDER, width=2)
        return image

    api.add_infotext_field("Sample ext", lambda request: {version!r})
    api.add_preprocessor("sample-invert", lambda image: ImageOps.invert(image))
    api.add_sampler(SAMPLER, trailing_ddim)
    api.add_route("ping", lambda: {{"version": {version!r}}})
'''


def write_extension(folder: Path, name: str = "sample", version: str = "1.0", border=(255, 0, 0),
                    seed_shift: int = 1, api_version: int = 1, body: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "extension.toml").write_text(textwrap.dedent(f'''\
        name = "{name}"
        version = "{version}"
        api_version = {api_version}
        description = "a test extension"
        homepage = "https://example.invalid/{name}"
        requirements = ["packaging>=20", "easel-surely-not-installed-pkg==0.0.1"]
        '''))
    code = body if body is not None else SAMPLE_TEMPLATE.format(border=border, seed_shift=seed_shift,
                                                                  version=version)
    (folder / "__init__.py").write_text(code)
    return folder


def git(*args, cwd: Path) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(folder: Path, **kwargs) -> str:
    """A git repository holding the sample extension; returns its HEAD commit."""
    write_extension(folder, **kwargs)
    git("init", "--quiet", cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "--quiet", "-m", "v1", cwd=folder)
    return git("rev-parse", "HEAD", cwd=folder)


def commit_new_version(folder: Path, **kwargs) -> str:
    write_extension(folder, **kwargs)
    git("commit", "--quiet", "-am", "new version", cwd=folder)
    return git("rev-parse", "HEAD", cwd=folder)
