"""Checkpoint merger: model + model, model + LoRA, LoRA + LoRA.

Checkpoints are merged in the single-file (A1111 / LDM) key layout, one tensor at a time, read
from memory-mapped files (`pipelines.merge_sources`: safetensors, weights-only .ckpt, SD1-family
diffusers folders converted with ldm_convert) and streamed to the output file, so a
merge needs about one tensor of RAM beyond what the OS maps. The output is a single-file
.safetensors in the same layout with ModelSpec and an A1111-style merge recipe in its metadata.

LoRAs use kohya key names (`lora_unet_<module>` / `lora_te_<module>` with `.lora_down.weight`,
`.lora_up.weight`, `.alpha`), the names diffusers' `load_lora_weights` accepts; both the
diffusers-module and LDM-module spellings of the UNet modules are understood. A LoRA at weight
w adds `w * alpha / rank * up @ down` to its module's weight, exactly what applying it does.
"""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from pipelines import configs, probe
from pipelines.arch import Arch
from pipelines.ldm_convert import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, unet_to_ldm, vae_to_ldm
from pipelines.merge_sources import ModelTensors, open_model
from pipelines.safetensors_stream import TensorPlan, write_streaming

WEIGHTED_SUM = "weighted sum"
ADD_DIFFERENCE = "add difference"
MERGE_METHODS = (WEIGHTED_SUM, ADD_DIFFERENCE)
LORA_MERGE_MODES = ("concat", "svd")
_SKIPPED_PREFIXES = ("model_ema.",)  # EMA copies: A1111 drops them from merges too
_NAME = re.compile(r"^[\w][\w .()+,=@\[\]-]{0,150}$")
# LDM text-encoder prefixes whose modules are spelled as transformers' CLIPTextModel.
_TEXT_ENCODER_PREFIXES = {CLIP_PREFIX: "lora_te_", "conditioner.embedders.0.transformer.": "lora_te1_"}
_MODELSPEC_ARCHITECTURE = {
    Arch.SD1: "stable-diffusion-v1", Arch.SD1_INPAINT: "stable-diffusion-v1/inpainting",
    Arch.SD2: "stable-diffusion-v2-512", Arch.SD2_V: "stable-diffusion-v2-768-v",
    Arch.SDXL: "stable-diffusion-xl-v1-base", Arch.SDXL_REFINER: "stable-diffusion-xl-v1-refiner",
    Arch.TINYWORLD: "easel/tiny-world-v1",
}

Progress = Callable[[float, str], None]


def _no_progress(_fraction: float, _text: str) -> None:
    pass


# --- output names ---------------------------------------------------------------------------

