"""Streaming a (base, aligned) checkpoint pair (``csulora.pair``) into per-module safety subspaces.

Module by module: the displacement ``V = W_aligned - W_base`` is read, its basis computed, and ``V``
freed, two modules at a time on two worker threads, so memory holds two modules, never a model.
``compute_subspace`` collects the bases into a ``Subspace``; ``correct`` consumes them one by one
(``stream_bases``) without ever holding the whole subspace.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .adapter import Adapter, load_adapter
from .checkpoint import Checkpoint
from .device import resolve_device
from .errors import CsuloraError, CsuloraWarning
from .memory import release_freed_memory
from .pair import Delta, check_pair, read_delta, subspace_modules
from .subspace import Subspace, chained_digests
from .svd import ModuleBasis, SubspaceSettings, module_basis
from .threads import available_threads, ordered_map

MODULE_WORKERS = 2  # modules read and decomposed at once (memory holds this many)


def empty_basis(m: int, n: int, total_energy: float) -> ModuleBasis:
    """No subspace (k = 0): what a module whose alignment displacement is zero gets."""
    return ModuleBasis(torch.zeros(m, 0), torch.zeros(n, 0), torch.zeros(0), total_energy)


def warn_unaligned(modules: list[str], total: int, where: str) -> None:
    """Modules with V = 0 keep their update; when every module has V = 0 there is nothing to do."""
    if not modules:
        return
    if len(modules) == total:
        raise CsuloraError(
            f"{where}: aligned - base is zero in every module ({', '.join(modules[:3])}"
            f"{', ...' if len(modules) > 3 else ''}): is the aligned checkpoint the base itself?"
        )
    for module in modules:
        warnings.warn(
            f"{where}: module {module}: aligned - base is zero, so no safety subspace; its update is left unchanged",
            CsuloraWarning,
            stacklevel=3,
        )


def stream_bases(
    base: Checkpoint,
    aligned: Checkpoint,
    names: list[str],
    settings: SubspaceSettings,
    progress: bool = False,
    device: str | None = None,
) -> Iterator[tuple[str, ModuleBasis]]:
    """Each module's basis in the order of ``names``, two modules at a time.

    Each module is read and decomposed on its own worker thread, the two workers sharing the
    intra-op threads: while one reads, the other computes, and the sketch's narrow products run on
    one thread each instead of two threads waiting for each other (``threads.ordered_map``). Memory
    holds two modules' weights, displacements and sketches at most (when both workers read at
    once). Each basis records the sha256 of the two weights it comes from (``stream_metadata``
    chains them).
    """
    target = resolve_device(device)
    if target.type == "cuda" and target.index is None:  # the current GPU is per thread: the caller's
        target = torch.device("cuda", torch.cuda.current_device())
    threads_each = max(1, available_threads() // MODULE_WORKERS)

    def basis_of(name: str) -> tuple[str, ModuleBasis]:
        return name, _basis_with_digests(read_delta(base, aligned, name), settings, target)

    with tqdm(total=len(names), desc="subspace", disable=not progress) as bar:
        for name, basis in ordered_map(basis_of, names, MODULE_WORKERS, threads_each):
            yield name, basis
            bar.update()


def _basis_with_digests(delta: Delta, settings: SubspaceSettings, target: torch.device) -> ModuleBasis:
    """One module's basis (on the CPU) with the weights' digests; ``V`` is freed before it returns."""
    V, sha256 = delta.V, {"base": delta.digest_base.hex(), "aligned": delta.digest_aligned.hex()}
    samples = {"base": delta.sample_base.hex(), "aligned": delta.sample_aligned.hex()}
    m, n = V.shape
    if delta.negligible:  # no direction to protect: do not invent one from rounding noise
        basis = empty_basis(m, n, delta.energy)
    else:
        basis = module_basis(V.to(target), settings, delta.energy)
    del V, delta
    release_freed_memory()
    return replace(
        basis,
        U=basis.U.cpu(),
        R=basis.R.cpu(),
        sigma=basis.sigma.cpu(),
        sha256=sha256,
        samples=samples,
    )


def stream_metadata(
    base: Checkpoint, aligned: Checkpoint, settings: SubspaceSettings, module_digests: Sequence[dict | None]
) -> dict:
    """Where streamed bases come from: sources, settings, and the weights' digests chained over every module.

    ``module_digests``: each streamed basis's ``sha256``, all of them, in order.
    """
    digests = chained_digests(module_digests)
    return {
        "csulora_version": __version__,
        "base": {"source": base.source, "sha256": digests["base"]},
        "aligned": {"source": aligned.source, "sha256": digests["aligned"]},
        "model_type": aligned.model_type,
        "settings": asdict(settings),
        "layout": "stored",
    }


def compute_subspace(
    base: str | Path | Checkpoint,
    aligned: str | Path | Checkpoint,
    *,
    modules: list[str] | None = None,
    targets: list[str] | None = None,
    adapter: str | Path | Adapter | None = None,
    settings: SubspaceSettings | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    device: str | None = None,
    shard: tuple[int, int] | None = None,
) -> Subspace:
    """Stream both checkpoints and compute each module's safety subspace.

    Bases are in the checkpoint's stored layout (``out x in`` for ``nn.Linear``; a GPT-2 ``Conv1D``
    stores ``in x out``, flipped back when correcting, by PEFT's rule: ``Adapter.stored_transposed``).
    ``shard=(I, N)`` computes only shard I of N (see ``csulora.shards``).
    """
    settings = settings or SubspaceSettings()
    base = base if isinstance(base, Checkpoint) else Checkpoint(base, allow_pickle=allow_pickle)
    aligned = aligned if isinstance(aligned, Checkpoint) else Checkpoint(aligned, allow_pickle=allow_pickle)
    if adapter is not None and not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    names = subspace_modules(aligned, modules=modules, targets=targets, adapter=adapter)
    check_pair(base, aligned, names)
    shard_info = {}
    if shard is not None:
        from .shards import SHARD_KEY, shard_metadata, shard_modules

        shard_info = {SHARD_KEY: shard_metadata(base, aligned, names, *shard)}
        names = shard_modules(aligned, names, *shard)
    bases = dict(stream_bases(base, aligned, names, settings, progress, device))
    zero = [name for name, basis in bases.items() if basis.k == 0]
    # one shard sees only its own modules: V = 0 in all of them is not V = 0 everywhere
    warn_unaligned(zero, len(names) if shard is None else len(names) + 1, str(aligned.path))
    metadata = stream_metadata(base, aligned, settings, [basis.sha256 for basis in bases.values()])
    return Subspace(bases, metadata | shard_info)
