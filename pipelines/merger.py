"""Checkpoint merger: model + model, model + LoRA, LoRA + LoRA.

Checkpoints are merged in the single-file (A1111 / LDM) key layout, one tensor at a time, read
from memory-mapped files (`pipelines.merge_sources`: safetensors, weights-only .ckpt, SD1-family
diffusers folders converted with ldm_convert) and streamed to the output file, so a
merge needs about one tensor of RAM beyond what the OS maps. The output is a single-file
.safetensors in the same layout with ModelSpec and an A1111-style merge recipe in its metadata.

LoRAs use kohya key names (`lora_unet_<module>` / `lora_te_<module>`, SDXL `lora_te1_` /
`lora_te2_`, with `.lora_down.weight`, `.lora_up.weight`, `.alpha`), the names diffusers'
`load_lora_weights` accepts; both the diffusers-module and LDM-module spellings of the UNet
modules are understood. OpenCLIP text encoders (SDXL's second, `conditioner.embedders.1.model.`;
SD2's) hold q/k/v fused in `attn.in_proj_weight`: a `q_proj`/`k_proj`/`v_proj` LoRA module
patches its third of those rows. A LoRA at weight w adds `w * alpha / rank * up @ down` to its
module's weight, exactly what applying it does.
"""
from __future__ import annotations

