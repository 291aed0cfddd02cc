"""What a failed generation leaves behind and tells the user.

An out-of-memory error is the one failure a user can fix themselves (smaller size or batch),
so it becomes a short ValueError after the memory the failed request held is given back;
the worker then takes the next job on a clean device.
"""
from __future__ import annotations

import gc

OUT_OF_MEMORY = "out of memory — try a smaller size or batch"


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    # MPS, ROCm and some CPU allocators raise a plain RuntimeError with this text.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory() -> None:
    import torch

    gc.collect()  # the failed request's tensors are garbage once its frames are gone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def explain_failure(exc: BaseException) -> BaseException:
    """The exception the job reports: OOM -> ValueError(OUT_OF_MEMORY) (memory freed first),
    anything else unchanged."""
    if not is_out_of_memory(exc):
        return exc
    exc.__traceback__ = None  # the traceback's frames hold the tensors that filled the memory
    free_device_memory()
    error = ValueError(OUT_OF_MEMORY)
    error.__cause__ = None
    return error
