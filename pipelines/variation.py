"""A1111 variation seeds ("Extra" seed options): image i of a batch starts from
slerp(strength, noise(seed + i), noise(subseed + i)). Only the initial noise is mixed; the noise a
sampler draws later still comes from the image's own seed generator, as in A1111."""
from __future__ import annotations

import torch

PARALLEL_DOT = 0.9995  # above this mean cosine acos() is unstable: plain lerp instead (A1111's limit)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of one image's (C, H, W) noise, the way A1111 does it: the angle is
    taken along dim 1 (per channel and column), not over the flattened tensor, so the same seeds
    give A1111's noise. strength 0 is `low`, 1 is `high`."""
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > PARALLEL_DOT:
        return low * (1 - strength) + high * strength
    omega = dot.acos()
    sin_omega = omega.sin()
    return ((((1.0 - strength) * omega).sin() / sin_omega).unsqueeze(1) * low
            + ((strength * omega).sin() / sin_omega).unsqueeze(1) * high)


def initial_noise(generators: list[torch.Generator], subseeds: list[int], strength: float,
                  shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """The batch's start latents (unscaled, CPU). The main noise is drawn from the image's own
    generator (the values diffusers would draw there), so the generator is left where the
    sampler expects it and ancestral samplers go on with the seed's own noise."""
    images = []
    for generator, subseed in zip(generators, subseeds):
        noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0]
        subnoise = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(subseed),
                               dtype=torch.float32)[0]
        images.append(slerp(strength, noise, subnoise))
    return torch.stack(images).to(dtype)


def latent_shape(pipe, width: int, height: int) -> tuple[int, int, int]:
    """One image's latent shape as the txt2img pipelines' prepare_latents make it."""
    return (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
