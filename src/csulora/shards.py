"""Split a subspace computation into shards that run anywhere, and merge their files into one.

``csulora subspace --shard I/N`` computes a deterministic, size-balanced 1/N of the modules; each
shard file records the whole module list, the settings and a fingerprint of the checkpoint pair, so
``csulora subspace --merge`` can check that the shards belong together and cover every module
exactly once. The merged file is byte for byte the file a single process would have written.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import SAMPLE_ROWS, Checkpoint
from .errors import CsuloraError, CsuloraWarning
from .subspace import SAMPLE_KEY, Subspace, _FileBases, chained_digests, is_sha256, load_subspace

SHARD_KEY = "shard"


MAX_SHARDS = 100_000  # Kubernetes' limit on an indexed job's completions; more is a typo


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N, as in Slurm array or Kubernetes indexed jobs) -> ``(I, N)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise CsuloraError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise CsuloraError(f"--shard {text}: need 0 <= I < N")
    if count > MAX_SHARDS:
        raise CsuloraError(f"--shard {text}: at most {MAX_SHARDS} shards")
    return index, count


def assign_shards(sizes: list[int], count: int) -> list[int]:
    """The shard of each item: largest first onto the least loaded shard (ties: lowest index).

    Depends only on the sizes and their order, so every machine computes the same split. Shards past
    the number of items are never chosen (an empty shard of lower index always comes first), so only
    that many are kept: the cost does not grow with ``count``.
    """
    loads = [(0, shard) for shard in range(min(count, len(sizes)))]  # a heap of (load, shard)
    owner = [0] * len(sizes)
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, shard = heapq.heappop(loads)
        owner[item] = shard
        heapq.heappush(loads, (load + sizes[item], shard))
    return owner


def shard_modules(aligned: Checkpoint, modules: list[str], index: int, count: int) -> list[str]:
    """Shard ``index`` of ``count``'s modules, balanced by weight size, in checkpoint order."""
    sizes = [math.prod(aligned.shape(aligned.weight_key(module))) for module in modules]
    owner = assign_shards(sizes, count)
    return [module for module, shard in zip(modules, owner, strict=True) if shard == index]


def pair_fingerprint(base: Checkpoint, aligned: Checkpoint, modules: list[str]) -> dict:
    """What every shard of one (base, aligned) pair reads and agrees on, short of whole checkpoints.

    ``layout``: every tensor's name and shape, and each weight file's name, size and header (dtypes,
    shapes, byte offsets, metadata). ``samples``: the sampled rows (``checkpoint.sample_rows``) of
    every module's weight in both checkpoints. ``mtimes``: the files' modification times, recorded
    only (copies on other machines differ) to say so in the merge's note. ``fingerprint`` hashes the
    first two.
    """
    layout = hashlib.sha256()
    mtimes = {}
    for side, ckpt in (("base", base), ("aligned", aligned)):
        files = ckpt.files()
        layout.update(json.dumps(sorted((key, list(ckpt.shape(key))) for key in ckpt.keys())).encode())
        layout.update(json.dumps([[f["name"], f["size"], f["header_sha256"]] for f in files]).encode())
        mtimes[side] = {f["name"]: f["mtime_ns"] for f in files}
    samples = {
        module: {
            side: ckpt.sample_digest(ckpt.weight_key(module)).hex()
            for side, ckpt in (("base", base), ("aligned", aligned))
        }
        for module in modules
    }
    whole = hashlib.sha256(layout.digest() + json.dumps(samples, sort_keys=True).encode())
    return {
        "fingerprint": whole.hexdigest(),
        "layout": layout.hexdigest(),
        "sampled_rows": SAMPLE_ROWS,
        "samples": samples,
        "mtimes": mtimes,
    }


def shard_metadata(base: Checkpoint, aligned: Checkpoint, modules: list[str], index: int, count: int) -> dict:
    return {"index": index, "count": count, "modules": modules} | pair_fingerprint(base, aligned, modules)


# What must be equal across shards for their union to be one subspace.
_SHARED = ("format_version", "csulora_version", "settings", "layout", "model_type")


