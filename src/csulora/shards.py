"""Split a subspace computation into shards that run anywhere, and merge their files into one.

``csulora subspace --shard I/N`` computes a deterministic, size-balanced 1/N of the modules; each
shard file records the whole module list, the settings and a fingerprint of the checkpoint pair, so
``csulora subspace --merge`` can check that the shards belong together and cover every module
exactly once. The merged file is byte for byte the file a single process would have written.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .checkpoint import Checkpoint, tensor_digest
from .errors import CsuloraError
from .subspace import Subspace, _FileBases, chained_digests, load_subspace

SHARD_KEY = "shard"


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N, as in Slurm array or Kubernetes indexed jobs) -> ``(I, N)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise CsuloraError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise CsuloraError(f"--shard {text}: need 0 <= I < N")
    return index, count


def assign_shards(sizes: list[int], count: int) -> list[int]:
    """The shard of each item: largest first onto the least loaded shard (ties: lowest index).

    Depends only on the sizes and their order, so every machine computes the same split.
    """
    loads = [0] * count
    owner = [0] * len(sizes)
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        owner[item] = shard
        loads[shard] += sizes[item]
    return owner


def shard_modules(aligned: Checkpoint, modules: list[str], index: int, count: int) -> list[str]:
    """Shard ``index`` of ``count``'s modules, balanced by weight size, in checkpoint order."""
    sizes = [math.prod(aligned.shape(aligned.weight_key(module))) for module in modules]
    owner = assign_shards(sizes, count)
    return [module for module, shard in zip(modules, owner, strict=True) if shard == index]


def pair_fingerprint(base: Checkpoint, aligned: Checkpoint, anchor: str) -> str:
    """What every shard of one (base, aligned) pair agrees on: tensor names and shapes, and one module's content.

    Shards read different modules, so their content digests cannot be compared; the anchor (the first
    module of the whole list) is read by every shard to tell apart two fine-tunes of one architecture.
    """
    digest = hashlib.sha256()
    for ckpt in (base, aligned):
        digest.update(json.dumps(sorted((key, list(ckpt.shape(key))) for key in ckpt.keys())).encode())
        digest.update(tensor_digest(ckpt.read(ckpt.weight_key(anchor))))
    return digest.hexdigest()


def shard_metadata(base: Checkpoint, aligned: Checkpoint, modules: list[str], index: int, count: int) -> dict:
    return {
        "index": index,
        "count": count,
        "modules": modules,
        "fingerprint": pair_fingerprint(base, aligned, modules[0]),
    }


# What must be equal across shards for their union to be one subspace.
_SHARED = ("format_version", "csulora_version", "settings", "layout")


def merge_shards(paths: list[str | Path]) -> Subspace:
    """One subspace from shard files of the same pair and settings that cover every module once."""
    if not paths:
        raise CsuloraError("--merge needs at least one shard file")
    shards = [(Path(path), load_subspace(path)) for path in paths]
    first_path, first = shards[0]
    reference = _shard_info(first_path, first)
    owner: dict[str, Path] = {}
    for path, shard in shards:
        info = _shard_info(path, shard)
        if info["fingerprint"] != reference["fingerprint"]:
            raise CsuloraError(
                f"{path}: computed from another checkpoint pair than {first_path} (tensor names, shapes or "
                f"the weights of {reference['modules'][0]} differ)"
            )
        if (info["count"], info["modules"]) != (reference["count"], reference["modules"]):
            raise CsuloraError(f"{path}: its run split other modules or another shard count than {first_path}'s")
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
            owner[module] = path
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
    return Subspace(bases, metadata)


def _shard_info(path: Path, subspace: Subspace) -> dict:
    info = subspace.metadata.get(SHARD_KEY)
    if not isinstance(info, dict) or not {"count", "modules", "fingerprint"} <= set(info):
        raise CsuloraError(f"{path}: not a shard file (written without --shard)")
    return info
