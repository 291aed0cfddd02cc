"""The trainer's diffusion objective and the bundled tiny-world configs agree: what the model was
trained with (v-prediction, linear betas, 4-group norms, 4-head text encoder) is what Easel
loads it with. A drift here silently ruins every tiny-world picture."""
import json

import pytest
import torch

from tools.tinyworld.objective import CONFIG_DIR, MIN_SNR_GAMMA, DiffusionLoss, make_scheduler


def _config(part: str, name: str = "config.json") -> dict:
    return json.loads((CONFIG_DIR / part / name).read_text())


def test_bundled_schedule_is_what_the_trainer_uses():
    bundled = _config("scheduler", "scheduler_config.json")
    assert bundled["prediction_type"] == "v_prediction"
    assert (bundled["beta_schedule"], bundled["beta_start"], bundled["beta_end"]) == ("linear", 0.0001, 0.02)
    assert bundled["clip_sample"] is False  # the latents span about [-3.5, 3]
    for kind in ("ddpm", "ddim"):
        scheduler = make_scheduler(kind)
        assert scheduler.config.prediction_type == "v_prediction" and not scheduler.config.clip_sample
    # the noisiest step keeps less than 1% of the clean latent (SD's schedule keeps 6.8%)
    assert make_scheduler().alphas_cumprod[-1].sqrt() < 0.01


def test_bundled_architecture_matches_the_training_fixes():
    assert _config("unet")["norm_num_groups"] == 4
    assert _config("text_encoder")["num_attention_heads"] == 4
    controlnet = json.loads((CONFIG_DIR.parent / "controlnet" / "tinyworld" / "config.json").read_text())
    assert controlnet["norm_num_groups"] == 4  # ControlNetModel.from_unet copies the UNet's


def test_loss_targets_v_with_min_snr_weighting():
    loss = DiffusionLoss()
    z, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    t = torch.tensor([10, 500, 990])
    alpha = loss.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - loss.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(loss.target(z, noise, t), alpha * noise - sigma * z, atol=1e-6)
    snr = loss.scheduler.alphas_cumprod / (1 - loss.scheduler.alphas_cumprod)
    assert torch.allclose(loss.weight, torch.clamp(snr, max=MIN_SNR_GAMMA) / (snr + 1))
    perfect = loss.target(z, noise, t)
    assert loss.score(perfect, z, noise, t).item() == pytest.approx(0.0, abs=1e-12)
    assert loss.score(perfect + 1.0, z, noise, t).item() == pytest.approx(loss.weight[t].mean().item(), rel=1e-5)
