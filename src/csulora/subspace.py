"""The subspace file: the per-module bases of a (base, aligned) pair and where they came from.

``Subspace`` holds the bases (``svd.ModuleBasis``) and the metadata, and writes the file
(safetensors tensors ``<module>.U``, ``<module>.R``, ``<module>.sigma`` and a JSON document under the
``csulora`` metadata key); ``load_subspace`` reads it back and checks every part of it. The SVD that
computes the bases is ``csulora.svd``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import read_failure
from .correct import all_finite
from .errors import CsuloraError
from .safe_output import ReservedOutput, atomic_file
from .svd import ModuleBasis

FORMAT_VERSION = 1


@dataclass
class Subspace:
    """Per-module bases plus the metadata that says where they came from."""

    bases: Mapping[str, ModuleBasis]
    metadata: dict = field(default_factory=dict)

    def __contains__(self, module: str) -> bool:
        return module in self.bases

    def __getitem__(self, module: str) -> ModuleBasis:
        return self.bases[module]

    def modules(self) -> list[str]:
        return list(self.bases)

    @property
    def path(self) -> Path | None:
        """The file the bases are read from, if any (for messages)."""
        return getattr(self.bases, "path", None)

    def module_metadata(self) -> dict:
        return {
            name: {
                "k": b.k,
                "shape": [b.U.shape[0], b.R.shape[0]],
                "energy": b.energy_captured,
                "total_energy": b.total_energy,
            }
            | ({"sha256": b.sha256} if b.sha256 is not None else {})
            | ({SAMPLE_KEY: b.samples} if b.samples is not None else {})
            for name, b in self.bases.items()
        }

    def save(self, path: str | Path | ReservedOutput, *, force: bool = False) -> Path:
        """Write the subspace file atomically; refuses to overwrite unless ``force``.

        ``path`` may be an output already reserved (``safe_output.reserve_output``): it is not checked again.
        """
        from safetensors.torch import save_file

        tensors = {}
        for name, b in self.bases.items():
            tensors[f"{name}.U"] = b.U.float().contiguous()
            tensors[f"{name}.R"] = b.R.float().contiguous()
            tensors[f"{name}.sigma"] = b.sigma.float().contiguous()
        document = dict(self.metadata) | {
            "format_version": FORMAT_VERSION,
            "modules": self.module_metadata(),
        }
        shown = path.shown if isinstance(path, ReservedOutput) else path
        for key, tensor in tensors.items():
            if not all_finite(tensor):
                raise CsuloraError(f"{shown}: subspace tensor {key} is not finite; nothing written")
        with atomic_file(path, force=force, owned=is_subspace_file) as tmp:
            save_file(tensors, str(tmp), metadata={"csulora": json.dumps(document, allow_nan=False)})
        return Path(shown)


def chained_digests(digests: Sequence[dict | None]) -> dict[str, str | None]:
    """The pair's content digests from its modules' (``ModuleBasis.sha256``): sha256 over them, in order.

    What a single run records for the whole pair, whether it streamed the modules or merged shards;
    None with no modules.
    """
    chains: dict[str, str | None] = {}
    for side in ("base", "aligned"):
        if not digests:
            chains[side] = None
            continue
        chain = hashlib.sha256()
        for digest in digests:
            if digest is None:
                raise CsuloraError(f"a module has no {side} weight digest to chain")
            chain.update(bytes.fromhex(digest[side]))
        chains[side] = chain.hexdigest()
    return chains


def is_subspace_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file csulora wrote (it carries the ``csulora`` metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return "csulora" in (f.metadata() or {})
    except Exception:  # not safetensors at all
        return False


class _FileBases(Mapping):
    """Bases read from the subspace file one module at a time, so memory holds a module, not all."""

    def __init__(self, path: Path, modules: dict):
        self.path = path
        self.meta = modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, name: str) -> ModuleBasis:
        if name not in self.meta:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                U, R, sigma = (f.get_tensor(f"{name}.{part}") for part in ("U", "R", "sigma"))
        except (SafetensorError, OSError) as exc:
            raise read_failure(self.path, exc, f"cannot read module {name}") from None
        meta = self.meta[name]
        basis = ModuleBasis(U, R, sigma, float(meta["total_energy"]), meta.get("sha256"), meta.get(SAMPLE_KEY))
        check_basis(basis, self.meta[name], f"{self.path}: module {name}")
        return basis


ORTHONORMAL_TOL = 1e-3  # float32 bases are orthonormal to ~1e-6; a rescaled or edited one is far off


def check_basis(basis: ModuleBasis, meta: dict, where: str) -> None:
    """A basis read from a file: float, finite, shaped as its metadata says, orthonormal columns."""
    U, R, sigma = basis.U, basis.R, basis.sigma
    for part, tensor in (("U", U), ("R", R), ("sigma", sigma)):
        if not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1:
            raise CsuloraError(f"{where}: {part} has dtype {tensor.dtype}, expected float32")
        if not all_finite(tensor):
            raise CsuloraError(f"{where}: {part} has NaN or Inf values")
    k = meta["k"]
    if U.dim() != 2 or R.dim() != 2 or sigma.dim() != 1 or [U.shape[0], R.shape[0]] != meta["shape"]:
        raise CsuloraError(f"{where}: tensor shapes U {tuple(U.shape)}, R {tuple(R.shape)} do not match the metadata")
    if not U.shape[1] == R.shape[1] == sigma.shape[0] == k:
        raise CsuloraError(f"{where}: U, R and sigma do not all have k = {k} columns")
    probe = torch.randn(k, 4, generator=torch.Generator().manual_seed(0))
    for part, Q in (("U", U), ("R", R)):
        if not k:
            continue
        # O(mk), not the O(mk^2) of Q^T Q: exact column norms, and Q^T Q applied to random vectors
        # (a Gram matrix off the identity moves a random vector by about its Frobenius distance)
        Q = Q.float()
        norms = (Q * Q).sum(dim=0)
        # (Q^T Q probe)^T as probe^T Q^T Q: the same numbers, and torch is slow at tall products with 4 columns
        moved = (probe.T @ Q.T) @ Q - probe.T
        error = max(float((norms - 1).abs().max()), float(moved.norm() / probe.norm()))
        if error > ORTHONORMAL_TOL:
            raise CsuloraError(
                f"{where}: the columns of {part} are not orthonormal ({part}^T {part} is {error:.3g} away from I)"
            )
    if (sigma < 0).any():
        raise CsuloraError(f"{where}: negative singular values")


def _check_module_metadata(meta: Any, where: str) -> None:
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    if not (
        isinstance(meta, dict)
        and count(meta.get("k"))
        and isinstance(meta.get("shape"), list)
        and len(meta["shape"]) == 2
        and all(count(x) and x > 0 for x in meta["shape"])
        and number(meta.get("total_energy"))
    ):
        raise CsuloraError(f"{where}: corrupt metadata {json.dumps(meta)[:200]}")


def is_sha256(value: Any) -> bool:
    """A sha256 as csulora records it: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


