"""``csulora lab``: the paper's experiment in miniature, end to end, on a CPU."""

from __future__ import annotations

from pathlib import Path

# What the lab imports beyond the core install (the [lab] extra).
LAB_MODULES = ("tokenizers", "transformers", "peft", "matplotlib")


def cmd_lab(args) -> int:
    from ..extras import require_extra

    require_extra("lab", *LAB_MODULES, feature="csulora lab")
    from .runner import run_lab

    document = run_lab(args.out, args.size, args.seed, quiet=args.quiet, threads=args.threads)
    print(document["verdict"]["sentence"])
    print(f"wrote {args.out / 'report.md'}, {args.out / 'results.json'}, {args.out / 'frontier.png'}")
    return 0


def register(sub) -> None:
    from .runner import SIZES

    p = sub.add_parser(
        "lab",
        help="build base / aligned / LoRA-attacked models locally, correct with every method, report",
        description="Reproduce the CSULoRA experiment in miniature on a CPU: a synthetic world, a small Llama "
        "trained from scratch, an alignment fine-tune, a harmful LoRA attack, every correction method, evaluation "
        "and a report. Trained artifacts are cached under OUT/cache.",
    )
    p.add_argument("--out", type=Path, default=Path("csulora-lab"), help="output directory (./csulora-lab)")
    p.add_argument("--size", default="default", choices=list(SIZES), help="tiny (tests, ~1 min), small, default")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the training and the sweep (0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for these small models)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(func=cmd_lab)
