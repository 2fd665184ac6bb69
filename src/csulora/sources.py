"""What an adapter is corrected or inspected with: its subspace, or its (base, aligned) pair.

Opening the pair, matching the subspace to the adapter's model (by the weights' recorded digests),
and handing out each module's basis, or each module's ``V``, in the update's orientation,
shape-checked, in the adapter's module order. The correction pipeline and ``inspect`` both read
their inputs through here.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import Adapter
from .checkpoint import Checkpoint, match_module, tensor_digest
from .errors import CsuloraError, CsuloraWarning
from .io_utils import real_path
from .subspace import ModuleBasis, Subspace, SubspaceSettings, load_subspace
from .subspace_stream import check_pair, iter_deltas, stream_bases, stream_metadata, subspace_modules


@dataclass(frozen=True)
class Pair:
    """The (base, aligned) checkpoints an adapter's alignment displacement comes from."""

    base: Checkpoint
    aligned: Checkpoint


def open_pair(adapter: Adapter, base, aligned, allow_pickle: bool, required: str | None = None) -> Pair | None:
    """Open (base, aligned) when ``base`` is given (aligned defaults to the adapter's model); else None.

    ``required``: the error to raise when the caller cannot do without the pair.
    """
    if base is None:
        if required:
            raise CsuloraError(required)
        return None
    aligned_source = aligned or adapter.base_model
    if aligned_source is None:
        raise CsuloraError(f"{adapter.path}: no base_model_name_or_path in the config; pass --aligned")
    pair = Pair(Checkpoint(base, allow_pickle=allow_pickle), Checkpoint(aligned_source, allow_pickle=allow_pickle))
    check_pair(pair.base, pair.aligned, adapter.modules)
    if aligned is not None:
        _warn_if_not_trained_on(adapter, pair.aligned, allow_pickle)
    return pair


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

    def __init__(
        self,
        adapter: Adapter,
        subspace: str | Path | Subspace | None,
        pair: Pair | None,
        aligned,
        settings: SubspaceSettings | None,
        progress: bool = False,
        device: str | None = None,
    ):
        self.adapter = adapter
        self.pair = pair
        self.settings = settings or SubspaceSettings()
        self.progress, self.device = progress, device
        self.given: Subspace | None = None
        if subspace is not None:
            self.given = subspace if isinstance(subspace, Subspace) else load_subspace(subspace)
            local = pair.aligned if pair else _local_checkpoint(aligned or adapter.base_model, False)
            _warn_if_other_model(adapter, self.given, local)
        elif pair is None:
            raise CsuloraError("pass --subspace SUB, or --base B (and --aligned A) to compute it")

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
                        f"recompute it with --adapter {adapter.path}"
                    )
                yield self._oriented(module, name, given[name], subspace_file_name(given))
            return
        assert self.pair is not None
        names = subspace_modules(self.pair.aligned, modules=None, targets=None, adapter=adapter)
        streamed = stream_bases(self.pair.base, self.pair.aligned, names, self.settings, self.progress, self.device)
        for module, (name, basis) in zip(adapter.modules, streamed, strict=True):
            yield self._oriented(module, name, basis, "the subspace")

    def metadata(self, digests: list[dict | None]) -> dict:
        """Where the subspace came from: the given one's metadata, or the pair's with the used bases' digests."""
        if self.given is not None:
            return self.given.metadata
        assert self.pair is not None
        return stream_metadata(self.pair.base, self.pair.aligned, self.settings, digests)

    def _oriented(self, module: str, name: str, basis: ModuleBasis, where: str) -> ModuleBasisFor:
        U, R = (basis.R, basis.U) if self.adapter.fan_in_fan_out else (basis.U, basis.R)
        self.adapter.check_fits(module, (U.shape[0], R.shape[0]), f"the subspace {where} is for")
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
        V = delta.V.T if adapter.fan_in_fan_out else delta.V
        adapter.check_fits(module, tuple(V.shape), f"the weight in {pair.aligned.path}")
        yield ModuleDelta(module, delta.module, V.to(torch.float64), delta.negligible)


