"""csulora: Closest Safe Update LoRA, post-hoc safety correction of LoRA adapters.

The public names are imported on first use, so that ``import csulora.cli`` (and ``csulora --help``)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# public name -> the module that defines it
_EXPORTS = {
    "Adapter": "adapter",
    "load_adapter": "adapter",
    "write_adapter": "adapter",
    "Checkpoint": "checkpoint",
    "LoraFactors": "correct",
    "csulora_dir_update": "correct",
    "csulora_signed_update": "correct",
    "csulora_update": "correct",
    "decompose": "correct",
    "project_update": "correct",
    "safelora_candidate": "correct",
    "scale_update": "correct",
    "signed_overlap": "correct",
    "truncate_to_rank": "correct",
    "CsuloraError": "errors",
    "METHODS": "methods",
    "MethodParams": "methods",
    "correct_adapter": "pipeline",
    "BasisSource": "sources",
    "Subspace": "subspace",
    "SubspaceSettings": "svd",
    "load_subspace": "subspace",
    "randomized_svd": "svd",
    "compute_subspace": "subspace_stream",
}

__all__ = [
    "Adapter",
    "BasisSource",
    "Checkpoint",
    "CsuloraError",
    "LoraFactors",
    "METHODS",
    "MethodParams",
    "Subspace",
    "SubspaceSettings",
    "compute_subspace",
    "correct_adapter",
    "csulora_dir_update",
    "csulora_signed_update",
    "csulora_update",
    "decompose",
    "load_adapter",
    "load_subspace",
    "project_update",
    "randomized_svd",
    "safelora_candidate",
    "scale_update",
    "signed_overlap",
    "truncate_to_rank",
    "write_adapter",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and editors see
    from .adapter import Adapter, load_adapter, write_adapter
    from .checkpoint import Checkpoint
    from .correct import (
        LoraFactors,
        csulora_dir_update,
        csulora_signed_update,
        csulora_update,
        decompose,
        project_update,
        safelora_candidate,
        scale_update,
        signed_overlap,
        truncate_to_rank,
    )
    from .errors import CsuloraError
    from .methods import METHODS, MethodParams
    from .pipeline import correct_adapter
    from .sources import BasisSource
    from .subspace import Subspace, load_subspace
    from .subspace_stream import compute_subspace
    from .svd import SubspaceSettings, randomized_svd