def output_path(folder: Path, name: str, *, overwrite: bool = False) -> Path:
    """`folder/<name>.safetensors` for a plain file name typed by the user. Path separators,
    `..`, hidden names and other suffixes are refused, so nothing lands outside `folder`."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or not _NAME.match(name) or ".." in name or name.startswith("."):
        raise ValueError("output name must be a plain file name (letters, digits, spaces, - _ . ( ) +), "
                         f"without folders; got {name!r}")
    folder = Path(folder).resolve()
    path = (folder / f"{name}.safetensors").resolve()
    if path.parent != folder:
        raise ValueError(f"output name {name!r} would leave {folder}; choose a plain file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{path.name} already exists: choose another name or tick 'overwrite'")
    return path


# --- model + model (+ VAE, + LoRAs) -----------------------------------------------------------

@dataclass(frozen=True)
class LoraWeight:
    path: Path
    weight: float


def merge_checkpoints(output: Path, primary: Path, secondary: Path | None = None, tertiary: Path | None = None,
                      *, method: str = WEIGHTED_SUM, multiplier: float = 0.5, bake_vae: Path | None = None,
                      loras: Sequence[LoraWeight] = (), half: bool = False,
                      progress: Progress = _no_progress) -> Path:
    """Merge checkpoints A (primary), B, C into `output` and return it.

    weighted sum: A*(1-M) + B*M; add difference: A + (B-C)*M; no B: A alone (with LoRAs / VAE).
    The VAE is A's (its tensors are not merged) unless `bake_vae` names a VAE file. LoRAs are
    added last, each at its weight. `half` stores float tensors as fp16, else fp32.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if not -10.0 <= multiplier <= 10.0:
        raise ValueError(f"multiplier must be between -10 and 10, got {multiplier}")
    if method == ADD_DIFFERENCE and (secondary is None or tertiary is None):
        raise ValueError("add difference needs models A, B and C")
    a = open_model(primary, "model A")
    arch = probe.probe_checkpoint(a.header)
    if arch is Arch.UNKNOWN:
        raise ValueError(f"model A ({a.path.name}) is not a checkpoint this merger knows (SD1/SD2/SDXL/tiny-world)")
    others = {role: open_model(p, role) for role, p in (("model B", secondary), ("model C", tertiary)) if p is not None}
    for role, other in others.items():
        other_arch = probe.probe_checkpoint(other.header)
        if other_arch is not arch:
            raise ValueError(f"{role} ({other.path.name}) is {other_arch.value}, model A is {arch.value}: "
                             "merge models of one family")
    b, c = others.get("model B"), others.get("model C")
    vae = _baked_vae(bake_vae, a) if bake_vae is not None else None
    deltas = lora_deltas(a, arch, loras) if loras else {}

    out_dtype = torch.float16 if half else torch.float32
    keys = [k for k in a.keys() if not k.startswith(_SKIPPED_PREFIXES)]
    plans = [TensorPlan(k, out_dtype if a.header.tensors[k].dtype.startswith(("F", "BF")) else _dtype(a, k),
                        vae[k].shape if vae is not None and k in vae else a.shape(k)) for k in keys]

    def produce(plan: TensorPlan) -> torch.Tensor:
        key = plan.name
        if vae is not None and key.startswith(VAE_PREFIX):
            tensor = vae[key]
        else:
            tensor = a.get(key)
            if b is not None and not key.startswith(VAE_PREFIX) and tensor.is_floating_point():
                tensor = _combine(key, tensor, b, c, method, multiplier)
            if key in deltas:
                tensor = tensor.float() + deltas[key]()
        return tensor.to(plan.dtype) if tensor.is_floating_point() else tensor

    metadata = _checkpoint_metadata(a, arch, output, recipe={
        "type": "easel-merge", "method": method if b is not None else "lora-only",
        "multiplier": multiplier, "primary": _model_info(a), "secondary": _model_info(b),
        "tertiary": _model_info(c) if method == ADD_DIFFERENCE else None,
        "vae": Path(bake_vae).name if bake_vae is not None else "A",
        "loras": [{"name": Path(l.path).name, "weight": l.weight} for l in loras],
        "dtype": "fp16" if half else "fp32"})
    progress(0.0, "merging")
    return write_streaming(Path(output), plans, produce, metadata,
                           progress=lambda done, total: progress(done / total, f"{done}/{total} tensors"))


def _dtype(tensors: ModelTensors, key: str) -> torch.dtype:
    names = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return names.get(tensors.header.tensors[key].dtype, torch.int64)


def _combine(key: str, tensor: torch.Tensor, b: ModelTensors, c: ModelTensors | None, method: str,
             multiplier: float) -> torch.Tensor:
    if key not in b or b.shape(key) != tuple(tensor.shape):
        return tensor  # a key only A has (or of another shape): A's value, as A1111 does
    theta_b = b.get(key).float()
    if method == WEIGHTED_SUM:
        # A*(1-M) + B*M gives A and B exactly at M=0 and M=1 (0*x + 1*y == y in floats).
        return tensor.float() * (1 - multiplier) + theta_b * multiplier
    if key not in c or c.shape(key) != tuple(tensor.shape):
        return tensor
    return tensor.float() + (theta_b - c.get(key).float()) * multiplier