def merge_shards(paths: list[str | Path]) -> Subspace:
    """One subspace from shard files of the same pair and settings that cover every module once.

    Refused: shards of other settings, module lists or shard counts, a repeated or out-of-range shard
    index, and shards whose checkpoints differ in anything every shard read (``pair_fingerprint``).
    The rest of each module's weights was read by its own shard only: a note says so.
    """
    if not paths:
        raise CsuloraError("a merge needs at least one shard file")
    shards = [(Path(path), load_subspace(path)) for path in paths]
    first_path, first = shards[0]
    reference = _shard_info(first_path, first)
    owner: dict[str, Path] = {}
    indices: dict[int, Path] = {}
    for path, shard in shards:
        info = _shard_info(path, shard)
        if (info["count"], info["modules"]) != (reference["count"], reference["modules"]):
            raise CsuloraError(f"{path}: its run split other modules or another shard count than {first_path}'s")
        if info["fingerprint"] != reference["fingerprint"]:
            raise CsuloraError(
                f"{path}: computed from another checkpoint pair than {first_path} ({_difference(info, reference)})"
            )
        for key in _SHARED:
            if shard.metadata.get(key) != first.metadata.get(key):
                raise CsuloraError(f"{path}: {key} differs from {first_path}'s; not shards of one run")
        for side in ("base", "aligned"):
            if shard.metadata[side]["source"] != first.metadata[side]["source"]:
                raise CsuloraError(
                    f"{path}: {side} checkpoint {shard.metadata[side]['source']} differs from "
                    f"{first_path}'s {first.metadata[side]['source']}"
                )
        # per-module metadata straight from the file's header, without reading the tensors
        modules_meta = shard.bases.meta if isinstance(shard.bases, _FileBases) else shard.module_metadata()
        for module, meta in modules_meta.items():
            if "sha256" not in meta:
                raise CsuloraError(f"{path}: module {module} has no weight digests (written by an older csulora)")
            if module not in reference["modules"]:
                raise CsuloraError(f"{path}: module {module} is not in the shards' module list")
            if module in owner:
                raise CsuloraError(f"{path}: module {module} is also in {owner[module]}")
            # the rows its own shard read in full, as every shard sampled them
            if (
                "samples" in reference
                and meta.get(SAMPLE_KEY, reference["samples"][module]) != reference["samples"][module]
            ):
                raise CsuloraError(
                    f"{path}: module {module} was computed from weights whose sampled rows differ from those "
                    f"{first_path} read (the checkpoint changed while the shards ran?)"
                )
            owner[module] = path
        if info["index"] in indices:  # an empty shard twice (one with modules was refused just above)
            raise CsuloraError(f"{path}: is shard {info['index']} of {info['count']}, as {indices[info['index']]} is")
        indices[info["index"]] = path
    missing = [module for module in reference["modules"] if module not in owner]
    if missing:
        raise CsuloraError(
            f"{len(missing)} module(s) in no shard file, e.g. {missing[0]} (shard {reference['count']} "
            f"run(s) expected; is one missing?)"
        )
    by_path = {path: shard for path, shard in shards}
    bases = {module: by_path[owner[module]][module] for module in reference["modules"]}
    metadata = {key: value for key, value in first.metadata.items() if key not in (SHARD_KEY, "format_version")}
    digests = chained_digests([basis.sha256 for basis in bases.values()])  # every module's checked above
    for side in ("base", "aligned"):
        metadata[side] = {"source": first.metadata[side]["source"], "sha256": digests[side]}
    if reference["count"] > 1:
        warnings.warn(_unverified(shards, reference), CsuloraWarning, stacklevel=2)
    return Subspace(bases, metadata)


def _difference(info: dict, reference: dict) -> str:
    """What differs between two shards' fingerprints, as far as they say."""
    if "samples" not in info or "samples" not in reference:
        return "tensor names, shapes or the weights of a module differ; one was written by an older csulora"
    if info["layout"] != reference["layout"]:
        return "tensor names, shapes, or the weight files' sizes or headers differ"
    for module in reference["modules"]:
        for side in ("base", "aligned"):
            if info["samples"][module][side] != reference["samples"][module][side]:
                return f"the {side} weights of {module} differ"
    return "their fingerprints differ"


def _unverified(shards: list[tuple[Path, Subspace]], reference: dict) -> str:
    """The merge's note: what the shards were compared on, and what was not compared."""
    if "samples" not in reference:
        return (
            f"merged {len(shards)} shard file(s) written by an older csulora: only tensor names, shapes and the "
            f"weights of {reference['modules'][0]} were compared across shards"
        )
    mtimes = [shard.metadata[SHARD_KEY]["mtimes"] for _, shard in shards]
    moved = " The weight files' modification times differ between shards (copies, or files changed)." * (
        any(m != mtimes[0] for m in mtimes)
    )
    return (
        f"merged {len(shards)} shards: every shard saw the same tensor names, shapes, weight file sizes and headers, "
        f"and the same {reference['sampled_rows']} sampled rows of each module's weights in both checkpoints; "
        f"the other rows of a module were read only by the shard that computed it.{moved}"
    )


def _shard_info(path: Path, subspace: Subspace) -> dict:
    """The file's ``shard`` record, checked: an edited or foreign one is refused in one line."""
    info = subspace.metadata.get(SHARD_KEY)
    if not isinstance(info, dict) or not {"count", "modules", "fingerprint"} <= set(info):
        raise CsuloraError(f"{path}: not a shard file (written without shard=...)")
    index, count, modules = info.get("index"), info["count"], info["modules"]
    if not (isinstance(count, int) and isinstance(index, int) and _integer(count) and _integer(index)) or not (
        1 <= count <= MAX_SHARDS and 0 <= index < count
    ):
        raise CsuloraError(f"{path}: corrupt shard record (index {index!r} of {count!r})")
    if not (
        isinstance(modules, list) and all(isinstance(m, str) for m in modules) and len(set(modules)) == len(modules)
    ):
        raise CsuloraError(f"{path}: corrupt shard record (its module list)")
    if not isinstance(info["fingerprint"], str):
        raise CsuloraError(f"{path}: corrupt shard record (fingerprint {info['fingerprint']!r})")
    if "samples" in info and not (
        isinstance(info.get("layout"), str)
        and _integer(info.get("sampled_rows"))
        and isinstance(info["samples"], dict)
        and set(info["samples"]) == set(modules)
        and all(
            isinstance(d, dict) and is_sha256(d.get("base")) and is_sha256(d.get("aligned"))
            for d in info["samples"].values()
        )
        and isinstance(info.get("mtimes"), dict)
    ):
        raise CsuloraError(f"{path}: corrupt shard record (its sampled weights)")
    for side in ("base", "aligned"):
        if not isinstance(subspace.metadata.get(side), dict):
            raise CsuloraError(f"{path}: corrupt csulora metadata (no {side} checkpoint record)")
    return info


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
