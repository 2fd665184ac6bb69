"""Training and decoding throughput of the smollm2 study's model on this machine (run by hand, not in CI).

Times, in one process and for each precision asked (float32, and bfloat16 autocast where the CPU or
GPU computes it natively, or when forced with ``--dtypes``):

- a full fine-tune of the linear projections, as the study's ``full`` alignment trains it: the study's
  ``train.fit`` on batches of its benign training prompts with their distilled answers (``--distilled``,
  the study's ``OUT/cache/distill-*.json``) or, without it, each prompt as its own answer;
- batched greedy decoding through ``csulora.evaluate.generate.generate`` (the study's evaluation path).

It prints one JSON line: seconds per step, trained tokens/s (tokens inside the attention mask) and
padded tokens/s, decoded new tokens/s (batch rows x decoding steps / wall), process CPU seconds,
peak RSS, the CPU model, torch threads and the load average before and after. Time only on a quiet
machine (``uptime``); a figure taken beside another heavy job is that job's cost too.

    python benchmarks/bench_throughput.py OUT/cache/smollm2/base --threads 2 \\
        --distilled OUT/cache/distill-<key>.json --steps 6 --json benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def training_examples(distilled: Path | None, n: int, seed: int) -> list[Any]:
    from csulora_lab.smollm2 import data
    from csulora_lab.train import Example

    if distilled is not None:
        pairs = [tuple(p) for p in json.loads(distilled.read_text())]
    else:
        pairs = [(p, p) for p in data.benign_train_prompts()]
    chosen = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return [Example(p, a, "distill") for p, a in chosen]


def time_training(base: Path, examples: list[Any], steps: int, batch: int, precision: str, device: str) -> dict:
    """Seconds per step of the projections' full fine-tune (one warm-up step first, not counted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csulora.evaluate.generate import end_of_turn_id
    from csulora_lab.smollm2.study import chat_formatter
    from csulora_lab.train import Schedule, encode, fit

    tokenizer = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith("proj.weight")
    fmt, end = chat_formatter(tokenizer), end_of_turn_id(tokenizer)
    rows = examples[: steps * batch]
    fit(model, tokenizer, rows[:batch], Schedule(1, batch, 1e-5), 0, "warm-up", False, fmt, end, precision)
    _, labels = encode(tokenizer, rows, fmt, end)
    # tokens the model reads per step: each row up to its last labelled position; padded: to the batch's widest
    lengths = [int((row != -100).nonzero().max()) + 1 for row in labels]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()  # fit's order, seed 0
    batches = [[lengths[i] for i in order[j : j + batch]] for j in range(0, len(order), batch)]
    padded = sum(max(b) * len(b) for b in batches)
    wall, cpu = time.perf_counter(), time.process_time()
    # one epoch over exactly steps x batch rows: fit's seeded order visits each row once
    fit(model, tokenizer, rows, Schedule(steps, batch, 1e-5), 0, "timed", False, fmt, end, precision)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "steps": steps,
        "batch_size": batch,
        "s_per_step": round(wall / steps, 2),
        "cpu_s_per_step": round(cpu / steps, 2),
        "tokens_per_s": round(sum(lengths) / wall, 1),
        "padded_tokens_per_s": round(padded / wall, 1),
        "mean_row_tokens": round(sum(lengths) / len(lengths), 1),
    }


def time_decoding(base: Path, prompts: list[str], new_tokens: int, batch: int, precision: str, device: str) -> dict:
    from csulora.device import autocast
    from csulora.evaluate.generate import format_prompts, generate, load_model

    model, tokenizer = load_model(base, device=device)
    formatted = format_prompts(tokenizer, prompts)
    with autocast(precision, model.device):
        generate(model, tokenizer, formatted[:batch], max_new_tokens=2, batch_size=batch, add_special_tokens=False)
        wall, cpu = time.perf_counter(), time.process_time()
        generate(model, tokenizer, formatted, max_new_tokens=new_tokens, batch_size=batch, add_special_tokens=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "batch_size": batch,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "new_tokens_per_s": round(len(prompts) * new_tokens / wall, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the study's base checkpoint (OUT/cache/smollm2/base)")
    parser.add_argument("--distilled", type=Path, help="the study's distill-*.json (real answer lengths)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=64, help="prompts decoded")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), help="float32, and bf16 if native")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import transformers

    from csulora.device import native_bf16, resolve_device
    from csulora_lab.smollm2 import data

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtypes = args.dtypes or (["float32", "bfloat16"] if native_bf16(device) else ["float32"])
    examples = training_examples(args.distilled, args.steps * args.batch_size, seed=0)
    prompts = data.benign_train_prompts()[: args.prompts]
    load_before = os.getloadavg()
    figures: dict[str, Any] = {
        "cpu": cpu_model(),
        "device": str(device),
        "native_bf16": native_bf16(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_before": load_before,
    }
    for precision in dtypes:
        figures[precision] = {
            "train": time_training(args.base, examples, args.steps, args.batch_size, precision, str(device)),
            "decode": time_decoding(args.base, prompts, args.new_tokens, args.decode_batch, precision, str(device)),
        }
    figures["load_average_after"] = os.getloadavg()
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
