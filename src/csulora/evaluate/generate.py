"""Loading a causal LM (optionally with a PEFT adapter) and batched greedy generation.

Prompts go through the tokenizer's chat template when it has one, are left-padded so every row ends
at the same position, and are decoded without the prompt: the judges see only the response.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CsuloraError


def load_model(model: str | Path, adapter: str | Path | None = None, *, merge: bool = True, device=None):
    """``(model, tokenizer)`` from a local directory or Hub id, on ``device`` (auto: CUDA if present).

    An adapter is loaded with PEFT and, for a float32 model, merged into the weights (same outputs,
    faster generation); in half precision merging would round a small corrected update into the
    weights, so the adapter stays separate there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import first_line, resolve_local

    path = resolve_local(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm: Any = AutoModelForCausalLM.from_pretrained(path, dtype="auto")  # becomes a PeftModel below
    except Exception as exc:  # transformers raises many kinds for a directory that is not a model
        raise CsuloraError(f"{model}: cannot load a causal LM ({first_line(exc)})") from None
    from ..device import resolve_device

    full_precision = lm.dtype == torch.float32
    lm = lm.to(resolve_device(device))
    if adapter is not None:
        from peft import PeftModel

        adapter_path = resolve_local(adapter, allow_patterns=["*.json", "*.safetensors", "*.md"])
        try:
            with warnings.catch_warnings():  # PEFT calls a method transformers 5 deprecates; harmless
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                lm = PeftModel.from_pretrained(lm, adapter_path)
        except Exception as exc:  # PEFT, like transformers, raises many kinds
            raise CsuloraError(f"{adapter}: cannot load the adapter ({first_line(exc)})") from None
        if merge and full_precision:
            lm = lm.merge_and_unload()
    return lm.eval(), tokenizer


def uses_chat_template(tokenizer, chat_template: bool = True) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def format_prompts(tokenizer, prompts: list[str], chat_template: bool = True) -> list[str]:
    """Each prompt as a single user turn of the chat template, or unchanged without one."""
    if not uses_chat_template(tokenizer, chat_template):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of already formatted ``texts``, decoded without special tokens.

    Pass ``add_special_tokens=False`` for chat-templated texts: the template already holds the start
    token, and adding it again would double it.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        ).to(model.device)
        tokens = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = tokens[:, batch["input_ids"].shape[1] :]
        outputs.extend(text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs
