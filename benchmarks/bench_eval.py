"""CPU cost of one evaluation of the smollm2 study (run by hand, not in CI).

Runs ``csulora_lab.smollm2.study.evaluate`` (the study's one evaluation: held-out harmful prompts, zor-code
utility, benign general questions) on a checkpoint, optionally with a PEFT adapter, under cProfile,
and prints process CPU seconds, wall seconds, the load average and the functions that took the most
time. ``--json`` writes the metrics and every response, to compare two runs' judged outcomes.

    nice -n 5 python benchmarks/bench_eval.py OUT/cache/smollm2/base --threads 2 --json base.json
    nice -n 5 python benchmarks/bench_eval.py ALIGNED --adapter LORA --threads 2 --json lora.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--prompts", type=Path, help="the study's prompts.json (default: next to the model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="the study's default unless given")
    parser.add_argument("--n-harmful", type=int, help="fewer held-out harmful prompts (a quick look)")
    parser.add_argument("--n-tasks", type=int, help="fewer utility and general questions (a quick look)")
    parser.add_argument("--top", type=int, default=25, help="functions to list (0: no profile)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from csulora_lab.smollm2.config import StudyConfig
    from csulora_lab.smollm2.study import eval_sets, evaluate

    torch.set_num_threads(args.threads)
    config = StudyConfig()
    if args.batch_size:
        config = replace(config, batch_size=args.batch_size)
    if args.n_harmful:
        config = replace(config, n_eval_harmful=args.n_harmful)
    if args.n_tasks:
        config = replace(config, n_eval_tasks=args.n_tasks)
    prompts = args.prompts or args.model.parent / "prompts.json"
    sets = eval_sets(json.loads(prompts.read_text()), config)

    profile = cProfile.Profile() if args.top else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profile:
        profile.enable()
    result = evaluate(args.model, args.adapter, sets, config, "cpu")
    if profile:
        profile.disable()
    figures = {
        "model": str(args.model),
        "adapter": str(args.adapter) if args.adapter else None,
        "threads": args.threads,
        "batch_size": config.batch_size,
        "sizes": [len(sets.harmful), len(sets.utility), len(sets.general)],
        "cpu_s": round(time.process_time() - cpu, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "load_average_after": os.getloadavg(),
        "metrics": result["metrics"],
    }
    print(json.dumps(figures))
    if profile:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.top)
        print(text.getvalue())
    if args.json:
        args.json.write_text(json.dumps(figures | {"result": result}) + "\n")
    return figures


if __name__ == "__main__":
    main()
