"""LyCORIS LoHa and LoKr files rewritten as plain kohya LoRA factors, exactly, so diffusers'
`load_lora_weights` loads them like any LoRA (kept resident, weights per request, fuse, weight 0
switches them off) instead of a second mechanism next to the LoRA stack.

The weight update of one layer (A1111 / LyCORIS, scale = alpha / dim, 1 without alpha):
- LoHa: dW = (w1a @ w1b) * (w2a @ w2b) * scale, an elementwise product of two rank-r products.
  Row-wise Khatri-Rao: up[o, (i, j)] = w1a[o, i] * w2a[o, j], down[(i, j), c] = w1b[i, c] * w2b[j, c]
  gives up @ down = dW with rank r1 * r2.
- LoKr: dW = kron(w1, w2) * scale with w1 (a x b) and w2 (c x d, or c x r times r x d) full or
  factored. kron(w1, w2a @ w2b) = kron(w1, w2a) @ kron(I_b, w2b), rank b * r.
When that rank is above the layer's width, the pair (I, dW) or (dW, I) is used instead (same
product, smaller). Convolutions keep their kernel in `down` (LyCORIS stores it flattened: the layer's
shape says how to unflatten it), `up` is 1x1, as in LoCon files.

Not converted (refused by `lora_files.check_supported_format`): CP/Tucker factors (`hada_t1`,
`lokr_t2`), full-diff and norm modules.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ShapeOf = Callable[[str], "tuple[int, ...] | None"]


def is_lycoris(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(_split(key)[1] in LOHA_KEYS + LOKR_KEYS for key in state_dict)


def lycoris_modules(state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of the LoHa / LoKr modules in a file."""
    return {_split(key)[0] for key in state_dict if _split(key)[1] in LOHA_KEYS + LOKR_KEYS}