def _baked_vae(path: Path, a: ModelTensors) -> dict[str, torch.Tensor]:
    """The VAE file's tensors under A's `first_stage_model.` keys (LDM or diffusers layout)."""
    vae = open_model(path, "VAE")
    state = {k: vae.get(k) for k in vae.keys()}
    if any(k.startswith("encoder.down_blocks.") or k.startswith("decoder.up_blocks.") for k in state):
        state = vae_to_ldm(state)
    state = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in state.items()}
    wanted = [k for k in a.keys() if k.startswith(VAE_PREFIX)]
    baked = {}
    for key in wanted:
        short = key[len(VAE_PREFIX):]
        if short not in state or tuple(state[short].shape) != a.shape(key):
            raise ValueError(f"VAE {Path(path).name} does not fit model A (missing or different {short}); "
                             "choose a VAE of the same family")
        baked[key] = state[short]
    return baked


def _model_info(tensors: ModelTensors | None) -> dict | None:
    if tensors is None:
        return None
    return {"name": tensors.path.name, "title": tensors.header.metadata.get("modelspec.title", tensors.path.stem)}


def _checkpoint_metadata(a: ModelTensors, arch: Arch, output: Path, recipe: dict) -> dict[str, str]:
    metadata = {k: v for k, v in a.header.metadata.items() if k.startswith("modelspec.")}
    metadata.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": a.header.metadata.get("modelspec.architecture",
                                                        _MODELSPEC_ARCHITECTURE.get(arch, "")),
        "modelspec.implementation": metadata.get("modelspec.implementation",
                                                 "https://github.com/Stability-AI/generative-models"),
        "modelspec.title": Path(output).stem,
        "modelspec.date": datetime.date.today().isoformat(),
        "format": "pt",
        "sd_merge_recipe": json.dumps(recipe),
    })
    metadata.pop("modelspec.hash_sha256", None)  # the merge is a new model
    return metadata


# --- LoRA key names -------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """alpha/rank * up @ down, shaped like the weight it patches."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        if shape is None:
            shape = (up.shape[0], *down.shape[1:]) if down.ndim == 4 else tuple(product.shape)
        return (product * (self.alpha / self.rank)).reshape(shape)


def read_lora(path: Path) -> dict[str, LoraModule]:
    """Kohya LoRA modules by name (`lora_unet_...`); other LoRA kinds are refused by name."""
    tensors = open_model(path, "LoRA")
    modules: dict[str, LoraModule] = {}
    names = {k.split(".", 1)[0] for k in tensors.keys()}
    for name in sorted(names):
        down_key, up_key = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
        if down_key not in tensors or up_key not in tensors:
            raise ValueError(f"{Path(path).name}: {name} is not a kohya LoRA module (lora_down/lora_up); "
                             "LyCORIS (LoHa/LoKr) and diffusers-format LoRAs are not supported by the merger")
        down, up = tensors.get(down_key), tensors.get(up_key)
        alpha_key = f"{name}.alpha"
        alpha = float(tensors.get(alpha_key).item()) if alpha_key in tensors else float(down.shape[0])
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
    if not modules:
        raise ValueError(f"{Path(path).name} holds no LoRA modules")
    return modules


def kohya_names(checkpoint_keys: Sequence[str], arch: Arch) -> dict[str, str]:
    """kohya module name -> the checkpoint key of its weight, for the UNet (diffusers and LDM
    spellings) and the CLIP-L text encoder(s) stored in transformers layout."""
    table: dict[str, str] = {}
    for ldm_key, diffusers_key in _unet_key_pairs(arch):
        if ldm_key.endswith(".weight"):
            table["lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")] = UNET_PREFIX + ldm_key
            table["lora_unet_" + ldm_key[: -len(".weight")].replace(".", "_")] = UNET_PREFIX + ldm_key
    for key in checkpoint_keys:
        for prefix, kohya_prefix in _TEXT_ENCODER_PREFIXES.items():
            if key.startswith(prefix) and key.endswith(".weight"):
                module = key[len(prefix): -len(".weight")]
                table[kohya_prefix + module.replace(".", "_")] = key
                if module.startswith("text_model."):  # some trainers drop the text_model part
                    table[kohya_prefix + module[len("text_model."):].replace(".", "_")] = key
    return table


