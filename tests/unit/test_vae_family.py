"""An SDXL VAE has SD1's shapes: it is recognised from what its file says, and refused on SD1."""
import json
from types import SimpleNamespace

import pytest

from pipelines.arch import Arch
from pipelines.vae_family import check_vae_fits, vae_family


def vae(name, metadata=None, fmt="safetensors", path=None):
    return SimpleNamespace(name=name, metadata=metadata or {}, format=fmt, path=path or name)


def test_the_family_comes_from_modelspec_a_diffusers_config_or_the_name(tmp_path):
    assert vae_family(vae("anything.safetensors", {"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})) \
        == ("sdxl", "its ModelSpec architecture is stable-diffusion-xl-v1-base/vae")
    # ModelSpec wins over a misleading name
    assert vae_family(vae("sdxl-looking.safetensors", {"modelspec.architecture": "stable-diffusion-v1/vae"}))[0] == "sd"
    assert vae_family(vae("sub/SDXL_vae_fp16_fix.safetensors")) == ("sdxl", "its file name says SDXL")
    for scaling, family in ((0.13025, "sdxl"), (0.18215, "sd")):
        folder = tmp_path / f"vae-{family}"
        (folder / "vae").mkdir(parents=True)
        (folder / "vae" / "config.json").write_text(json.dumps({"scaling_factor": scaling}))
        assert vae_family(vae(folder.name, fmt="diffusers", path=folder)) == (
            family, f"its config.json has scaling_factor {scaling:g}")
    # A bare SDXL VAE, renamed and without metadata, cannot be told apart (README says so).
    assert vae_family(vae("vae-ft-mse-840000-ema-pruned.safetensors")) is None
    assert vae_family(vae("xl-shaped.safetensors")) is None


def test_a_known_sdxl_vae_is_refused_on_sd1_naming_both_and_the_reverse():
    with pytest.raises(ValueError) as raised:
        check_vae_fits(vae("sdxl_vae.safetensors"), Arch.SD1, "v1-5-pruned.safetensors")
    assert str(raised.value) == ("VAE sdxl_vae.safetensors is an SDXL VAE (its file name says SDXL) and does not fit "
                                 "the sd1 checkpoint v1-5-pruned.safetensors; pick a VAE made for it, or Automatic")
    for arch in (Arch.SD2, Arch.SD1_INPAINT, Arch.TINYWORLD):
        with pytest.raises(ValueError, match="is an SDXL VAE"):
            check_vae_fits(vae("sdxl_vae.safetensors"), arch)
    check_vae_fits(vae("sdxl_vae.safetensors"), Arch.SDXL, "xl.safetensors")
    check_vae_fits(vae("sdxl_vae.safetensors"), Arch.SDXL_REFINER)
    sd = vae("mse.safetensors", {"modelspec.architecture": "stable-diffusion-v1/vae"})
    with pytest.raises(ValueError, match="VAE mse.safetensors is an SD1/SD2 VAE .* the sdxl checkpoint xl"):
        check_vae_fits(sd, Arch.SDXL, "xl")
    check_vae_fits(sd, Arch.SD1)
    check_vae_fits(vae("plain.safetensors"), Arch.SDXL)  # unknown: loads as before
