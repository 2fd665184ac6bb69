"""Streaming a (base, aligned) checkpoint pair into per-module safety subspaces.

Module by module: the displacement ``V = W_aligned - W_base`` is read, its basis computed, and ``V``
freed, two modules at a time on two worker threads, so memory holds two modules, never a model.
``compute_subspace`` collects the bases into a ``Subspace``; ``correct`` consumes them one by one
(``stream_bases``) without ever holding the whole subspace.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .adapter import Adapter, load_adapter
from .checkpoint import Checkpoint, sample_digest, tensor_digest
from .device import resolve_device
from .errors import CsuloraError, CsuloraWarning
from .memory import release_freed_memory
from .subspace import Subspace, chained_digests
from .svd import ModuleBasis, SubspaceSettings, displacement_energy, module_basis
from .threads import available_threads, ordered_map

MODULE_WORKERS = 2  # modules read and decomposed at once (memory holds this many)
NEGLIGIBLE = 1e-6  # ||V||_F below this fraction of ||W_aligned||_F is rounding noise, not alignment


class Delta(NamedTuple):
    """One module's displacement ``V = W_aligned - W_base`` (float32, stored layout)."""

    module: str
    V: torch.Tensor
    digest_base: bytes
    digest_aligned: bytes
    sample_base: bytes  # the digests of the sampled rows (``checkpoint.sample_digest``)
    sample_aligned: bytes
    negligible: bool  # V is zero, or numerically zero relative to the weight
    energy: float  # ||V||_F^2


def _read_delta(base: Checkpoint, aligned: Checkpoint, module: str) -> Delta:
    """``V = W_aligned - W_base`` for one module in float32 (stored layout), with content digests."""
    key_a = aligned.weight_key(module)
    key_b = base.weight_key(module)
    W_a = aligned.read(key_a)
    W_b = base.read(key_b)
    if W_a.shape != W_b.shape:
        raise CsuloraError(
            f"module {module}: {aligned.path} has shape {tuple(W_a.shape)} but {base.path} has "
            f"{tuple(W_b.shape)}; base and aligned must be the same architecture"
        )
    digests = tensor_digest(W_b), tensor_digest(W_a), sample_digest(W_b), sample_digest(W_a)
    V = float32_difference(W_a, W_b)
    # V is finite iff both weights are (or their difference overflowed), and its energy is finite iff
    # V is: one pass over V gives both the check and the size of V;
    # the weights are checked elementwise only when something is wrong, to name the culprit
    energy = displacement_energy(V)
    norm_v = math.sqrt(energy)
    if not math.isfinite(norm_v):
        for W, ckpt in ((W_a, aligned), (W_b, base)):
            if not torch.isfinite(W).all():
                raise CsuloraError(f"{ckpt.path}: module {module} has NaN or Inf weights")
        if not torch.isfinite(V).all():
            raise CsuloraError(f"module {module}: aligned - base overflows float32 ({aligned.path}, {base.path})")
    # the weight's norm takes another pass: only when V is tiny (RMS < NEGLIGIBLE; trained displacements
    # are ~1e-4 of weights' ~1e-2 RMS) is it needed to tell rounding noise from a small displacement
    negligible = norm_v == 0 or (
        norm_v <= NEGLIGIBLE * math.sqrt(V.numel())
        and norm_v
        <= NEGLIGIBLE * float(torch.linalg.vector_norm(W_a, dtype=torch.promote_types(W_a.dtype, torch.float32)))
    )
    return Delta(module, V, *digests, negligible, energy)


def float32_difference(minuend: torch.Tensor, subtrahend: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``minuend - subtrahend`` in float32 (each weight cast to float32, then subtracted), a new tensor.

    bfloat16 weights (most released checkpoints) go through numpy a block of rows at a time: a
    bfloat16 is the top half of a float32, so a 16-bit shift casts it exactly, faster than torch's
    cast on CPU (docs/performance.md), and only a block of the subtrahend is ever float32. The same
    bits as torch's (where both are NaN the payload may differ; a NaN in V is an error anyway).
    Overflow and NaN are left to the caller's checks, silently, as torch leaves them.
    """
    bfloat16 = minuend.dtype == subtrahend.dtype == torch.bfloat16
    if not bfloat16 or minuend.device.type != "cpu" or minuend.dim() == 0:
        V = minuend.to(torch.float32, copy=True)  # a float32 minuend must not be modified in place below
        V -= subtrahend  # type promotion reads it in its own dtype: no float32 copy of the subtrahend
        return V
    high, low = (W.contiguous().view(torch.int16).numpy().view(np.uint16) for W in (minuend, subtrahend))
    bits, block = np.empty(high.shape, np.uint32), np.empty((rows, *high.shape[1:]), np.uint32)
    difference, low_block = bits.view(np.float32), block.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # numpy would warn where torch is silent
        for start in range(0, len(high), rows):
            end = min(start + rows, len(high))
            np.left_shift(high[start:end], 16, out=bits[start:end], dtype=np.uint32)
            np.left_shift(low[start:end], 16, out=block[: end - start], dtype=np.uint32)
            np.subtract(difference[start:end], low_block[: end - start], out=difference[start:end])
    return torch.from_numpy(difference)


def iter_deltas(base: Checkpoint, aligned: Checkpoint, modules: list[str]) -> Iterator[Delta]:
    """Yield each module's displacement, reading the next module while the caller works on this one."""
    read = functools.partial(_read_delta, base, aligned)
    return ordered_map(read, modules, workers=1, threads_each=torch.get_num_threads())


def check_pair(base: Checkpoint, aligned: Checkpoint, modules: list[str]) -> None:
    """Base and aligned must be one architecture: same ``model_type``, same shapes for ``modules``."""
    if base.model_type and aligned.model_type and base.model_type != aligned.model_type:
        raise CsuloraError(
            f"{base.path} is a {base.model_type} model but {aligned.path} is a {aligned.model_type} model; "
            "base and aligned must be the same architecture"
        )
    for module in modules:
        shape_b, shape_a = base.shape(base.weight_key(module)), aligned.shape(aligned.weight_key(module))
        if shape_b != shape_a:
            raise CsuloraError(
                f"module {module}: {aligned.path} has shape {shape_a} but {base.path} has {shape_b}; "
                "base and aligned must be the same architecture"
            )


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


def subspace_modules(
    aligned: Checkpoint, *, modules: list[str] | None, targets: list[str] | None, adapter: Adapter | None
) -> list[str]:
    """Checkpoint module names to decompose: explicit ones, an adapter's, or those matching targets."""
    if adapter is not None:
        modules = adapter.modules
        for module in modules:
            _check_adapter_fits(adapter, aligned, module)
    if modules is not None:
        return [aligned.module_name(module) for module in modules]
    if not targets:
        raise CsuloraError("say which modules: --targets q_proj,v_proj,... or --adapter DIR")
    found = aligned.linear_modules(targets)
    if not found:
        raise CsuloraError(f"{aligned.path}: no 2-D weight matches the targets {', '.join(targets)}")
    return found


def _check_adapter_fits(adapter: Adapter, aligned: Checkpoint, module: str) -> None:
    """The adapter's update for ``module`` must have the shape of the checkpoint's weight."""
    stored = tuple(aligned.shape(aligned.weight_key(module)))
    adapter.stored_transposed(module, stored, aligned.model_type, f"the weight in {aligned.path}")


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
        return name, _basis_with_digests(_read_delta(base, aligned, name), settings, target)

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
