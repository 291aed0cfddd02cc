"""Write the bundled ControlNet configs (pipelines/configs/controlnet/<arch>/config.json).

A ControlNet copies its base UNet's encoder half, so its config is the UNet's config read by
`ControlNetModel` (built on the meta device: nothing is allocated). The values match the
lllyasviel / diffusers Hub ControlNets for SD1.5, SD2.1 and SDXL, and fit tiny-world's UNet and
its factor-4 VAE.

    .venv/bin/python tools/build_controlnet_configs.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ARCHES = ("sd1", "sd2", "sdxl", "tinyworld")
ROOT = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


def controlnet_config(arch: str) -> dict:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet_config = UNet2DConditionModel.load_config(ROOT / arch / "unet")
    # The hint encoder downsamples the control image to the latent size: one stride-2 step per
    # VAE downsampling (3 for SD's factor 8, 2 for tiny-world's factor 4).
    vae_config = json.loads((ROOT / arch / "vae" / "config.json").read_text())
    hint_channels = (16, 32, 96, 256)[:len(vae_config["block_out_channels"])]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels,
                                               load_weights_from_unet=False)
    config = dict(controlnet.config)
    return {k: v for k, v in config.items() if not k.startswith("_")} | {"_class_name": "ControlNetModel"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "controlnet")
    args = parser.parse_args(argv)
    for arch in ARCHES:
        folder = args.out / arch
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(controlnet_config(arch), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
