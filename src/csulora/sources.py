"""What an adapter is corrected or inspected with: its subspace, or its (base, aligned) pair.

Matching the subspace to the adapter's model (by the weights' recorded digests),
and handing out each module's basis, or each module's ``V``, in the update's orientation,
shape-checked, in the adapter's module order. The correction pipeline and ``inspect`` both read
their inputs through here.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter
from .checkpoint import Checkpoint, match_module, tensor_digest
from .errors import CsuloraError, CsuloraWarning
from .pair import Pair, iter_deltas, local_checkpoint, open_pair, sampled_rows_digest, subspace_modules, weight_digest
from .subspace import SAMPLE_KEY, Subspace, _FileBases, load_subspace
from .subspace_stream import stream_bases, stream_metadata
from .svd import ModuleBasis, SubspaceSettings


@dataclass(frozen=True)
class BasisSource:
    """Where an adapter's basis comes from: a subspace (a file or an object), or a (base, aligned) pair
    whose subspace is computed on the fly as ``subspace_settings`` say.

    ``aligned`` defaults to the adapter's ``base_model_name_or_path``; with a subspace it is the local
    checkpoint the subspace's recorded digests are compared with. ``allow_pickle``: pickled ``.bin``
    checkpoints (and adapter weights) may be read, with ``weights_only=True``. ``device``: where the
    SVDs run. ``verify``: the subspace (or ``aligned``) must be proven to come from the adapter's model,
    every target module's whole weight compared.
    """

    subspace: str | Path | Subspace | None = None
    base: str | Path | None = None
    aligned: str | Path | None = None
    subspace_settings: SubspaceSettings = field(default_factory=SubspaceSettings)
    allow_pickle: bool = False
    device: str | None = None
    verify: bool = False

    @property
    def subspace_path(self) -> str | Path | None:
        """The subspace file, if the subspace is one (or was read from one)."""
        if self.subspace is None or isinstance(self.subspace, str | Path):
            return self.subspace
        return self.subspace.path

    def open_pair(self, adapter: Adapter, required: str | None = None) -> Pair | None:
        """The (base, aligned) pair when ``base`` is given, else None (``required``: the error then)."""
        return open_pair(adapter, self.base, self.aligned, self.allow_pickle, required, self.verify)


def subspace_file_name(subspace: Subspace) -> str:
    return str(subspace.path or "the subspace")


@dataclass(frozen=True)
class ModuleBasisFor:
    """One adapter module's basis in the update's orientation (float64): ``U: m x k``, ``R: n x k``.

    ``sigma``: V's top-k singular values (``V_k = U diag(sigma) R^T``; the same in either orientation).
    """

    module: str  # the adapter's name
    name: str  # the subspace's (checkpoint's) name
    U: torch.Tensor
    R: torch.Tensor
    sha256: dict | None  # the digests of the weights it was computed from, when known
    sigma: torch.Tensor

    @property
    def k(self) -> int:
        return self.U.shape[1]


class AdapterSubspace:
    """The subspace for an adapter's modules: a given one (file or object), or streamed from the pair.

    ``bases()`` walks the adapter's modules once, in order; a streamed subspace is computed module by
    module as it goes, so only the module in hand (and the one being read) is ever in memory.
    """

    def __init__(self, adapter: Adapter, source: BasisSource, pair: Pair | None, progress: bool = False):
        """``pair``: ``source.open_pair(adapter)``, opened once by the caller (a method may read ``V`` too)."""
        subspace, aligned, verify = source.subspace, source.aligned, source.verify
        self.adapter = adapter
        self.pair = pair
        self.settings = source.subspace_settings
        self.progress, self.device = progress, source.device
        self.given: Subspace | None = None
        # the model type says which modules are Conv1D (stored in x out): see Adapter.stored_transposed
        self.model_type = pair.aligned.model_type if pair else None
        if subspace is not None:
            self.given = subspace if isinstance(subspace, Subspace) else load_subspace(subspace)
            local = pair.aligned if pair else local_checkpoint(aligned or adapter.base_model, False)
            _warn_if_other_model(adapter, self.given, local, verify)
            recorded = self.given.metadata.get("model_type")
            self.model_type = self.model_type or recorded or (local.model_type if local else None)
        elif pair is None:
            raise CsuloraError(
                "needs a subspace (subspace=...), or a base checkpoint (base=..., and aligned=...) to compute it"
            )

    @property
    def where(self) -> str:
        """The file named in messages about the subspace: the subspace file, or the aligned checkpoint."""
        if self.pair is not None:
            return str(self.pair.aligned.path)
        assert self.given is not None  # __init__ refuses neither a subspace nor a pair
        return subspace_file_name(self.given)

    def bases(self) -> Iterator[ModuleBasisFor]:
        adapter = self.adapter
        if self.given is not None:
            given = self.given
            for module in adapter.modules:
                name = match_module(module, given.modules())
                if name is None:
                    raise CsuloraError(
                        f"{subspace_file_name(given)}: adapter module {module} has no entry in the subspace file; "
                        f"recompute it with adapter=... {adapter.path}"
                    )
                yield self._oriented(module, name, given[name], f"the subspace in {subspace_file_name(given)}")
            return
        assert self.pair is not None
        names = subspace_modules(self.pair.aligned, modules=None, targets=None, adapter=adapter)
        streamed = stream_bases(self.pair.base, self.pair.aligned, names, self.settings, self.progress, self.device)
        for module, (name, basis) in zip(adapter.modules, streamed, strict=True):
            yield self._oriented(module, name, basis, f"the subspace computed from {self.pair.aligned.path}")

    def metadata(self, digests: list[dict | None]) -> dict:
        """Where the subspace came from: the given one's metadata, or the pair's with the used bases' digests."""
        if self.given is not None:
            return self.given.metadata
        assert self.pair is not None
        return stream_metadata(self.pair.base, self.pair.aligned, self.settings, digests)

    def _oriented(self, module: str, name: str, basis: ModuleBasis, what: str) -> ModuleBasisFor:
        """The basis (stored layout: ``U`` the stored rows, ``R`` the columns) in the update's orientation."""
        stored = (basis.U.shape[0], basis.R.shape[0])
        transposed = self.adapter.stored_transposed(module, stored, self.model_type, what)
        U, R = (basis.R, basis.U) if transposed else (basis.U, basis.R)
        return ModuleBasisFor(
            module, name, U.to(torch.float64), R.to(torch.float64), basis.sha256, basis.sigma.to(torch.float64)
        )


