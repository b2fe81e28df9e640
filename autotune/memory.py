"""Device memory as plain functions: is an error an out-of-memory, and give back what a failed
attempt held. Used from below by the dry run, the training's recovery, the samples and sweeps."""

from __future__ import annotations


def is_oom(exc: BaseException) -> bool:
    """Out of memory, by type first; by message only for cuDNN/allocator errors
    that arrive as RuntimeError."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(s in text for s in ("CUDA out of memory", "CUDNN_STATUS_ALLOC_FAILED",
                                       "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUBLAS_STATUS_ALLOC_FAILED",
                                       "out of memory"))
    return False


def free_memory() -> None:
    """What a failed attempt held, back to the device: accelerate's own cache clearing. Call it
    outside the `except` block, once no frame holds the failed step's tensors."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