SAMPLE_KEY = "sample_sha256"  # per module: digests of the weights' sampled rows (``checkpoint.sample_rows``)


def _check_digests(meta: dict, where: str) -> None:
    """A module's recorded weight digests: absent, or ``{"base": sha256, "aligned": sha256}``."""
    for key in ("sha256", SAMPLE_KEY):
        digests = meta.get(key)
        if digests is not None and not (
            isinstance(digests, dict) and all(is_sha256(digests.get(side)) for side in ("base", "aligned"))
        ):
            raise CsuloraError(f"{where}: corrupt metadata ({key} {json.dumps(digests)[:100]})")


def _check_sources(document: dict, where: Path) -> None:
    """The (base, aligned) records: absent, or ``{"source": str, "sha256": sha256 or null}``; model_type a string."""
    for side in ("base", "aligned"):
        record = document.get(side)
        if record is None:
            continue
        if not (
            isinstance(record, dict)
            and isinstance(record.get("source"), str)
            and (record.get("sha256") is None or is_sha256(record["sha256"]))
        ):
            raise CsuloraError(f"{where}: corrupt csulora metadata ({side}: {json.dumps(record)[:100]})")
    if not isinstance(document.get("model_type"), str | None):
        raise CsuloraError(f"{where}: corrupt csulora metadata (model_type {json.dumps(document['model_type'])[:60]})")


def load_subspace(path: str | Path) -> Subspace:
    """Open a subspace file written by ``Subspace.save``; module bases are read when first used."""
    path = Path(path)
    if not path.is_file():
        raise CsuloraError(f"{path}: subspace file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise read_failure(path, exc, "unreadable subspace file") from None
    if "csulora" not in header:
        raise CsuloraError(f"{path}: not a csulora subspace file (no 'csulora' metadata)")
    try:
        document = json.loads(header["csulora"])
    except (ValueError, RecursionError):
        raise CsuloraError(f"{path}: corrupt csulora metadata") from None
    if not isinstance(document, dict):
        raise CsuloraError(f"{path}: corrupt csulora metadata (not a JSON object)")
    if document.get("format_version") != FORMAT_VERSION:
        raise CsuloraError(f"{path}: subspace format {document.get('format_version')} is not supported")
    modules = document.get("modules")
    if not isinstance(modules, dict):  # empty is fine: a shard can hold no module
        raise CsuloraError(f"{path}: corrupt csulora metadata (no 'modules' table)")
    for name, meta in modules.items():
        missing = {f"{name}.U", f"{name}.R", f"{name}.sigma"} - keys
        if missing:
            raise CsuloraError(f"{path}: module {name} lacks tensors {sorted(missing)}")
        _check_module_metadata(meta, f"{path}: module {name}")
        _check_digests(meta, f"{path}: module {name}")
    _check_sources(document, path)
    metadata = {key: value for key, value in document.items() if key != "modules"}
    return Subspace(_FileBases(path, modules), metadata)
