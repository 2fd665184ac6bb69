"""Optional dependencies: the core install runs ``subspace``, ``correct`` and ``inspect``; the rest
needs an extra (``pip install 'csulora[eval]'``, ``[plot]``, ``[lab]``), named when it is missing."""

from __future__ import annotations

import importlib

from .errors import CsuloraError


def require_extra(extra: str, *modules: str, feature: str) -> None:
    """Raise a one-line ``CsuloraError`` naming the extra if any of ``modules`` cannot be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise CsuloraError(f"{feature} needs {module}: pip install 'csulora[{extra}]'") from None
