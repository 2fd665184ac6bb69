"""A (base, aligned) checkpoint pair: opening it, checking it is one architecture, reading ``V``.

``V = W_aligned - W_base`` is read module by module (``read_delta``: both weights read and digested,
``V`` in float32, checked finite); ``subspace_modules`` says which modules, ``check_pair`` that both
checkpoints have them in the same shapes. ``open_pair`` opens the pair an adapter is corrected with
(the aligned checkpoint defaults to the adapter's model; another one must hold the same weights).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .adapter import Adapter
from .checkpoint import Checkpoint, sample_digest, tensor_digest
from .errors import CsuloraError, CsuloraWarning
from .safe_output import real_path
from .svd import displacement_energy
from .threads import ordered_map

NEGLIGIBLE = 1e-6  # ||V||_F below this fraction of ||W_aligned||_F is rounding noise, not alignment


@dataclass(frozen=True)
class Pair:
    """The (base, aligned) checkpoints an adapter's alignment displacement comes from."""

    base: Checkpoint
    aligned: Checkpoint


def open_pair(
    adapter: Adapter,
    base: str | Path | None,
    aligned: str | Path | None,
    allow_pickle: bool,
    required: str | None = None,
    verify: bool = False,
) -> Pair | None:
    """Open (base, aligned) when ``base`` is given (aligned defaults to the adapter's model); else None.

    ``required``: the error to raise when the caller cannot do without the pair. ``verify``: an
    ``aligned`` other than the adapter's model must hold its weights, every target module's in full.
    """
    if base is None:
        if required:
            raise CsuloraError(required)
        return None
    aligned_source = aligned or adapter.base_model
    if aligned_source is None:
        raise CsuloraError(
            f"{adapter.path}: no base_model_name_or_path in the config; give the aligned checkpoint (aligned=...)"
        )
    pair = Pair(Checkpoint(base, allow_pickle=allow_pickle), Checkpoint(aligned_source, allow_pickle=allow_pickle))
    check_pair(pair.base, pair.aligned, adapter.modules)
    if aligned is not None:
        _warn_if_not_trained_on(adapter, pair.aligned, allow_pickle, verify)
    return pair


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


def read_delta(base: Checkpoint, aligned: Checkpoint, module: str) -> Delta:
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
    read = functools.partial(read_delta, base, aligned)
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
        raise CsuloraError("say which modules: targets=... (q_proj,v_proj,...) or adapter=...")
    found = aligned.linear_modules(targets)
    if not found:
        raise CsuloraError(f"{aligned.path}: no 2-D weight matches the targets {', '.join(targets)}")
    return found


def _check_adapter_fits(adapter: Adapter, aligned: Checkpoint, module: str) -> None:
    """The adapter's update for ``module`` must have the shape of the checkpoint's weight."""
    stored = tuple(aligned.shape(aligned.weight_key(module)))
    adapter.stored_transposed(module, stored, aligned.model_type, f"the weight in {aligned.path}")


def local_checkpoint(source: str | Path | None, allow_pickle: bool) -> Checkpoint | None:
    """A checkpoint at a local path, or None (a Hub id, or nothing readable there)."""
    if not source or not Path(source).expanduser().is_dir():
        return None
    try:
        return Checkpoint(source, allow_pickle=allow_pickle)
    except CsuloraError:
        return None


def weight_digest(ckpt: Checkpoint, module: str) -> str:
    return tensor_digest(ckpt.read(ckpt.weight_key(module))).hex()


def sampled_rows_digest(ckpt: Checkpoint, module: str) -> str:
    return ckpt.sample_digest(ckpt.weight_key(module)).hex()


def _first_difference(one: Checkpoint, other: Checkpoint, modules: list[str], verify: bool) -> str | None:
    """The first of ``modules`` whose weights differ between two checkpoints (None: none differs).

    With ``verify`` each whole weight is compared (by sha256), else its sampled rows
    (``checkpoint.sample_rows``): a fine-tune moves every row, so a few per module show it.
    """
    digest = weight_digest if verify else sampled_rows_digest
    for module in modules:
        try:
            if digest(one, module) != digest(other, module):
                return module
        except CsuloraError:
            return module
    return None


def _warn_if_not_trained_on(adapter: Adapter, aligned: Checkpoint, allow_pickle: bool, verify: bool = False) -> None:
    """An ``aligned`` checkpoint other than the adapter's ``base_model_name_or_path``: fine if the weights are the same.

    Every module the adapter targets is compared: its sampled rows, or with ``verify`` its whole weight.
    """
    claimed = adapter.base_model
    if not claimed or real_path(claimed) == real_path(aligned.path) or claimed == aligned.source:
        return
    trained_on = local_checkpoint(claimed, allow_pickle)
    if trained_on is None:
        if verify:
            raise CsuloraError(
                f"{adapter.path}: verify=True: the adapter was trained on {claimed}, which is not a local checkpoint, "
                f"so its weights cannot be compared with the aligned checkpoint (aligned=...) {aligned.source}"
            )
        warnings.warn(
            f"{adapter.path}: the adapter was trained on {claimed} but the aligned checkpoint (aligned=...) is "
            f"{aligned.source} (cannot compare their weights here)",
            CsuloraWarning,
            stacklevel=3,
        )
        return
    differs = _first_difference(trained_on, aligned, adapter.modules, verify)
    if differs is None:
        return
    message = (
        f"{adapter.path}: the adapter was trained on {claimed} but the aligned checkpoint (aligned=...) is "
        f"{aligned.source} and their weights differ (module {differs})"
    )
    if verify:
        raise CsuloraError(f"verify=True: {message}")
    warnings.warn(message, CsuloraWarning, stacklevel=3)
