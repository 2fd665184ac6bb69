"""Where the heavy work runs (``--device auto``: CUDA when present, ``cpu`` or ``cuda:N``) and in which
precision (``--dtype auto``: bfloat16 autocast where the hardware computes it natively)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .errors import CsuloraError


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present; an unknown or absent device is a one-line error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CsuloraError(f"device {device!r} is not a torch device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CsuloraError(f"device {device}: CUDA is not available on this machine")
    return resolved


PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (a CPU with AVX512-BF16 or AMX, a
    GPU with bf16); elsewhere torch emulates them, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    mkldnn = getattr(torch.ops, "mkldnn", None)
    probe = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: ``bfloat16`` (autocast) where ``device`` computes it natively, else ``float32``."""
    if precision not in PRECISIONS:
        raise CsuloraError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A bfloat16 autocast region for ``bfloat16`` (weights stay float32: mixed precision), nothing for
    ``float32``."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
