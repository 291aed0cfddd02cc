"""The VAE decode guard and the live previews."""
from types import SimpleNamespace

import numpy as np
import torch

from pipelines.generate import decode_latents, tensor_to_images
from pipelines.preview import latent_preview, linear_preview


class HalfOverflowVAE(torch.nn.Module):
    """Decodes to NaN in half precision, like the SD VAE on some inputs, and fine in fp32."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.config = SimpleNamespace(scaling_factor=0.5)
        self.fp32_decodes = 0

    @property
    def dtype(self):
        return self.w.dtype

    def decode(self, latents, return_dict=False):
        image = latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * 0.1
        if self.w.dtype == torch.float16:
            image = image * float("nan")
        else:
            self.fp32_decodes += 1
        return (image.to(self.w.dtype),)


def test_nan_in_half_precision_is_decoded_again_in_fp32():
    vae = HalfOverflowVAE().half()
    latents = torch.full((1, 4, 2, 2), 2.0)
    image = decode_latents(vae, latents)[0]
    assert vae.fp32_decodes == 1 and vae.w.dtype == torch.float16  # restored afterwards
    assert image.size == (16, 16)
    # 2.0 / 0.5 * 0.1 = 0.4 -> (0.4 + 1) * 127.5 = 178.5 -> 178 or 179, never black
    assert np.asarray(image).min() >= 178


def test_tensor_to_images_maps_minus_one_to_one_onto_0_255():
    x = torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0)])
    a, b = tensor_to_images(x)
    assert np.asarray(a).max() == 0 and np.asarray(b).min() == 255


def test_previews_have_the_latent_size_or_decode_small_latents():
    big = torch.randn(4, 40, 48)
    assert linear_preview(big).size == (48, 40)
    vae = HalfOverflowVAE()
    small = torch.randn(4, 4, 4)
    assert latent_preview(vae, small).size == (32, 32)  # decoded for real: 8x the latent
    assert latent_preview(vae, big).size == (48, 40)


def test_a_full_size_vae_previews_even_small_latents_linearly():
    from diffusers import AutoencoderKL

    with torch.device("meta"):  # SD's VAE architecture (84M parameters), no memory needed
        full = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    latent = torch.randn(4, 32, 32)
    # the linear map's output: latent-sized, equal to linear_preview (a real decode would be 256 px)
    assert np.array_equal(np.asarray(latent_preview(full, latent)), np.asarray(linear_preview(latent)))
    assert latent_preview(HalfOverflowVAE(), latent).size == (256, 256)  # a small VAE still decodes
