"""Control modes on hand-made residuals: the A1111 extension's soft injection factors and its
CFG injection (control on the conditional half of the batch only)."""
import pytest
import torch

from pipelines.control.apply import _apply_mode
from pipelines.control.units import CONTROL_MODES

BALANCED, PROMPT, CONTROL = CONTROL_MODES


def residuals(count: int, batch: int = 2):
    """`count` down residuals and a mid one, each a distinct random tensor (batch: [uncond, cond])."""
    g = torch.Generator().manual_seed(count)
    down = [torch.randn(batch, 3, 2, 2, generator=g) + 1 for _ in range(count)]
    return down, torch.randn(batch, 3, 1, 1, generator=g) + 1


def test_balanced_leaves_the_residuals_alone():
    down, mid = residuals(12)
    got_down, got_mid = _apply_mode(list(down), mid, BALANCED, cfg_batches=True)
    assert all(torch.equal(a, b) for a, b in zip(got_down, down)) and torch.equal(got_mid, mid)


def test_prompt_more_important_scales_sd1_residuals_by_0825_to_the_12_minus_i():
    down, mid = residuals(12)
    got_down, got_mid = _apply_mode(list(down), mid, PROMPT, cfg_batches=True)
    for i, (got, original) in enumerate(zip(got_down, down)):
        torch.testing.assert_close(got, original * 0.825 ** (12 - i))
    torch.testing.assert_close(got_mid, mid)  # i = 12: the middle block keeps the full weight
    assert got_down[0].abs().max() < 0.1 * down[0].abs().max()  # 0.825**12 = 0.099


def test_sdxl_takes_the_first_ten_factors_as_the_extension_does():
    down, mid = residuals(9)
    got_down, got_mid = _apply_mode(list(down), mid, PROMPT, cfg_batches=False)
    for i, (got, original) in enumerate(zip(got_down, down)):
        torch.testing.assert_close(got, original * 0.825 ** (12 - i))
    torch.testing.assert_close(got_mid, mid * 0.825 ** 3)


def test_t2i_adapter_features_take_the_extension_table():
    features, _ = residuals(4)
    got, _ = _apply_mode(list(features), features[-1], PROMPT, cfg_batches=False, adapter=True)
    for factor, a, b in zip((0.25, 0.62, 0.825, 1.0), got, features):
        torch.testing.assert_close(a, b * factor)


@pytest.mark.parametrize("count", [12, 9])
def test_controlnet_more_important_zeroes_the_unconditional_half(count):
    down, mid = residuals(count, batch=4)  # batch 2 x CFG: rows 0-1 unconditional, 2-3 conditional
    soft_down, soft_mid = _apply_mode(list(down), mid, PROMPT, cfg_batches=True)
    got_down, got_mid = _apply_mode(list(down), mid, CONTROL, cfg_batches=True)
    for got, soft in zip(got_down + [got_mid], soft_down + [soft_mid]):
        assert torch.count_nonzero(got[:2]) == 0
        torch.testing.assert_close(got[2:], soft[2:])  # the conditional half: soft injection only
    # without CFG there is no unconditional half to zero
    no_cfg_down, no_cfg_mid = _apply_mode(list(down), mid, CONTROL, cfg_batches=False)
    assert all(torch.equal(a, b) for a, b in zip(no_cfg_down + [no_cfg_mid], soft_down + [soft_mid]))
