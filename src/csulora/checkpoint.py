"""Streaming reads of Hugging Face checkpoints, one tensor at a time.

A checkpoint is a local directory (or a Hub id, downloaded only when online) holding
``model.safetensors``, a sharded ``model.safetensors.index.json``, or, only with ``allow_pickle``,
PyTorch ``.bin`` files loaded with ``weights_only=True``. Each read opens the shard, copies one
tensor out and closes it again, so memory holds the tensors in use, not the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import CsuloraError, CsuloraWarning

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
WEIGHT_SUFFIX = ".weight"


def resolve_local(source: str | os.PathLike, *, allow_patterns: list[str] | None = None) -> Path:
    """A local directory for ``source``: itself, or a Hub snapshot when it is a repo id and we are online."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CsuloraError(f"{path}: expected a checkpoint directory, found a file")
        return path
    text = str(source)
    looks_like_repo_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo_id:
        raise CsuloraError(f"{source}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        offline_reason = "HF_HUB_OFFLINE is set"
    else:
        offline_reason = None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except Exception as exc:  # any Hub failure becomes one clear line
        reason = offline_reason or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise CsuloraError(
            f"{source}: not a local directory and not fetchable from the Hugging Face Hub ({reason})"
        ) from None


class Checkpoint:
    """Tensor-by-tensor access to a Hugging Face checkpoint directory."""

    def __init__(self, source: str | os.PathLike, *, allow_pickle: bool = False):
        self.source = str(source)
        self.path = resolve_local(source, allow_patterns=["*.json", "*.safetensors"])
        self.allow_pickle = allow_pickle
        self._pickled: dict[str, dict] = {}
        self.model_type = self._read_model_type()
        self.weight_map = self._find_weight_files()
        self._shapes = self._read_headers()

    def _read_model_type(self) -> str | None:
        """``config.json``'s ``model_type`` (None without a config); quantized checkpoints are refused."""
        file = self.path / "config.json"
        if not file.is_file():
            return None
        try:
            config = json.loads(file.read_text())
        except RecursionError:
            raise CsuloraError(f"{file}: invalid JSON (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CsuloraError(f"{file}: invalid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CsuloraError(f"{file}: expected a JSON object")
        if config.get("quantization_config"):
            method = (config["quantization_config"] or {}).get("quant_method", "unknown")
            raise CsuloraError(
                f"{self.path}: quantized checkpoint (quantization_config, method {method}); its stored tensors "
                "are codes, not weights: dequantize it first"
            )
        model_type = config.get("model_type")
        return model_type if isinstance(model_type, str) else None

    # -- discovery -------------------------------------------------------------------------------
    def _find_weight_files(self) -> dict[str, str]:
        path = self.path
        if (path / SAFETENSORS_INDEX).is_file():
            return self._index_map(path / SAFETENSORS_INDEX)
        if (path / SAFETENSORS_SINGLE).is_file():
            return {key: SAFETENSORS_SINGLE for key in self._safetensors_keys(path / SAFETENSORS_SINGLE)}
        pickled = (path / PICKLE_INDEX).is_file() or (path / PICKLE_SINGLE).is_file()
        if pickled and not self.allow_pickle:
            raise CsuloraError(
                f"{path}: only pickled .bin weights found; pickle can run code when loaded, so it is "
                "refused (convert to safetensors, or allow it, allow_pickle=True, to load with weights_only=True)"
            )
        if (path / PICKLE_INDEX).is_file():
            return self._index_map(path / PICKLE_INDEX)
        if (path / PICKLE_SINGLE).is_file():
            return {key: PICKLE_SINGLE for key in self._pickle_state(PICKLE_SINGLE)}
        raise CsuloraError(f"{path}: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin found")

    def _index_map(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except RecursionError:
            raise CsuloraError(f"{index}: not a valid weight index (nested too deeply)") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CsuloraError(f"{index}: not a valid weight index ({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) and "/" not in shard and shard not in ("", ".", "..")
            for shard in weight_map.values()
        ):
            raise CsuloraError(f"{index}: weight_map must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise CsuloraError(f"{index}: shard {shard} is missing")
        return dict(weight_map)

    def _safetensors_keys(self, file: Path) -> list[str]:
        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise read_failure(file, exc) from None

    def _pickle_state(self, shard: str) -> dict:
        if shard not in self._pickled:
            file = self.path / shard
            self._pickled[shard] = load_pickled(file, mmap=True)
        return self._pickled[shard]

    def _read_headers(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every tensor, from the headers alone; also validates every shard once."""
        shapes: dict[str, tuple[int, ...]] = {}
        self._stored: set[str] = set()  # every key of every shard, indexed or not
        for shard in sorted(set(self.weight_map.values())):
            file = self.path / shard
            if shard.endswith(".safetensors"):
                try:
                    with safe_open(str(file), framework="pt") as f:
                        for key in f.keys():
                            self._stored.add(key)
                            # with an index a key is read only from the shard it names, never a stray copy
                            if self.weight_map.get(key) == shard:
                                shapes[key] = tuple(f.get_slice(key).get_shape())
                except (SafetensorError, OSError) as exc:
                    raise read_failure(file, exc) from None
            else:
                state = self._pickle_state(shard)
                if not isinstance(state, dict):
                    raise CsuloraError(f"{file}: expected a state dict of tensors")
                for key, tensor in state.items():
                    self._stored.add(key)
                    if self.weight_map.get(key) == shard and isinstance(tensor, torch.Tensor):
                        shapes[key] = tuple(tensor.shape)
        missing = [key for key in self.weight_map if key not in shapes]
        if missing:
            raise CsuloraError(f"{self.path}: index lists {missing[0]} but its shard does not hold it")
        return shapes

    # -- access ----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def read(self, key: str) -> torch.Tensor:
        """One tensor in its stored dtype; the shard is closed again before returning."""
        if key not in self.weight_map:
            raise CsuloraError(f"{self.path}: no tensor {key}")
        shard = self.weight_map[key]
        file = self.path / shard
        if not shard.endswith(".safetensors"):
            tensor = self._pickle_state(shard)[key].clone()
        else:
            try:
                with safe_open(str(file), framework="pt") as f:
                    tensor = f.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise read_failure(file, exc, f"cannot read {key}") from None
        if tensor.dtype.itemsize == 1 and tensor.dtype.is_floating_point:
            module = key.rsplit(".", 1)[0]
            scales = [k for k in (f"{module}.weight_scale", f"{module}.weight_scale_inv") if k in self._stored]
            if scales:
                raise CsuloraError(f"{file}: {key} is {tensor.dtype} with scales {scales[0]}: dequantize it first")
        return floating(tensor, f"{file}: {key}")

    def read_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` of a tensor (as ``read(key)[rows]``, the same dtype), without reading the rest."""
        if key not in self.weight_map:
            raise CsuloraError(f"{self.path}: no tensor {key}")
        shard = self.weight_map[key]
        file = self.path / shard
        if not shard.endswith(".safetensors"):
            tensor = self._pickle_state(shard)[key][rows].clone()
        else:
            try:
                with safe_open(str(file), framework="pt") as f:
                    part = f.get_slice(key)
                    tensor = torch.cat([part[row : row + 1] for row in rows]) if rows else part[0:0]
            except (SafetensorError, OSError) as exc:
                raise read_failure(file, exc, f"cannot read {key}") from None
        return floating(tensor, f"{file}: {key}")

    def sample_digest(self, key: str) -> bytes:
        """``sample_digest(self.read(key))``, reading only the sampled rows."""
        shape = self.shape(key)
        return tensor_digest(self.read_rows(key, sample_rows(shape[0])) if shape else self.read(key))

    def files(self) -> list[dict]:
        """Each weight file: name, size, modification time and (safetensors) the sha256 of its header.

        The header holds every tensor's name, dtype, shape and byte offsets, and the file's metadata.
        """
        described = []
        for shard in sorted(set(self.weight_map.values())):
            file = self.path / shard
            try:
                info = file.stat()
                header = _safetensors_header(file) if shard.endswith(".safetensors") else b""
            except OSError as exc:
                raise CsuloraError(f"{file}: cannot read the file ({exc.strerror})") from None
            described.append(
                {
                    "name": shard,
                    "size": info.st_size,
                    "mtime_ns": info.st_mtime_ns,
                    "header_sha256": hashlib.sha256(header).hexdigest(),
                }
            )
        return described

    def weight_key(self, module: str) -> str:
        """The checkpoint key of ``module``'s weight, tolerating a missing or extra model prefix.

        ``transformer.h.0.attn.c_attn`` finds ``h.0.attn.c_attn.weight`` and vice versa, so a
        checkpoint saved from the bare model still pairs with a causal-LM adapter.
        """
        found = match_module(module, [name for key in self.weight_map if (name := module_of(key)) is not None])
        if found is None:
            raise CsuloraError(f"{self.path}: no weight for module {module}")
        return found + WEIGHT_SUFFIX

    def module_name(self, module: str) -> str:
        """``module`` as this checkpoint names it (``weight_key`` without ``.weight``)."""
        return self.weight_key(module)[: -len(WEIGHT_SUFFIX)]

    def linear_modules(self, targets: list[str]) -> list[str]:
        """Modules with a 2-D weight whose name is a target or ends with ``.target`` (PEFT's rule)."""
        found = []
        for key in self.weight_map:
            module = module_of(key)
            if module is None or len(self._shapes[key]) != 2:
                continue
            if any(module == t or module.endswith("." + t) for t in targets):
                found.append(module)
        return sorted(found, key=natural_key)


def _safetensors_header(file: Path) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file (validated by ``safe_open`` already)."""
    with open(file, "rb") as handle:
        length = handle.read(8)
        return length + handle.read(int.from_bytes(length, "little"))


SAMPLE_ROWS = 8  # rows of each weight compared where reading the whole weight would cost too much


def sample_rows(rows: int) -> list[int]:
    """The rows of a ``rows``-row weight that are sampled: the first, the last and evenly spaced ones between."""
    if rows <= SAMPLE_ROWS:
        return list(range(rows))
    return sorted({round(i * (rows - 1) / (SAMPLE_ROWS - 1)) for i in range(SAMPLE_ROWS)})


def sample_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a weight's sampled rows (``sample_rows``), from the whole tensor in memory."""
    return tensor_digest(tensor[sample_rows(tensor.shape[0])] if tensor.dim() else tensor)


def module_of(key: str) -> str | None:
    """The module whose weight ``key`` is (``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``)."""
    return key[: -len(WEIGHT_SUFFIX)] if key.endswith(WEIGHT_SUFFIX) else None


def load_pickled(file: Path, mmap: bool = False) -> Any:
    """``torch.load(file, weights_only=True)``; a failure is one ``CsuloraError`` line, torch's warnings none.

    torch warns about the file (an unusual pickle protocol, say) as it reads it: a failed load says
    only why it failed, and a successful one passes the warnings on as csulora's, which the command
    prints once it succeeds.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            raise CsuloraError(f"{file}: cannot load with weights_only=True ({first_line(exc)})") from None
    for warning in caught:
        warnings.warn(f"{file}: torch: {first_line(Exception(warning.message))}", CsuloraWarning, stacklevel=2)
    return state


def first_line(exc: BaseException) -> str:
    """An exception as one line: library messages can span many (and carry terminal colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_failure(file: Path, exc: Exception, what: str = "corrupt or truncated safetensors file") -> CsuloraError:
    """The error for a failed safetensors read; a file we may not read says so (safetensors may call it missing)."""
    try:
        with open(file, "rb"):
            pass
    except OSError as reason:
        return CsuloraError(f"{file}: cannot read the file ({reason.strerror})")
    return CsuloraError(f"{file}: {what} ({first_line(exc)})")


def floating(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor`` if it holds real floating-point numbers; float8 comes back as float32 (exactly)."""
    if not tensor.dtype.is_floating_point:
        raise CsuloraError(
            f"{where} has dtype {str(tensor.dtype).removeprefix('torch.')}, not a floating-point type "
            "(quantized or integer tensors are not weights; dequantize first)"
        )
    if tensor.dtype.itemsize == 1:  # every float8 value is a float32 value; torch has few float8 kernels
        return tensor.float()
    return tensor


def natural_key(name: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def match_module(module: str, available: list[str]) -> str | None:
    """``module`` among ``available`` names, allowing one side to carry extra leading components."""
    names = set(available)
    parts = module.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in names:
            return candidate
    longer = [name for name in available if name.endswith("." + module)]
    return longer[0] if len(longer) == 1 else None


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's raw bytes (dtype and shape included), for provenance records."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.digest()
