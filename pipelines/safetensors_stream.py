"""Write a .safetensors file one tensor at a time.

`safetensors.torch.save_file` needs the whole state dict in memory; a merge of two SDXL models
would hold a third model's worth of RAM. The format is simple (8-byte header length, a JSON
header with dtypes, shapes and byte offsets, then the raw bytes), so when the shapes and dtypes
are known in advance the header can be written first and each tensor streamed after it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor the writer will ask for: its name, dtype and shape."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def write_streaming(path: Path, plans: Iterable[TensorPlan], produce: Callable[[TensorPlan], torch.Tensor],
                    metadata: dict[str, str] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `path` atomically (a temporary file renamed at the end). `produce(plan)` is called
    once per tensor, in order, and must return a tensor of exactly that dtype and shape."""
    plans = list(plans)
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; convert {bad} to strings first.")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for plan in plans:
        if plan.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{plan.name}: dtype {plan.dtype} cannot be stored in safetensors")
        header[plan.name] = {"dtype": _DTYPE_NAMES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        with open(temporary, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for index, plan in enumerate(plans):
                tensor = produce(plan)
                if tensor.dtype != plan.dtype or tuple(tensor.shape) != plan.shape:
                    raise ValueError(f"{plan.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                     f"planned {plan.dtype} {plan.shape}")
                handle.write(_raw_bytes(tensor))
                del tensor  # before the next produce(): one tensor alive at a time
                if progress is not None:
                    progress(index + 1, len(plans))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    # Little-endian machine bytes; a uint8 view works for every dtype, bfloat16 included.
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()