@dataclass(frozen=True)
class ModuleDelta:
    """One adapter module's ``V = W_aligned - W_base`` in the update's orientation (float64)."""

    module: str
    name: str
    V: torch.Tensor
    negligible: bool


def adapter_deltas(adapter: Adapter, pair: Pair) -> Iterator[ModuleDelta]:
    """Each adapter module's ``V``, in the adapter's order, read while the caller works on the previous one."""
    names = subspace_modules(pair.aligned, modules=adapter.modules, targets=None, adapter=None)
    for module, delta in zip(adapter.modules, iter_deltas(pair.base, pair.aligned, names), strict=True):
        where = f"the weight in {pair.aligned.path}"
        V = (
            delta.V.T
            if adapter.stored_transposed(module, tuple(delta.V.shape), pair.aligned.model_type, where)
            else delta.V
        )
        yield ModuleDelta(module, delta.module, V.to(torch.float64), delta.negligible)


# -- is the subspace (or --aligned) from the adapter's model? -------------------------------------
def aligned_digest(aligned: Checkpoint, modules: list[str]) -> str:
    """sha256 of the aligned weights of ``modules``, as ``subspace`` records it (content, not names)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(tensor_digest(aligned.read(aligned.weight_key(module))))
    return digest.hexdigest()


def _spread(items: list, count: int = 3) -> list:
    """Up to ``count`` items: the first, the last and ones between."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _recorded(subspace: Subspace, name: str, key: str) -> str | None:
    """The aligned digest the subspace file records for module ``name`` (``sha256`` or ``sample_sha256``)."""
    meta = subspace.bases.meta if isinstance(subspace.bases, _FileBases) else subspace.module_metadata()
    return ((meta.get(name) or {}).get(key) or {}).get("aligned")


def _warn_if_other_model(
    adapter: Adapter, subspace: Subspace, aligned: Checkpoint | None, verify: bool = False
) -> None:
    """The subspace must come from the weights the adapter was trained on: compare their digests.

    Shapes match across fine-tunes of one architecture and directory names say nothing about
    content, so the digests the subspace records of the aligned weights are compared with the
    local checkpoint's, for every module the adapter targets: the sampled rows' digests, or with
    ``verify`` the whole weights' (a file without sampled digests, from an older csulora: the whole
    weights of three modules). ``verify`` turns a difference, or a check that cannot be made, into an error.
    """
    where = subspace_file_name(subspace)
    source = (subspace.metadata.get("aligned") or {}).get("source")
    if aligned is None:  # the adapter's model is not here (a Hub id): its name is the only clue left
        if verify:
            raise CsuloraError(
                f"{adapter.path}: verify=True: the adapter's model {adapter.base_model} is not a local checkpoint; "
                "give the local aligned checkpoint (aligned=...) to compare its weights with the subspace's"
            )
        if source and adapter.base_model and source != adapter.base_model:
            warnings.warn(
                f"{adapter.path}: the adapter was trained on {adapter.base_model} but {where} "
                f"was computed from {source} (their weights cannot be compared here)",
                CsuloraWarning,
                stacklevel=3,
            )
        return
    names = [name for module in adapter.modules if (name := match_module(module, subspace.modules())) is not None]
    key = "sha256" if verify else SAMPLE_KEY
    recorded = {name: _recorded(subspace, name, key) for name in names}
    if not all(recorded.values()):
        if verify:
            missing = next(name for name, digest in recorded.items() if not digest)
            raise CsuloraError(
                f"{where}: verify=True: no digest of module {missing}'s aligned weights (written by an older csulora); "
                "recompute the subspace"
            )
        full = {name: _recorded(subspace, name, "sha256") for name in _spread(names)}
        if not all(full.values()):  # older still: one digest chained over the file's modules
            chained = (subspace.metadata.get("aligned") or {}).get("sha256")
            if chained:
                try:
                    same = aligned_digest(aligned, subspace.modules()) == chained
                except CsuloraError:
                    same = False
                if not same:
                    warnings.warn(
                        f"{where}: computed from other aligned weights than {aligned.path} (the adapter's model): "
                        "the subspace may belong to another model",
                        CsuloraWarning,
                        stacklevel=3,
                    )
            return
        recorded, key = full, "sha256"
    digest = weight_digest if key == "sha256" else sampled_rows_digest
    differs = None
    for name, expected in recorded.items():
        try:
            if digest(aligned, name) != expected:
                differs = name
        except CsuloraError:
            differs = name
        if differs:
            break
    if differs is None:
        return
    message = (
        f"{where}: computed from other aligned weights than {aligned.path} (the adapter's model; module {differs} "
        "differs): the subspace may belong to another model"
    )
    if verify:
        raise CsuloraError(f"verify=True: {message}")
    warnings.warn(message, CsuloraWarning, stacklevel=3)
