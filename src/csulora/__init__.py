"""csulora: Closest Safe Update LoRA, post-hoc safety correction of LoRA adapters."""

__version__ = "0.1.0"

from .adapter import Adapter, load_adapter, write_adapter  # noqa: E402
from .checkpoint import Checkpoint  # noqa: E402
from .correct import (  # noqa: E402
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
from .errors import CsuloraError  # noqa: E402
from .methods import METHODS, MethodParams  # noqa: E402
from .pipeline import correct_adapter  # noqa: E402
from .subspace import Subspace, SubspaceSettings, load_subspace, randomized_svd  # noqa: E402
from .subspace_stream import compute_subspace  # noqa: E402

__all__ = [
    "Adapter",
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
