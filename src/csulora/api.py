"""The library's entry points: compute a subspace, correct an adapter, inspect an adapter.

These do the I/O (checkpoints, adapters, output directories) around the pure math in
``correct``, ``subspace`` and ``methods``; the CLI is a thin shell over them.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapter import CONFIG_NAME, Adapter, load_adapter, write_adapter
from .checkpoint import Checkpoint, match_module, tensor_digest
from .correct import Corrected, LoraFactors, decompose, frobenius_sq
from .errors import CsuloraError, CsuloraWarning
from .io_utils import atomic_dir, real_path, reserve_output, strict_json
from .memory import release_freed_memory
from .methods import DEFAULT_METHOD, Method, MethodParams, ModuleInputs, Needs, Settings, get_method
from .subspace import ADAPTIVE_START_RANK, ModuleBasis, Subspace, SubspaceSettings, load_subspace, module_basis
from .threads import correction_flops, sketch_flops, threads_for, torch_threads

REPORT_NAME = "csulora_report.json"


# -- the subspace --------------------------------------------------------------------------------
NEGLIGIBLE = 1e-6  # ||V||_F below this fraction of ||W_aligned||_F is rounding noise, not alignment


class Delta(NamedTuple):
    """One module's displacement ``V = W_aligned - W_base`` (float32, stored layout)."""

    module: str
    V: torch.Tensor
    digest_base: bytes
    digest_aligned: bytes
    negligible: bool  # V is zero, or numerically zero relative to the weight


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
    digests = tensor_digest(W_b), tensor_digest(W_a)
    V = W_a.to(torch.float32, copy=True)  # a float32 W_a must not be modified in place below
    V -= W_b  # type promotion reads W_b in its own dtype: no float32 copy of the base weight
    # V is finite iff both weights are (or their difference overflowed), and its norm is finite iff V
    # is (or the sum of squares overflowed): one pass over V gives both the check and the size of V;
    # the weights are checked elementwise only when something is wrong, to name the culprit
    norm_v = float(torch.linalg.vector_norm(V))
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
    return Delta(module, V, *digests, negligible)


def iter_deltas(base: Checkpoint, aligned: Checkpoint, modules: list[str]) -> Iterator[Delta]:
    """Yield each module's displacement, reading the next module while the caller works on this one."""
    if not modules:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_delta, base, aligned, modules[0])
        for i in range(len(modules)):
            result = pending.result()
            if i + 1 < len(modules):
                pending = pool.submit(_read_delta, base, aligned, modules[i + 1])
            yield result


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
        return [aligned.weight_key(module)[: -len(".weight")] for module in modules]
    if not targets:
        raise CsuloraError("say which modules: --targets q_proj,v_proj,... or --adapter DIR")
    found = aligned.linear_modules(targets)
    if not found:
        raise CsuloraError(f"{aligned.path}: no 2-D weight matches the targets {', '.join(targets)}")
    return found


def _check_adapter_fits(adapter: Adapter, aligned: Checkpoint, module: str) -> None:
    """The adapter's update for ``module`` must have the shape of the checkpoint's weight."""
    m = adapter.state[adapter.key(module, "B")].shape[0]
    n = adapter.state[adapter.key(module, "A")].shape[1]
    stored = aligned.shape(aligned.weight_key(module))
    expected = (n, m) if adapter.fan_in_fan_out else (m, n)
    if tuple(stored) != expected:
        raise CsuloraError(
            f"{adapter.path}: module {module} updates a {m} x {n} weight but {aligned.path} stores "
            f"{' x '.join(map(str, stored))}; was the adapter trained on a different model?"
        )


