"""Declared settings: typed fields with a default, bounds and help text, from which the CLI's flags,
the checks and the reports are generated.

A method's settings (``csulora.methods``) and the subspace's (``SubspaceSettings``, below) are
declared alike. Nothing here imports torch, so ``csulora --help`` can list the flags without it.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from types import UnionType
from typing import Any

from .errors import CsuloraError


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    finite: bool = False,
    choices: tuple[str, ...] | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
) -> Any:
    """A settings field: its default, bounds and help text.

    ``minimum`` is inclusive unless ``open_minimum``, ``maximum`` inclusive; ``finite``: no NaN or inf.
    """
    metadata = {"help": help, "minimum": minimum, "finite": finite, "choices": choices}
    return field(default=default, metadata=metadata | {"maximum": maximum, "open_minimum": open_minimum})


@dataclass(frozen=True)
class SettingSpec:
    """One declared setting, as the CLI and the checks see it."""

    name: str
    type: type  # float, int or str
    optional: bool  # None is allowed (and means "not given")
    default: Any
    help: str
    minimum: float | None = None
    finite: bool = False
    choices: tuple[str, ...] | None = None
    maximum: float | None = None
    open_minimum: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def same_declaration(self, other: SettingSpec) -> bool:
        """Two methods may share a setting (and so a flag) only if they declare it alike, help aside."""
        return self._bounds() == other._bounds()

    def _bounds(self) -> tuple:
        return (self.type, self.optional, self.default, self.minimum, self.finite, self.choices, self.maximum) + (
            self.open_minimum,
        )

    def check(self, value: Any) -> None:
        """Raise a one-line ``CsuloraError`` naming the setting (``lam=...``, which the CLI prints as ``--lam``)
        when ``value`` is out of bounds."""
        if value is None and self.optional:
            return
        if self.choices is not None:
            if value not in self.choices:
                options = " or ".join(repr(c) for c in self.choices)
                raise CsuloraError(f"{self.name}=... must be {options}, got {value!r}")
            return
        if self.type in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise CsuloraError(f"{self.name}=... must be a number, got {value!r}")
        if self.type is str and not isinstance(value, str):
            raise CsuloraError(f"{self.name}=... must be a string, got {value!r}")
        # NaN is out of bounds too: every comparison with it is false
        above = self.minimum is None or (value > self.minimum if self.open_minimum else value >= self.minimum)
        out_of_bounds = not above or (self.maximum is not None and not value <= self.maximum)
        if (self.finite and not math.isfinite(value)) or out_of_bounds:
            if self.maximum is not None:
                low = "(" if self.open_minimum else "["
                raise CsuloraError(f"{self.name}=... must be in {low}{self.minimum:g}, {self.maximum:g}], got {value}")
            if self.minimum is None:
                raise CsuloraError(f"{self.name}=... must be finite, got {value}")
            number = "a finite number >= " if self.finite else ">= "
            raise CsuloraError(f"{self.name}=... must be {number}{self.minimum:g}, got {value}")


def setting_specs(settings_class: type) -> tuple[SettingSpec, ...]:
    """The declared settings of a settings dataclass, in declaration order."""
    hints = typing.get_type_hints(settings_class)
    specs = []
    for f in fields(settings_class):
        kind, optional = _plain_type(hints[f.name], f.name)
        if f.default is MISSING:
            raise TypeError(f"setting {f.name} of {settings_class.__name__} has no default")
        meta = f.metadata
        specs.append(
            SettingSpec(
                f.name,
                kind,
                optional,
                f.default,
                meta.get("help", ""),
                meta.get("minimum"),
                meta.get("finite", False),
                meta.get("choices"),
                meta.get("maximum"),
                meta.get("open_minimum", False),
            )
        )
    return tuple(specs)


def _plain_type(hint: Any, name: str) -> tuple[type, bool]:
    """``float`` -> (float, False); ``float | None`` -> (float, True); only int, float and str."""
    args = typing.get_args(hint) if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union else ()
    optional = type(None) in args
    plain = [a for a in args if a is not type(None)] if args else [hint]
    if len(plain) != 1 or plain[0] not in (int, float, str):
        raise TypeError(f"setting {name}: only int, float and str (or optional ones) have a CLI flag, got {hint}")
    return plain[0], optional


@dataclass(frozen=True)
class Settings:
    """Base of every settings class (a method's, the subspace's): each field is checked against its
    declaration when built."""

    def __post_init__(self) -> None:
        for spec in setting_specs(type(self)):
            spec.check(getattr(self, spec.name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NoSettings(Settings):
    """For a method with nothing to set."""


@dataclass(frozen=True)
class SubspaceSettings(Settings):
    """How the rank is chosen and how the randomized SVD runs (``csulora.svd``)."""

    rank: int | None = setting(None, "fixed rank k per module", minimum=1)
    energy: float = setting(0.8, "energy fraction TAU for the rank", minimum=0, open_minimum=True, maximum=1)
    max_rank: int = setting(256, "cap KMAX on the energy-chosen rank", minimum=1)
    oversample: int = setting(10, "randomized SVD oversampling", minimum=0)
    power_iters: int = setting(2, "randomized SVD power iterations", minimum=0)
    seed: int = setting(0, "seed of the sketch")
