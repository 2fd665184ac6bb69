"""The library's entry points under their historical names: each lives in the module of its job.

- ``compute_subspace`` (and the streaming it builds on): ``csulora.subspace_stream``
- ``correct_adapter`` and the typed per-module results: ``csulora.pipeline``
- ``inspect_adapter``: ``csulora.report``
- ``resolve_device``: ``csulora.device``
"""

from __future__ import annotations

from .device import resolve_device
from .pipeline import REPORT_NAME, Correction, ModuleResult, correct_adapter, is_corrected_adapter, run_correction
from .report import inspect_adapter
from .subspace_stream import compute_subspace, stream_bases

__all__ = [
    "REPORT_NAME",
    "Correction",
    "ModuleResult",
    "compute_subspace",
    "correct_adapter",
    "inspect_adapter",
    "is_corrected_adapter",
    "resolve_device",
    "run_correction",
    "stream_bases",
]