class _StreamedBases(Mapping):
    """Module bases computed on first access, in checkpoint order, while the next module is read.

    Correcting with ``--base`` walks the adapter's modules once, so only the module in hand (and the
    one being prefetched) is ever in memory, never the whole subspace. The content digests of both
    checkpoints are complete once the last module has been computed.
    """

    def __init__(self, base: Checkpoint, aligned: Checkpoint, names: list[str], settings, metadata, progress, device):
        self.device = device
        self.names = names
        self.settings = settings
        self.metadata = metadata
        self.deltas = iter_deltas(base, aligned, names)
        self.bar = tqdm(total=len(names), desc="subspace", disable=not progress)
        self.digests = hashlib.sha256(), hashlib.sha256()
        self.position = 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str):
        if self.position >= len(self.names) or self.names[self.position] != name:
            raise KeyError(f"{name}: streamed bases are read once, in order")
        _, V, digest_b, digest_a, negligible = next(self.deltas)
        m, n = V.shape
        if negligible:  # no direction to protect: do not invent one from rounding noise
            basis = empty_basis(m, n, float(torch.linalg.vector_norm(V)) ** 2)
        else:
            width = (self.settings.rank or ADAPTIVE_START_RANK) + self.settings.oversample
            with torch_threads(threads_for(sketch_flops(m, n, width, self.settings.power_iters))):
                basis = module_basis(V.to(self.device), self.settings)
        del V
        release_freed_memory()
        basis = replace(
            basis,
            U=basis.U.cpu(),
            R=basis.R.cpu(),
            sigma=basis.sigma.cpu(),
            sha256={"base": digest_b.hex(), "aligned": digest_a.hex()},
        )
        self.digests[0].update(digest_b)
        self.digests[1].update(digest_a)
        self.position += 1
        self.bar.update()
        if self.position == len(self.names):
            self.bar.close()
            self.metadata["base"]["sha256"] = self.digests[0].hexdigest()
            self.metadata["aligned"]["sha256"] = self.digests[1].hexdigest()
        return basis


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present; the SVDs run there, everything else on the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise CsuloraError(f"--device {device!r} is not a torch device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CsuloraError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def stream_subspace(
    base: Checkpoint,
    aligned: Checkpoint,
    names: list[str],
    settings: SubspaceSettings,
    progress: bool = False,
    device: str | None = None,
) -> Subspace:
    """A subspace whose bases are computed as they are first read, in the order of ``names``."""
    metadata = {
        "csulora_version": __version__,
        "base": {"source": base.source, "sha256": None},
        "aligned": {"source": aligned.source, "sha256": None},
        "settings": asdict(settings),
        "layout": "stored",
    }
    bases = _StreamedBases(base, aligned, names, settings, metadata, progress, resolve_device(device))
    return Subspace(bases, metadata)


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
    stores ``in x out``, and the adapter's ``fan_in_fan_out`` flips it back when correcting).
    ``shard=(I, N)`` computes only shard I of N (see ``csulora.shards``).
    """
    settings = settings or SubspaceSettings()
    base = base if isinstance(base, Checkpoint) else Checkpoint(base, allow_pickle=allow_pickle)
    aligned = aligned if isinstance(aligned, Checkpoint) else Checkpoint(aligned, allow_pickle=allow_pickle)
    if adapter is not None and not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    names = subspace_modules(aligned, modules=modules, targets=targets, adapter=adapter)
    check_pair(base, aligned, names)
    shard_info = None
    if shard is not None:
        from .shards import shard_metadata, shard_modules

        shard_info = shard_metadata(base, aligned, names, *shard)
        names = shard_modules(aligned, names, *shard)
    streamed = stream_subspace(base, aligned, names, settings, progress, device)
    if shard_info is not None:
        streamed.metadata["shard"] = shard_info
    subspace = Subspace(dict(streamed.bases.items()), streamed.metadata)
    zero = [name for name in names if subspace[name].k == 0]
    # one shard sees only its own modules: V = 0 in all of them is not V = 0 everywhere
    warn_unaligned(zero, len(names) if shard is None else len(names) + 1, str(aligned.path))
    return subspace


# -- correcting ----------------------------------------------------------------------------------
def _subspace_file(subspace: Subspace) -> str:
    return str(subspace.path or "the subspace")


def _oriented_basis(subspace: Subspace, adapter: Adapter, module: str, m: int, n: int):
    """The module's ``U: m x k``, ``R: n x k`` in the update's orientation, shape-checked."""
    name = match_module(module, subspace.modules())
    if name is None:
        raise CsuloraError(
            f"{_subspace_file(subspace)}: adapter module {module} has no entry in the subspace file; "
            f"recompute it with --adapter {adapter.path}"
        )
    basis = subspace[name]
    U, R = (basis.R, basis.U) if adapter.fan_in_fan_out else (basis.U, basis.R)
    if U.shape[0] != m or R.shape[0] != n:
        raise CsuloraError(
            f"{adapter.path}: module {module} updates a {m} x {n} weight but the subspace "
            f"{_subspace_file(subspace)} is for {U.shape[0]} x {R.shape[0]}; was the adapter trained on another model?"
        )
    return name, U.to(torch.float64), R.to(torch.float64)


def _oriented_delta(V: torch.Tensor, adapter: Adapter, module: str, m: int, n: int) -> torch.Tensor:
    V = V.T if adapter.fan_in_fan_out else V
    if tuple(V.shape) != (m, n):
        raise CsuloraError(
            f"{adapter.path}: module {module} updates a {m} x {n} weight but the checkpoint weight is "
            f"{V.shape[0]} x {V.shape[1]}; was the adapter trained on a different model?"
        )
    return V.to(torch.float64)


def is_corrected_adapter(path: Path) -> bool:
    """Whether directory ``path`` is an output of ``correct``: a PEFT adapter with our report, no subfolders."""
    return (
        path.is_dir()
        and (path / REPORT_NAME).is_file()
        and (path / CONFIG_NAME).is_file()
        and not any(item.is_dir() for item in path.iterdir())
    )


@torch_threads(1)  # k-wide and r x r products; bigger work asks for more threads (threads_for)
def correct_adapter(
    adapter: str | Path | Adapter,
    out: str | Path,
    *,
    method: str = DEFAULT_METHOD,
    params: MethodParams | Mapping[str, Any] | Settings | None = None,
    subspace: str | Path | Subspace | None = None,
    base: str | Path | None = None,
    aligned: str | Path | None = None,
    settings: SubspaceSettings | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
    device: str | None = None,
) -> dict:
    """Correct ``adapter`` and write a PEFT adapter plus ``csulora_report.json`` into ``out``.

    Returns the report. The subspace comes from ``subspace`` (a file or object) or is computed from
    ``base`` and ``aligned`` (default: the adapter's ``base_model_name_or_path``). The output is
    checked (writable, not an input, replaceable) before any work is done.
    """
    spec = get_method(method)
    method_settings = spec.settings_from(params)
    needs = spec.needs_for(method_settings)
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=allow_pickle)
    required = (
        f"--method {method} needs the full alignment matrix: pass --base (and --aligned)"
        if needs is Needs.DELTA
        else None
    )
    base_ckpt, aligned_ckpt = _open_pair(adapter, base, aligned, allow_pickle, required)
    subspace_path = subspace if isinstance(subspace, str | Path) else getattr(subspace, "path", None)
    inputs = [adapter.path, subspace_path] + [c.path for c in (base_ckpt, aligned_ckpt) if c is not None]
    with reserve_output(out, force=force, owned=is_corrected_adapter, inputs=inputs, kind="dir"):
        results, sources = _run_method(
            adapter,
            spec,
            method_settings,
            needs,
            subspace,
            base_ckpt,
            aligned_ckpt,
            aligned,
            settings,
            progress,
            device,
        )
        unchanged = {module: result for module, result in results.items() if result.info.get("unchanged")}
        if spec.finalize is not None:
            rest = {module: result for module, result in results.items() if module not in unchanged}
            results = spec.finalize(adapter.factors, rest, method_settings) | unchanged
        corrected = {module: results[module].lora for module in adapter.modules}
        modules_report = {
            sources["names"][module]: _module_report(
                results[module].info, sources["k"].get(module), adapter.rank(module), results[module].lora.rank
            )
            for module in adapter.modules
        }
        report = {
            "method": method,
            "params": method_settings.as_dict(),
            "csulora_version": __version__,
            "adapter": str(adapter.path),
            "subspace": sources["subspace"],
            "energy_before": sum(_energy(adapter.factors(m)) for m in adapter.modules),
            "energy_after": sum(_energy(corrected[m]) for m in adapter.modules),
            "unchanged_modules": [sources["names"][module] for module in adapter.modules if module in unchanged],
            "modules": modules_report,
        }
        with atomic_dir(out, force=force, owned=is_corrected_adapter, inputs=inputs) as tmp:
            write_adapter(adapter, tmp, corrected)
            (tmp / REPORT_NAME).write_text(strict_json(report) + "\n")
    return report


def _energy(lora: LoraFactors) -> float:
    return lora.scale**2 * frobenius_sq(lora.B, lora.A)


def _module_report(info: dict, k, rank_in: int, rank_out: int) -> dict:
    report = {
        "k": k,
        "rho_f": info.get("rho_f"),
        "rho_h": info.get("rho_h"),
        "rho_o": info.get("rho_o"),
        "kappa_h": info.get("kappa_h"),
        "kappa_o": info.get("kappa_o"),
        "rank_in": rank_in,
        "rank_out": rank_out,
        "truncation_error": info.get("truncation_error", 0.0),
    }
    extra = {key: value for key, value in info.items() if key not in report and key != "energy"}
    return report | {"energy": info.get("energy")} | extra


def _open_pair(adapter: Adapter, base, aligned, allow_pickle: bool, required: str | None):
    """Open (base, aligned) checkpoints when ``base`` is given; aligned defaults to the adapter's model."""
    if base is None:
        if required:
            raise CsuloraError(required)
        return None, None
    aligned_source = aligned or adapter.base_model
    if aligned_source is None:
        raise CsuloraError(f"{adapter.path}: no base_model_name_or_path in the config; pass --aligned")
    base_ckpt = Checkpoint(base, allow_pickle=allow_pickle)
    aligned_ckpt = Checkpoint(aligned_source, allow_pickle=allow_pickle)
    check_pair(base_ckpt, aligned_ckpt, adapter.modules)
    if aligned is not None:
        _warn_if_not_trained_on(adapter, aligned_ckpt, allow_pickle)
    return base_ckpt, aligned_ckpt


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


def _adapter_subspace(adapter, subspace, base_ckpt, aligned_ckpt, aligned, settings, progress, device=None) -> Subspace:
    """The subspace to correct ``adapter`` with: the given one, or computed for its modules."""
    if subspace is not None:
        subspace = subspace if isinstance(subspace, Subspace) else load_subspace(subspace)
        _warn_if_other_model(adapter, subspace, aligned_ckpt or _local_checkpoint(aligned or adapter.base_model, False))
        return subspace
    if base_ckpt is None:
        raise CsuloraError("pass --subspace SUB, or --base B (and --aligned A) to compute it")
    names = subspace_modules(aligned_ckpt, modules=None, targets=None, adapter=adapter)
    return stream_subspace(base_ckpt, aligned_ckpt, names, settings or SubspaceSettings(), progress, device)


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
                f"{adapter.path}: the adapter was trained on {adapter.base_model} but {_subspace_file(subspace)} "
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
            f"{_subspace_file(subspace)}: computed from other aligned weights than {aligned.path} "
            f"(the adapter's model): the subspace may belong to another model",
            CsuloraWarning,
            stacklevel=3,
        )


