"""The methods registry: CSULoRA, its per-direction variant, and the baselines and controls.

Each method lives in a file of its own (its typed settings and one decorated function, see
``base.py``); this registry lists them. Everything method-specific elsewhere (the ``correct`` CLI's
flags, the report's ``params``, the methods table of the README) is generated from it.

Adding a method is one file plus one line in ``_BUILT_IN`` below; ``register`` adds one at run time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import CsuloraError
from . import csulora, csulora_dir, csulora_signed, project, random_subspace, safelora, scale
from .base import (
    DEFAULT_LAM,
    Method,
    ModuleInputs,
    Needs,
    NoSettings,
    Settings,
    SettingSpec,
    define_method,
    fit_rank,
    setting,
)
from .random_subspace import random_basis
from .scale import energy_matched_factor

__all__ = [
    "DEFAULT_LAM",
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "MethodParams",
    "ModuleInputs",
    "Needs",
    "NoSettings",
    "SettingSpec",
    "Settings",
    "all_settings",
    "define_method",
    "energy_matched_factor",
    "fit_rank",
    "get_method",
    "method_needs",
    "random_basis",
    "register",
    "setting",
    "unregister",
]

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method``; a setting it shares by name with another method must be declared alike (one flag)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    known = all_settings()
    for spec in method.setting_specs():
        if spec.name in known and not spec.same_declaration(known[spec.name][0]):
            raise ValueError(
                f"method {method.name}: setting {spec.name} is declared otherwise by {', '.join(known[spec.name][1])}"
            )
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    del METHODS[name]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CsuloraError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_needs(name: str, values: Mapping[str, Any] | None = None) -> Needs:
    """What method ``name`` reads per module with these setting values (the lab picks its inputs by it)."""
    method = get_method(name)
    return method.needs_for(method.settings_from(values))


def all_settings() -> dict[str, tuple[SettingSpec, list[str]]]:
    """Every registered setting by name (first declaration order), with the methods that take it."""
    found: dict[str, tuple[SettingSpec, list[str]]] = {}
    for method in METHODS.values():
        for spec in method.setting_specs():
            found.setdefault(spec.name, (spec, []))[1].append(method.name)
    return found


class MethodParams(Mapping[str, Any]):
    """Setting values by name for any registered method; each method takes its own and ignores the rest.

    ``MethodParams(lam=2.0)`` is what the ``correct`` CLI builds from its flags. Every value is checked
    against its declaration when given, whichever method runs; an attribute not given reads as its
    declared default.
    """

    def __init__(self, **values: Any) -> None:
        declared = all_settings()
        for name, value in values.items():
            if name not in declared:
                raise TypeError(f"MethodParams got an unknown setting {name!r}; known: {', '.join(declared)}")
            declared[name][0].check(value)
        self._values = values

    def __getattr__(self, name: str) -> Any:
        declared = all_settings()
        if name.startswith("_") or name not in declared:
            raise AttributeError(name)
        return self._values.get(name, declared[name][0].default)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"MethodParams({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def as_dict(self) -> dict[str, Any]:
        """Every registered setting, given or default."""
        return {name: getattr(self, name) for name in all_settings()}


_BUILT_IN = (
    csulora.method,
    csulora_dir.method,
    csulora_signed.method,
    safelora.method,
    project.method,
    scale.method,
    random_subspace.method,
)
for _method in _BUILT_IN:
    register(_method)

DEFAULT_METHOD = csulora.method.name
