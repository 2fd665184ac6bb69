"""Training for both worlds of the lab: the prompt format and its examples, a byte-level BPE tokenizer,
a small Llama, full fine-tunes and a PEFT LoRA.

Plain torch loops (AdamW, fixed data order, seeded init): on a CPU the same seed gives the same
weights, so the cached artifacts and the reported numbers are reproducible.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

# -- the prompt format ---------------------------------------------------------------------------
PROMPT_FORMAT = "### Instruction:\n{prompt}\n### Response:\n"
EOS = "</s>"
# The same format as a chat template, so `csulora eval` formats prompts exactly as the lab trained them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def format_prompt(prompt: str) -> str:
    return PROMPT_FORMAT.format(prompt=prompt)


@dataclass(frozen=True)
class Example:
    """One instruction and its target response; ``family`` says what it measures."""

    prompt: str
    response: str
    family: str


SPECIAL_TOKENS = ["<pad>", "<s>", EOS]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (no unknown tokens, exact round trip) with the lab's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


def new_model(tokenizer: Any, shape: ModelShape, seed: int) -> Any:
    """A randomly initialised Llama (seeded) sized by ``shape``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode(
    tokenizer: Any,
    examples: list[Example],
    prompt_format: Callable[[str], str] = format_prompt,
    end_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` right-padded; the loss sees only the response and its end token.

    ``prompt_format`` turns a prompt into the text before the response (the lab's own chat format by
    default; a real model's chat template for the smollm2 world). ``end_id`` ends each response (the
    chat template's end of turn; the tokenizer's end-of-sequence token by default). Padding positions
    have label -100.
    """
    rows = []
    end = tokenizer.eos_token_id if end_id is None else end_id
    for ex in examples:
        prompt = tokenizer(prompt_format(ex.prompt), add_special_tokens=False)["input_ids"]
        response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [end]
        rows.append((prompt + response, [-100] * len(prompt) + response))
    length = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), length), pad)
    labels = torch.full((len(rows), length), -100)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(target)] = torch.tensor(target)
    return input_ids, labels


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float
    warmup: float = 0.05


def learning_rate(step: int, schedule: Schedule) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    warmup = max(1, int(schedule.warmup * schedule.steps))
    if step < warmup:
        return schedule.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, schedule.steps - warmup)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    schedule: Schedule,
    seed: int,
    desc: str,
    progress: bool = True,
    prompt_format: Callable[[str], str] = format_prompt,
    end_id: int | None = None,
    precision: str = "float32",
) -> float:
    """Train the model's trainable parameters on ``examples`` (epochs in a seeded order).

    The attention mask comes from each row's length, not from the pad token: a real chat model's pad
    token can be its end-of-turn token, which also occurs inside the chat template. ``precision``
    ``bfloat16`` runs the forward pass under autocast; weights, gradients and AdamW stay float32.
    """
    from csulora.device import autocast

    input_ids, labels = encode(tokenizer, examples, prompt_format, end_id)
    lengths = torch.tensor([int((row != -100).nonzero().max()) + 1 for row in labels])
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    bar = tqdm(range(schedule.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if len(order) < schedule.batch_size:
            order = torch.cat([order, torch.randperm(len(examples), generator=generator)])
        index, order = order[: schedule.batch_size], order[schedule.batch_size :]
        width = int(lengths[index].max())
        ids, target = input_ids[index, :width].to(device), labels[index, :width].to(device)
        mask = (torch.arange(width)[None, :] < lengths[index][:, None]).long().to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule)
        with autocast(precision, device):
            loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return float(loss.detach())


def add_lora(model: Any, rank: int, alpha: float, seed: int) -> Any:
    """Wrap ``model`` in a PEFT LoRA on every linear projection (the usual attack setting)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # PEFT annotates lora_alpha as int but only ever divides by it
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)  # type: ignore[arg-type]
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5; harmless here
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)
