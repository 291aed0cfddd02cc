"""A1111 hypernetworks (`models/hypernetworks/*.pt`), applied for one request as attention
processors that transform the key and value inputs: `k_in = c + strength * mlp_k(c)`,
`v_in = c + strength * mlp_v(c)`, with the small MLPs chosen by the context width (A1111 keys
them by width: 768 for SD1 cross-attention, 320/640/1280 for self-attention where present).

The UNet's processors are swapped for the block and the originals put back afterwards (patch
with backup); nothing in the model's weights changes.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.SiLU,
                "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "mish": nn.Mish,
                "softsign": nn.Softsign, "selu": nn.SELU, "celu": nn.CELU, "softplus": nn.Softplus}


class HypernetworkModule(nn.Module):
    """One MLP, built the way A1111 lays it out so its `linear.N.*` keys load unchanged."""

    def __init__(self, width: int, structure: list[float], activation: str | None, layer_norm: bool,
                 activate_output: bool, dropout: list[float] | None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(structure) - 1):
            layers.append(nn.Linear(int(width * structure[i]), int(width * structure[i + 1])))
            is_last = i >= len(structure) - 2
            if activation not in (None, "linear") and not (is_last and not activate_output):
                if activation not in _ACTIVATIONS:
                    raise ValueError(f"hypernetwork activation '{activation}' is not supported")
                layers.append(_ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(nn.LayerNorm(int(width * structure[i + 1])))
            if dropout and dropout[i + 1] > 0:
                layers.append(nn.Dropout(dropout[i + 1]))  # inactive in eval mode; keeps indices
        self.linear = nn.Sequential(*layers)

    def forward(self, context: torch.Tensor, strength: float) -> torch.Tensor:
        return context + self.linear(context) * strength


@dataclass
class Hypernetwork:
    name: str
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]  # width -> (k, v)


def load_hypernetwork(path: Path, name: str | None = None) -> Hypernetwork:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"hypernetwork {path.name} needs full unpickling (unsafe); refused") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not an A1111 hypernetwork")
    structure = data.get("layer_structure") or [1, 2, 1]
    dropout = data.get("dropout_structure")
    if dropout is None and data.get("use_dropout"):
        dropout = [0.0] + [0.3] * (len(structure) - 3) + [0.0, 0.0] if len(structure) > 2 else None
    layers = {}
    for width, pair in data.items():
        if not isinstance(width, int):
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"hypernetwork {path.name}: width {width} does not hold a key/value pair")
        modules = []
        for state in pair:
            module = HypernetworkModule(width, structure, data.get("activation_func"),
                                        bool(data.get("is_layer_norm")), bool(data.get("activate_output")),
                                        dropout if data.get("use_dropout") else None)
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"hypernetwork {path.name}: layout not understood ({str(exc).splitlines()[0]})") from exc
            modules.append(module.eval().requires_grad_(False))
        layers[width] = (modules[0], modules[1])
    if not layers:
        raise ValueError(f"{path.name} holds no hypernetwork layers")
    return Hypernetwork(name=name or path.stem, layers=layers)


class HypernetworkAttnProcessor:
    """Scaled-dot-product attention (diffusers' AttnProcessor2_0 steps) whose key and value
    inputs first pass through the hypernetworks matching the context width."""

    def __init__(self, applied: list[tuple[Hypernetwork, float]]) -> None:
        self.applied = applied

    def _contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context_k = context_v = context
        for network, strength in self.applied:
            pair = network.layers.get(context.shape[-1])
            if pair is not None:
                k, v = pair
                context_k = k.to(context.device, context.dtype)(context_k, strength)
                context_v = v.to(context.device, context.dtype)(context_v, strength)
        return context_k, context_v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context_k, context_v = self._contexts(encoder_hidden_states)
        key, value = attn.to_k(context_k), attn.to_v(context_v)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def scoped_hypernetworks(unet, applied: list[tuple[Hypernetwork, float]]) -> Iterator[None]:
    """Hypernetworks on every attention of `unet` for the block; the original processors after."""
    applied = [(network, strength) for network, strength in applied if strength != 0]
    if not applied:
        yield
        return
    original = unet.attn_processors
    unet.set_attn_processor(HypernetworkAttnProcessor(applied))
    try:
        yield
    finally:
        unet.set_attn_processor(original)