import datetime
import json
import math
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
# LDM prefixes of OpenCLIP text encoders (open_clip's own module names) -> kohya prefix
_OPENCLIP_PREFIXES = {"conditioner.embedders.1.model.": "lora_te2_", "cond_stage_model.model.": "lora_te_"}
# transformers CLIP layer module -> open_clip module (q/k/v: rows of attn.in_proj_weight)
_OPENCLIP_MODULES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight")
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
                      progress: Progress = _no_progress, unet_config: dict | None = None) -> Path:
    """Merge checkpoints A (primary), B, C into `output` and return it.

    weighted sum: A*(1-M) + B*M; add difference: A + (B-C)*M; no B: A alone (with LoRAs / VAE).
    The VAE is A's (its tensors are not merged) unless `bake_vae` names a VAE file. LoRAs are
    added last, each at its weight. `half` stores float tensors as fp16, else fp32.
    `unet_config`: A's diffusers UNet config, to read diffusers-spelled LoRA module names
    (default: the bundled config of A's architecture).
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
    deltas = lora_deltas(a, arch, loras, unet_config) if loras else {}

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


@dataclass(frozen=True)
class LoraTarget:
    """The checkpoint weight a kohya module patches; `rows`: only rows [start, stop) of it
    (one of q/k/v in an OpenCLIP `attn.in_proj_weight`)."""
    key: str
    rows: tuple[int, int] | None = None


def kohya_names(checkpoint: ModelTensors, arch: Arch, unet_config: dict | None = None) -> dict[str, LoraTarget]:
    """kohya module name -> the checkpoint weight it patches: the UNet (LDM spellings from the
    checkpoint's own keys, diffusers spellings through `unet_config` or the bundled config),
    CLIP-L text encoders in transformers layout, OpenCLIP text encoders in open_clip layout."""
    table: dict[str, LoraTarget] = {}
    for ldm_key, diffusers_key in _unet_key_pairs(arch, unet_config):
        if ldm_key.endswith(".weight"):
            table["lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")] = LoraTarget(UNET_PREFIX + ldm_key)
    for key in checkpoint.keys():
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            table["lora_unet_" + key[len(UNET_PREFIX): -len(".weight")].replace(".", "_")] = LoraTarget(key)
        for prefix, kohya_prefix in _TEXT_ENCODER_PREFIXES.items():
            if key.startswith(prefix) and key.endswith(".weight"):
                module = key[len(prefix): -len(".weight")]
                table[kohya_prefix + module.replace(".", "_")] = LoraTarget(key)
                if module.startswith("text_model."):  # some trainers drop the text_model part
                    table[kohya_prefix + module[len("text_model."):].replace(".", "_")] = LoraTarget(key)
        for prefix, kohya_prefix in _OPENCLIP_PREFIXES.items():
            match = _RESBLOCK.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
            if match is None:
                continue
            layer, width = int(match.group(1)), checkpoint.shape(key)[0] // 3
            block = f"{prefix}transformer.resblocks.{layer}."
            modules = {f"self_attn.{name}_proj": LoraTarget(key, (i * width, (i + 1) * width))
                       for i, name in enumerate("qkv")}
            modules |= {name: LoraTarget(f"{block}{open_clip}.weight") for name, open_clip in _OPENCLIP_MODULES.items()}
            for name, target in modules.items():
                if target.key in checkpoint:
                    module = f"encoder.layers.{layer}.{name}".replace(".", "_")
                    table[f"{kohya_prefix}text_model_{module}"] = target
                    table[f"{kohya_prefix}{module}"] = target  # without the text_model part
    return table


def _unet_key_pairs(arch: Arch, unet_config: dict | None = None) -> Iterator[tuple[str, str]]:
    from diffusers import UNet2DConditionModel

    config = unet_config or UNet2DConditionModel.load_config(configs.config_dir(arch) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    converted = unet_to_ldm(state, unet.config)  # one to one, in order
    return zip(converted.keys(), state.keys())


def lora_deltas(a: ModelTensors, arch: Arch, loras: Sequence[LoraWeight],
                unet_config: dict | None = None) -> dict[str, Callable[[], torch.Tensor]]:
    """Checkpoint key -> a function computing the summed LoRA change for that weight (lazy, so
    only one module's delta is in memory at a time). A module whose weight model A lacks, or
    whose shape does not fit it, refuses the merge."""
    table = kohya_names(a, arch, unet_config)
    pending: dict[str, list[tuple[LoraModule, float, tuple[int, int] | None]]] = {}
    for lora in loras:
        name_of_file = Path(lora.path).name
        modules = read_lora(Path(lora.path))
        unknown = sorted(name for name in modules if name not in table or table[name].key not in a)
        if unknown:
            raise ValueError(f"{name_of_file} does not fit model A: {len(unknown)} module(s) have no "
                             f"matching weight (first: {unknown[0]}); is it for another model family?")
        for name, module in modules.items():
            target = table[name]
            shape = a.shape(target.key)
            rows = (target.rows[1] - target.rows[0]) if target.rows else shape[0]
            if module.up.shape[0] != rows or math.prod(module.down.shape[1:]) != math.prod(shape[1:]):
                raise ValueError(f"{name_of_file}: {name} has the shape of another model's layer; "
                                 "is it for another model family?")
            pending.setdefault(target.key, []).append((module, float(lora.weight), target.rows))

    def make(key: str, parts: list[tuple[LoraModule, float, tuple[int, int] | None]]):
        def delta() -> torch.Tensor:
            shape = a.shape(key)
            total = torch.zeros(shape)
            for module, weight, rows in parts:
                if rows is None:
                    total += weight * module.delta(shape)
                else:
                    total[rows[0]:rows[1]] += weight * module.delta((rows[1] - rows[0], *shape[1:]))
            return total

        return delta

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
    metadata = {**_shared_base_model(loras), "ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
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


_BASE_MODEL_KEYS = ("ss_base_model_version", "modelspec.architecture")


def _shared_base_model(loras: Sequence[LoraWeight]) -> dict[str, str]:
    """The base-model tags all source LoRAs agree on (e.g. SDXL's `ss_base_model_version`), so
    the merged LoRA is listed and checked against the same checkpoints as its sources."""
    metadata = [probe.read_safetensors_header(Path(l.path)).metadata if Path(l.path).suffix == ".safetensors" else {}
                for l in loras]
    return {key: metadata[0][key] for key in _BASE_MODEL_KEYS
            if key in metadata[0] and all(m.get(key) == metadata[0][key] for m in metadata)}


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