def to_lora(state_dict: Mapping[str, torch.Tensor], shape_of: ShapeOf) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(kohya LoRA state dict, LyCORIS modules left out because no layer of the model has their
    name). Keys of plain LoRA modules in the same file pass through unchanged."""
    lycoris = lycoris_modules(state_dict)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, suffix = _split(key)
        if module in lycoris:
            groups.setdefault(module, {})[suffix] = tensor
        else:
            out[key] = tensor
    missing = []
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    for module, tensors in groups.items():
        shape = shape_of(module)
        if shape is None:
            missing.append(module)
            continue
        if len(shape) not in (2, 4):
            raise ValueError(f"LyCORIS module {module}: a layer of shape {tuple(shape)} cannot take a LoRA")
        unknown = sorted(set(tensors) - set(LOHA_KEYS + LOKR_KEYS + ("alpha",)))
        if unknown:
            raise ValueError(f"LyCORIS module {module}: {', '.join(unknown)} is not supported")
        up, down = (_loha if "hada_w1_a" in tensors else _lokr)(tensors, module)
        if up.shape[0] != shape[0] or down.shape[1] != math.prod(shape[1:]):
            raise ValueError(f"LyCORIS module {module}: its factors make a {up.shape[0]}x{down.shape[1]} "
                             f"update, the layer is {tuple(shape)}")
        factors[module] = (*_smallest_pair(up, down, shape), shape)
    # One rank for every converted module: diffusers turns per-module alphas into PEFT
    # `alpha_pattern` keys in the old `processor.to_k_lora` spelling, which PEFT ignores, so a
    # module whose rank differs from the first gets the wrong scale. Zero columns/rows keep the
    # product exact.
    rank = max((up.shape[1] for up, _, _ in factors.values()), default=0)
    for module, (up, down, shape) in factors.items():
        pad = rank - up.shape[1]
        up = torch.cat([up, up.new_zeros(up.shape[0], pad)], 1)
        down = torch.cat([down, down.new_zeros(pad, down.shape[1])], 0)
        if len(shape) == 4:
            up = up.reshape(shape[0], rank, 1, 1)
            down = down.reshape(rank, *shape[1:])
        out[f"{module}.lora_up.weight"] = up.contiguous()
        out[f"{module}.lora_down.weight"] = down.contiguous()
        out[f"{module}.alpha"] = torch.tensor(float(rank))  # scale 1: LyCORIS' own scale is in `up`
    return out, missing


def layer_shapes(pipe, modules: set[str]) -> ShapeOf:
    """Weight shape of the layer each kohya module name designates in `pipe`, None for a name
    no layer has. The names are resolved by diffusers' own kohya conversion (the one
    `load_lora_weights` applies, SDXL's `input_blocks_*` spelling included): a stand-in LoRA
    whose down matrix of module i has i + 1 columns goes through it, and the columns say which
    module each converted key is."""
    names = sorted(modules)
    probe = {}
    for i, name in enumerate(names):
        probe[f"{name}.lora_down.weight"] = torch.zeros(1, i + 1)
        probe[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    unet = getattr(pipe, "unet", None)
    try:
        converted = type(pipe).lora_state_dict(probe, unet_config=unet.config if unet is not None else None)[0]
        by_component: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in converted.items():
            component, _, rest = key.partition(".")
            by_component.setdefault(component, {})[rest] = tensor
        table: dict[str, tuple[int, ...]] = {}
        for component, part in by_component.items():  # to PEFT names, as the loaders do next
            if component == "unet":
                part = convert_unet_state_dict_to_peft(part)
            else:  # `to_q_lora` keys say "old diffusers" even without the `to_out_lora` diffusers looks for
                old = StateDictType.DIFFUSERS_OLD if any("_lora." in k for k in part) else None
                part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part, original_type=old))
            for key, tensor in part.items():
                if key.endswith(".lora_A.weight"):
                    weight = getattr(_layer(getattr(pipe, component, None), key.removesuffix(".lora_A.weight")),
                                     "weight", None)
                    if isinstance(weight, torch.Tensor):
                        table[names[tensor.shape[1] - 1]] = tuple(weight.shape)
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"its layer names cannot be placed ({str(exc).splitlines()[0][:200]})") from exc
    return table.get


def _layer(model, path: str):
    if model is None:
        return None
    for candidate in (path, path.removeprefix("text_model.")):  # transformers 5 CLIP has no text_model.
        try:
            layer = model.get_submodule(candidate)
        except AttributeError:
            continue
        return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return None


# --- the two algorithms --------------------------------------------------------------------------

def _loha(t: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    _require(t, module, LOHA_KEYS)
    w1a, w1b, w2a, w2b = (t[k].float() for k in LOHA_KEYS)
    w1b, w2b = w1b.flatten(1), w2b.flatten(1)
    scale = _scale(t, w1b.shape[0])
    up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1) * scale  # (out, r1 * r2)
    down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)  # (r1 * r2, in)
    return up, down


def _lokr(t: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    if "lokr_w1" in t:
        w1 = t["lokr_w1"].float()
    else:
        _require(t, module, ("lokr_w1_a", "lokr_w1_b"))
        w1 = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float().flatten(1)
        w2a, w2b = torch.eye(w2.shape[0]), w2
    else:
        _require(t, module, ("lokr_w2_a", "lokr_w2_b"))
        w2a, w2b = t["lokr_w2_a"].float(), t["lokr_w2_b"].float().flatten(1)
    dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    scale = _scale(t, dim) if dim is not None else 1.0
    up = torch.kron(w1, w2a) * scale  # (a * c, b * r)
    down = torch.kron(torch.eye(w1.shape[1]), w2b)  # (b * r, b * d)
    return up, down


def _smallest_pair(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product up @ down with the smallest inner size: as given, (I, dW), or for linear
    and 1x1 layers (dW, I)."""
    rank, out_features, in_flat = up.shape[1], up.shape[0], down.shape[1]
    pointwise = len(shape) == 2 or all(k == 1 for k in shape[2:])
    if rank <= out_features and (not pointwise or rank <= in_flat):
        return up, down
    delta = up @ down
    if pointwise and in_flat < out_features:
        return delta, torch.eye(in_flat)
    return torch.eye(out_features), delta


# --- helpers ---------------------------------------------------------------------------------------

def _split(key: str) -> tuple[str, str]:
    module, _, suffix = key.partition(".")
    return module, suffix


def _require(t: dict[str, torch.Tensor], module: str, keys: tuple[str, ...]) -> None:
    absent = [k for k in keys if k not in t]
    if absent:
        raise ValueError(f"LyCORIS module {module} lacks {', '.join(absent)}")


def _scale(t: dict[str, torch.Tensor], dim: int) -> float:
    return float(t["alpha"]) / dim if "alpha" in t else 1.0