def _unet_key_pairs(arch: Arch) -> Iterator[tuple[str, str]]:
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(configs.config_dir(arch) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    converted = unet_to_ldm(state, unet.config)  # one to one, in order
    return zip(converted.keys(), state.keys())


def lora_deltas(a: ModelTensors, arch: Arch, loras: Sequence[LoraWeight]) -> dict[str, Callable[[], torch.Tensor]]:
    """Checkpoint key -> a function computing the summed LoRA change for that weight (lazy, so
    only one module's delta is in memory at a time)."""
    table = kohya_names(a.keys(), arch)
    pending: dict[str, list[tuple[LoraModule, float]]] = {}
    for lora in loras:
        modules = read_lora(Path(lora.path))
        unknown = sorted(name for name in modules if name not in table)
        if unknown:
            raise ValueError(f"{Path(lora.path).name} does not fit model A: {len(unknown)} module(s) have no "
                             f"matching weight (first: {unknown[0]}); is it for another model family?")
        for name, module in modules.items():
            pending.setdefault(table[name], []).append((module, float(lora.weight)))

    def make(key: str, parts: list[tuple[LoraModule, float]]):
        return lambda: sum(weight * module.delta(a.shape(key)) for module, weight in parts)

    return {key: make(key, parts) for key, parts in pending.items()}


# --- LoRA + LoRA ----------------------------------------------------------------------------

def merge_loras(output: Path, loras: Sequence[LoraWeight], *, mode: str = "concat", rank: int | None = None,
                half: bool = False, progress: Progress = _no_progress) -> Path:
    """One LoRA equal to applying `loras` together at their weights (alpha = rank, so the
    weights are folded into `lora_up`). concat: exact, rank = the sum of ranks per module;
    svd: the best rank-`rank` approximation of each module's summed change."""
    from safetensors.torch import save_file

    if mode not in LORA_MERGE_MODES:
        raise ValueError(f"LoRA merge mode must be one of {', '.join(LORA_MERGE_MODES)}, got {mode!r}")
    if len(loras) < 2:
        raise ValueError("choose at least two LoRAs to merge")
    if mode == "svd" and (rank is None or not 1 <= int(rank) <= 1024):
        raise ValueError(f"SVD needs a rank between 1 and 1024, got {rank}")
    files = [read_lora(Path(l.path)) for l in loras]
    names = sorted(set().union(*files))
    dtype = torch.float16 if half else torch.float32
    state: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        parts = [(modules[name], float(l.weight)) for modules, l in zip(files, loras) if name in modules]
        shapes = {(p.down.shape[1:], p.up.shape[0]) for p, _ in parts}
        if len(shapes) > 1:
            raise ValueError(f"{name} has different shapes in the chosen LoRAs: they are for different models")
        down, up = _concat(parts) if mode == "concat" else _svd(parts, int(rank))
        state[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
        progress((index + 1) / len(names), f"{index + 1}/{len(names)} modules")
    ranks = sorted({int(t.shape[0]) for k, t in state.items() if k.endswith("lora_down.weight")})
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
                "ss_network_alpha": str(ranks[-1]),
                "sd_merge_recipe": json.dumps({"type": "easel-lora-merge", "mode": mode, "rank": rank,
                                               "loras": [{"name": Path(l.path).name, "weight": l.weight}
                                                         for l in loras]})}
    temporary = Path(output).with_name(f".{Path(output).name}.partial")
    try:
        save_file(state, str(temporary), metadata=metadata)
        temporary.replace(output)
    finally:
        temporary.unlink(missing_ok=True)
    return Path(output)


def _concat(parts: list[tuple[LoraModule, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    downs = [p.down.float() for p, _ in parts]
    ups = [p.up.float() * (w * p.alpha / p.rank) for p, w in parts]
    return torch.cat(downs, dim=0), torch.cat(ups, dim=1)


def _svd(parts: list[tuple[LoraModule, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    first = parts[0][0]
    delta = sum(w * p.delta().flatten(1) for p, w in parts)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    down = down.reshape(rank, *first.down.shape[1:])
    if first.up.ndim == 4:
        up = up.reshape(up.shape[0], rank, 1, 1)
    return down, up
