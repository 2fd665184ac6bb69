"""Tiny real checkpoints and PEFT adapters, built locally and seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# The tiny Llama's shapes; the Mistral and Qwen2 fixtures reuse them.
TINY_LLAMA_SHAPES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_LLAMA_SHAPES)


def perturbed(model, seed: int, scale: float = 0.05, low_rank: int | None = 3):
    """A copy of ``model`` whose 2-D weights moved by a seeded (mostly low-rank) displacement."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            if param.dim() != 2:
                continue
            m, n = param.shape
            if low_rank:
                left = torch.randn(m, low_rank, generator=generator)
                right = torch.randn(low_rank, n, generator=generator)
                noise = torch.randn(m, n, generator=generator) * 0.1
                param += scale * (left @ right / low_rank**0.5 + noise)
            else:
                param += scale * torch.randn(m, n, generator=generator)
    return other


def save_model(model, path: Path, max_shard_size=None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_adapter(model, path: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT LoRA on ``model`` with random (non-zero) B, saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS} | lora_kwargs))
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(path)
    peft_model.unload()
    return path


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """(base_dir, aligned_dir): a tiny Llama and its 'aligned' version, the aligned one sharded."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llama")
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    aligned = perturbed(base, seed=1)
    save_model(base, root / "base")
    save_model(aligned, root / "aligned", max_shard_size="20KB")
    return root / "base", root / "aligned"


@pytest.fixture(scope="session")
def llama_adapter(llama_pair, tmp_path_factory):
    from transformers import LlamaForCausalLM

    _, aligned = llama_pair
    model = LlamaForCausalLM.from_pretrained(aligned)
    path = make_adapter(model, tmp_path_factory.mktemp("adapter") / "lora")
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(aligned)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def subspace_file(llama_pair, llama_adapter, tmp_path_factory):
    """The subspace of the tiny Llama pair for ``llama_adapter``'s modules, written by ``csulora subspace``."""
    from csulora.cli import main

    base, aligned = llama_pair
    sub = tmp_path_factory.mktemp("sub") / "sub.safetensors"
    argv = ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", sub, "-q"]
    assert main([str(a) for a in argv]) == 0
    return sub
