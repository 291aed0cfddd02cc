"""Composable diffusion (A1111 `a AND b :0.5`) on a diffusers pipeline.

The pipeline computes `uncond + g * (cond - uncond)`. Wrapping its UNet for one request, the
"cond" half it asks for is evaluated once per AND part and replaced by
`uncond + sum_k w_k * (cond_k - uncond)`, so the pipeline's own guidance step yields A1111's
`uncond + g * sum_k w_k * (cond_k - uncond)`. All parts and the uncond run as one UNet batch.
The wrapper sits only on the request's own pipeline object and is removed after the pass.
"""
from __future__ import annotations

import torch
from torch import nn


class ComposableUNet(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.part_embeds: torch.Tensor | None = None  # [B, K, L, D]
        self.part_pooled: torch.Tensor | None = None  # [B, K, P] (SDXL)
        self.part_weights: torch.Tensor | None = None  # [B, K]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def set_parts(self, embeds: torch.Tensor, pooled: torch.Tensor | None, weights: torch.Tensor) -> None:
        self.part_embeds, self.part_pooled, self.part_weights = embeds, pooled, weights

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, added_cond_kwargs=None,
                return_dict: bool = True, **kwargs):
        batch, parts = self.part_weights.shape
        cfg = sample.shape[0] == 2 * batch
        cond_sample = sample[batch:] if cfg else sample
        rows = ([sample[:batch]] if cfg else []) + [cond_sample] * parts
        hidden = ([encoder_hidden_states[:batch]] if cfg else []) + [
            self.part_embeds[:, k].to(encoder_hidden_states) for k in range(parts)]
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == sample.shape[0]:
            timestep = torch.cat(([timestep[:batch]] if cfg else []) + [timestep[-batch:]] * parts)
        if added_cond_kwargs is not None:
            added_cond_kwargs = dict(added_cond_kwargs)
            text, times = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            added_cond_kwargs["text_embeds"] = torch.cat(([text[:batch]] if cfg else []) + [
                self.part_pooled[:, k].to(text) for k in range(parts)])
            added_cond_kwargs["time_ids"] = torch.cat(([times[:batch]] if cfg else []) + [times[-batch:]] * parts)
        out = self.inner(torch.cat(rows), timestep, torch.cat(hidden), *args, added_cond_kwargs=added_cond_kwargs,
                         return_dict=False, **kwargs)[0]
        weights = self.part_weights.to(out)
        shape = (batch,) + (1,) * (out.ndim - 1)
        if cfg:
            uncond = out[:batch]
            conds = out[batch:].reshape(parts, batch, *out.shape[1:])
            combined = uncond + sum(weights[:, k].reshape(shape) * (conds[k] - uncond) for k in range(parts))
            result = torch.cat([uncond, combined])
        else:  # no guidance: a weighted mix of the parts
            conds = out.reshape(parts, batch, *out.shape[1:])
            result = sum(weights[:, k].reshape(shape) * conds[k] for k in range(parts))
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput(sample=result)
        return (result,)


def install(pipe) -> ComposableUNet:
    """Wrap `pipe.unet` (object attribute only: the pipeline config and the shared UNet stay as they are)."""
    unet = pipe.unet.inner if isinstance(pipe.unet, ComposableUNet) else pipe.unet
    wrapper = ComposableUNet(unet)
    object.__setattr__(pipe, "unet", wrapper)
    return wrapper


def uninstall(pipe) -> None:
    if isinstance(pipe.unet, ComposableUNet):
        object.__setattr__(pipe, "unet", pipe.unet.inner)
