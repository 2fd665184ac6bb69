"""Where the heavy work runs: ``--device auto`` (CUDA when present), ``cpu`` or ``cuda:N``."""

from __future__ import annotations

import torch

from .errors import CsuloraError


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present; an unknown or absent device is a one-line error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CsuloraError(f"--device {device!r} is not a torch device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CsuloraError(f"--device {device}: CUDA is not available on this machine")
    return resolved
