"""Loading a causal LM (optionally with a PEFT adapter) and batched greedy generation.

Prompts go through the tokenizer's chat template when it has one, are left-padded so every row ends
at the same position, and are decoded without the prompt: the judges see only the response.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from ..errors import CsuloraError


def load_model(
    model: str | Path, adapter: str | Path | None = None, *, merge: bool = True, device: str | None = None
) -> tuple[Any, Any]:
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


def uses_chat_template(tokenizer: Any, chat_template: bool = True) -> bool:
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def format_prompts(tokenizer: Any, prompts: list[str], chat_template: bool = True) -> list[str]:
    """Each prompt as a single user turn of the chat template, or unchanged without one."""
    if not uses_chat_template(tokenizer, chat_template):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token that closes an assistant turn in the chat template (``<|im_end|>`` in ChatML).

    Read from the template itself, not from ``tokenizer.eos_token``: transformers 5.17 loads
    SmolLM2's GGUF tokenizer with ``eos_token = <|im_start|>``, and a model trained to end its answers
    with that, or a generation that stops only there, runs on into an invented next turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "csulora-end-of-turn-marker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template without an assistant role: nothing to read
        return None
    after = tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
    # special or added (that tokenizer lists <|im_end|> among the added tokens, not the special ones)
    marks = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return after[0] if after and after[0] in marks else None


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Generation stops at the model's end-of-sequence token(s) and at the chat template's end of turn."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    for extra in (end_of_turn_id(tokenizer), tokenizer.eos_token_id):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


# generation-config settings that change greedy decoding's logits, with their neutral values
LOGIT_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}


def plain_greedy(model: Any) -> bool:
    """The model's generation config leaves greedy decoding's logits alone (Qwen2.5's, for one, does not:
    it sets ``repetition_penalty`` 1.05)."""
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, key, None) in neutral for key, neutral in LOGIT_SETTINGS.items())


@torch.no_grad()
def greedy_tokens(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, stop: list[int]
) -> list[list[int]]:
    """Each row's greedy continuation, up to and including its first stop token.

    What ``model.generate(do_sample=False)`` computes (same position ids from the left-padded mask,
    same KV cache), except that a row leaves the batch as soon as it has stopped: ``generate`` goes on
    computing finished rows until the last one stops, which on CPU costs a third of the decoding of
    an adapter whose answers are short but whose batch holds one that loops to the limit. A model
    whose generation config changes the logits (``plain_greedy``) is decoded by ``generate`` itself.
    """
    if not plain_greedy(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else 0,
        )[:, input_ids.shape[1] :].tolist()
        return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in out]
    import inspect

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes it on
    # transformers renamed the argument (past_key_values before 5.2x, deprecated after)
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    rows = list(range(len(input_ids)))
    tokens: list[list[int]] = [[] for _ in rows]
    stop_ids = torch.tensor(stop, dtype=torch.long, device=input_ids.device)
    step_input, mask = input_ids, attention_mask
    for step in range(max_new_tokens):
        logits = model(
            input_ids=step_input,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_arg: cache},
            logits_to_keep=1,
        ).logits
        chosen = logits[:, -1, :].float().argmax(-1)
        for row, token in zip(rows, chosen.tolist(), strict=True):
            tokens[row].append(token)
        live = ~torch.isin(chosen, stop_ids)
        if step == max_new_tokens - 1 or not live.any():
            break
        if not live.all():  # drop the rows that stopped, from the batch and from the cache
            keep = live.nonzero().squeeze(1)
            cache.reorder_cache(cast(torch.LongTensor, keep))  # recurrent layers lack batch_select_indices
            rows = [rows[i] for i in keep.tolist()]
            chosen, mask, positions = chosen[keep], mask[keep], positions[keep]
        step_input = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
        positions = positions[:, -1:] + 1
    return tokens


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
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
    stop = stop_ids(model, tokenizer)
    # Batches of similar length waste little on padding; outputs are put back in the input order.
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    outputs: list[str] = [""] * len(texts)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        ).to(model.device)
        new = greedy_tokens(
            model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens, stop=stop
        )
        for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
            outputs[i] = text.strip()
    return outputs