def _unchanged(lora: LoraFactors) -> Corrected:
    """A module with V = 0 keeps its update: there is no safety direction to protect there."""
    info = {"energy": _energy(lora), "kappa_h": 1.0, "kappa_o": 1.0, "unchanged": "aligned - base is zero here"}
    return Corrected(LoraFactors(lora.B.float(), lora.A.float(), lora.scale), info)


def _run_method(
    adapter,
    spec: Method,
    method_settings: Settings,
    needs: Needs,
    subspace,
    base_ckpt,
    aligned_ckpt,
    aligned,
    settings,
    progress,
    device,
):
    """Apply ``method`` module by module; returns the per-module results and where inputs came from."""
    needs_basis = needs is Needs.BASIS
    sources: dict[str, Any] = {"names": {}, "k": {}, "subspace": None}
    if needs_basis:
        subspace = _adapter_subspace(adapter, subspace, base_ckpt, aligned_ckpt, aligned, settings, progress, device)
        sources["subspace"] = subspace.metadata
    deltas = None
    if needs is Needs.DELTA:
        names = subspace_modules(aligned_ckpt, modules=adapter.modules, targets=None, adapter=None)
        deltas = iter_deltas(base_ckpt, aligned_ckpt, names)

    results, unaligned = {}, []
    for module in tqdm(adapter.modules, desc=spec.name, disable=not progress):
        lora = adapter.factors(module)
        m, n = lora.B.shape[0], lora.A.shape[1]
        name, zero = None, False
        U = R = V = None
        if needs_basis:
            name, U, R = _oriented_basis(subspace, adapter, module, m, n)
            sources["k"][module] = U.shape[1]
            zero = U.shape[1] == 0
        if deltas is not None:
            delta = next(deltas)
            name, V = delta.module, _oriented_delta(delta.V, adapter, module, m, n)
            zero = zero or delta.negligible
        if name is None:
            name = aligned_ckpt.weight_key(module)[: -len(".weight")] if aligned_ckpt else module
        sources["names"][module] = name
        if zero:
            unaligned.append(name)
            results[module] = _unchanged(lora)
            continue
        k = U.shape[1] if U is not None else 0
        with torch_threads(threads_for(correction_flops(m, n, lora.rank, k, V is not None))):
            result = spec.correct(lora, ModuleInputs(module, U, R, V), method_settings)
            new, info = result.lora, result.info
        # float32 is ample for storage (adapters are saved in fp32 or lower) and halves peak memory
        results[module] = Corrected(LoraFactors(new.B.float(), new.A.float(), new.scale), info)
    where = _subspace_file(subspace) if needs_basis and subspace is not None and base_ckpt is None else None
    warn_unaligned(unaligned, len(adapter.modules), where or str(aligned_ckpt.path if aligned_ckpt else adapter.path))
    return results, sources


# -- inspecting ----------------------------------------------------------------------------------
@torch_threads(1)
def inspect_adapter(
    adapter: str | Path | Adapter,
    *,
    subspace: str | Path | Subspace | None = None,
    base: str | Path | None = None,
    aligned: str | Path | None = None,
    settings: SubspaceSettings | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    device: str | None = None,
) -> list[dict]:
    """The per-module decomposition of ``adapter`` (nothing is written): one row per module."""
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=allow_pickle)
    base_ckpt, aligned_ckpt = _open_pair(adapter, base, aligned, allow_pickle, None)
    subspace = _adapter_subspace(adapter, subspace, base_ckpt, aligned_ckpt, aligned, settings, progress, device)
    rows, unaligned = [], []
    for module in adapter.modules:
        lora = adapter.factors(module)
        name, U, R = _oriented_basis(subspace, adapter, module, lora.B.shape[0], lora.A.shape[1])
        if U.shape[1] == 0:
            unaligned.append(name)
        d = decompose(lora, U, R)
        rows.append(
            {
                "module": name,
                "layer": _layer_index(name),
                "k": U.shape[1],
                "rank": lora.rank,
                "energy": d.energy,
                "rho_f": d.rho_f,
                "rho_h": d.rho_h,
                "rho_o": d.rho_o,
            }
        )
    warn_unaligned(
        unaligned, len(adapter.modules), _subspace_file(subspace) if base_ckpt is None else str(aligned_ckpt.path)
    )
    return rows


def _layer_index(module: str) -> int | None:
    """The first integer component of a module path (``model.layers.3.mlp.up_proj`` -> 3)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None
