"""A tiny (base, aligned, adapter) triple written with torch and safetensors only.

CI's core-install step runs ``csulora subspace``, ``correct`` and ``inspect --json`` on it in a venv
without transformers or peft, to prove those commands need nothing more. Usage: ``python
.ci/core_fixture.py DIR`` writes ``DIR/base``, ``DIR/aligned`` (sharded, with an index) and ``DIR/lora``.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, RANK = 16, 2, 2
TARGETS = ("q_proj", "v_proj")


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.{name}.weight": torch.randn(HIDDEN, HIDDEN, generator=generator)
        for i in range(LAYERS)
        for name in TARGETS
    }


def main(root: Path) -> None:
    base = weights(0)
    generator = torch.Generator().manual_seed(1)
    aligned = {
        k: v + 0.05 * torch.randn(HIDDEN, 2, generator=generator) @ torch.randn(2, HIDDEN, generator=generator)
        for k, v in base.items()
    }
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    (root / "aligned").mkdir()
    keys = sorted(aligned)
    shards = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for shard, names in shards.items():
        save_file({k: aligned[k] for k in names}, str(root / "aligned" / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (root / "aligned" / "model.safetensors.index.json").write_text(json.dumps(index))

    lora = {}
    for key in base:
        module = key.removesuffix(".weight")
        lora[f"base_model.model.{module}.lora_A.weight"] = 0.3 * torch.randn(RANK, HIDDEN, generator=generator)
        lora[f"base_model.model.{module}.lora_B.weight"] = 0.3 * torch.randn(HIDDEN, RANK, generator=generator)
    (root / "lora").mkdir()
    save_file(lora, str(root / "lora" / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": list(TARGETS),
        "base_model_name_or_path": str((root / "aligned").resolve()),
    }
    (root / "lora" / "adapter_config.json").write_text(json.dumps(config))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