# -- is the subspace (or --aligned) from the adapter's model? -------------------------------------
def aligned_digest(aligned: Checkpoint, modules: list[str]) -> str:
    """sha256 of the aligned weights of ``modules``, as ``subspace`` records it (content, not names)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(tensor_digest(aligned.read(aligned.weight_key(module))))
    return digest.hexdigest()


def _local_checkpoint(source, allow_pickle: bool) -> Checkpoint | None:
    """A checkpoint at a local path, or None (a Hub id, or nothing readable there)."""
    if not source or not Path(source).expanduser().is_dir():
        return None
    try:
        return Checkpoint(source, allow_pickle=allow_pickle)
    except CsuloraError:
        return None


def _spread(items: list, count: int = 3) -> list:
    """Up to ``count`` items: the first, the last and ones between."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _weight_digest(ckpt: Checkpoint, module: str) -> str:
    return tensor_digest(ckpt.read(ckpt.weight_key(module))).hex()


def _same_weights(one: Checkpoint, other: Checkpoint, modules: list[str]) -> bool:
    """Whether two checkpoints hold the same weights, judged on a few of ``modules`` (reading little)."""
    try:
        return all(_weight_digest(one, module) == _weight_digest(other, module) for module in _spread(modules))
    except CsuloraError:
        return False


def _warn_if_not_trained_on(adapter: Adapter, aligned: Checkpoint, allow_pickle: bool) -> None:
    """``--aligned`` other than the adapter's ``base_model_name_or_path``: fine if the weights are the same."""
    claimed = adapter.base_model
    if not claimed or real_path(claimed) == real_path(aligned.path) or claimed == aligned.source:
        return
    trained_on = _local_checkpoint(claimed, allow_pickle)
    if trained_on is not None and _same_weights(trained_on, aligned, adapter.modules):
        return
    warnings.warn(
        f"{adapter.path}: the adapter was trained on {claimed} but --aligned is {aligned.source}"
        + ("" if trained_on is not None else " (cannot compare their weights here)")
        + (" and their weights differ" if trained_on is not None else ""),
        CsuloraWarning,
        stacklevel=3,
    )


def _warn_if_other_model(adapter: Adapter, subspace: Subspace, aligned: Checkpoint | None) -> None:
    """The subspace must come from the weights the adapter was trained on: compare their sha256.

    Shapes match across fine-tunes of one architecture and directory names say nothing about
    content, so the recorded digest of the aligned weights is compared with the local checkpoint's.
    """
    recorded = (subspace.metadata.get("aligned") or {}).get("sha256")
    source = (subspace.metadata.get("aligned") or {}).get("source")
    if aligned is None:  # the adapter's model is not here (a Hub id): its name is the only clue left
        if source and adapter.base_model and source != adapter.base_model:
            warnings.warn(
                f"{adapter.path}: the adapter was trained on {adapter.base_model} but {subspace_file_name(subspace)} "
                f"was computed from {source} (their weights cannot be compared here)",
                CsuloraWarning,
                stacklevel=3,
            )
        return
    meta = getattr(subspace.bases, "meta", {})
    per_module = {name: ((meta.get(name) or {}).get("sha256") or {}).get("aligned") for name in subspace.modules()}
    try:
        if all(per_module.values()) and per_module:
            # another fine-tune differs in every module: a few modules' digests settle it cheaply
            names = sorted({*_spread(list(per_module))})
            differs = any(_weight_digest(aligned, name) != per_module[name] for name in names)
        elif recorded:
            differs = aligned_digest(aligned, subspace.modules()) != recorded
        else:
            return
    except CsuloraError:
        differs = True
    if differs:
        warnings.warn(
            f"{subspace_file_name(subspace)}: computed from other aligned weights than {aligned.path} "
            f"(the adapter's model): the subspace may belong to another model",
            CsuloraWarning,
            stacklevel=3,
        )
