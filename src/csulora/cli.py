"""The ``csulora`` command: a thin shell over the library. Errors are one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from ._version import __version__
from .errors import CsuloraError, CsuloraWarning
from .evaluate import cli as evaluate_cli
from .memory import map_large_allocations

if TYPE_CHECKING:
    from .methods import MethodParams
    from .settings import SubspaceSettings
    from .sources import BasisSource


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser that adds its generated options when it is first used (parsed or printed).

    The method flags come from the registry, which imports torch: ``csulora --help``, ``--version`` and
    the commands that need no method then start without it.
    """

    def __init__(
        self, *args: Any, complete: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._complete = complete

    def _completed(self) -> None:
        if self._complete is not None:
            complete, self._complete = self._complete, None
            complete(self)

    def parse_known_args(  # type: ignore[override]  # argparse's overloads, one signature here
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._completed()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._completed()
        return super().format_usage()

    def format_help(self) -> str:
        self._completed()
        return super().format_help()


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_subspace_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The subspace flags, one per ``SubspaceSettings`` field, and ``--device``; returns their actions by
    name (a method setting may share one, e.g. --seed)."""
    from .settings import SubspaceSettings, setting_specs

    group = parser.add_argument_group("subspace (randomized SVD of V = aligned - base)")
    actions = [
        group.add_argument(
            spec.flag,
            type=spec.type,
            default=spec.default,
            help=spec.help + ("" if spec.default is None else " (%(default)s)"),
        )
        for spec in setting_specs(SubspaceSettings)
    ]
    actions.append(
        group.add_argument("--device", default="auto", help="where the SVDs run: auto (CUDA if present), cpu, cuda:N")
    )
    return {action.dest: action for action in actions}


def _subspace_settings(args: argparse.Namespace) -> SubspaceSettings:
    from .settings import SubspaceSettings, setting_specs

    return SubspaceSettings(**{spec.name: getattr(args, spec.name) for spec in setting_specs(SubspaceSettings)})


def _basis_source(args: argparse.Namespace) -> BasisSource:
    """Where ``correct`` and ``inspect`` take the basis from: --subspace, or --base (and --aligned)."""
    from .sources import BasisSource

    return BasisSource(
        subspace=args.subspace,
        base=args.base,
        aligned=args.aligned,
        subspace_settings=_subspace_settings(args),
        allow_pickle=args.allow_pickle,
        device=args.device,
        verify=args.verify,
    )


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subspace", help="subspace file from `csulora subspace`")
    parser.add_argument("--base", help="base checkpoint (before alignment): directory or Hub id")
    parser.add_argument("--aligned", help="aligned checkpoint (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--allow-pickle", action="store_true", help="load .bin files (weights_only=True)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="prove the subspace (or --aligned) comes from the adapter's model: compare every target module's "
        "whole weight by sha256, not sampled rows; an error if they differ or cannot be compared",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_method_options(parser: argparse.ArgumentParser, shared: dict[str, argparse.Action]) -> None:
    """``--method`` and one flag per registered method setting, generated from the registry.

    A setting that is also a subspace flag (``shared``: the ``--seed`` of the sketch) keeps that one flag.
    """
    from .methods import DEFAULT_METHOD, METHODS, all_settings

    listing = "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items())
    group = parser.add_argument_group("method", description=f"The correction methods. {listing}.")
    group.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help="correction (%(default)s)")
    for name, (spec, users) in all_settings().items():
        used_by = f"{', '.join(users)}: {spec.help}"
        if name in shared:
            action = shared[name]
            if (action.type, action.default) != (spec.type, spec.default):
                raise TypeError(f"setting {name} of {', '.join(users)} differs from the subspace flag {spec.flag}")
            action.help = f"{action.help}; {used_by}"
            continue
        default = "" if spec.default is None else " (%(default)s)"
        choices = list(spec.choices) if spec.choices else None
        group.add_argument(spec.flag, type=spec.type, default=spec.default, choices=choices, help=used_by + default)


def _method_settings(args: argparse.Namespace) -> MethodParams:
    from .methods import MethodParams, all_settings

    return MethodParams(**{name: getattr(args, name) for name in all_settings()})


def cmd_subspace(args: argparse.Namespace) -> int:
    from .safe_output import reserve_output
    from .subspace import is_subspace_file

    if args.merge:
        if args.base or args.aligned or args.shard is not None or args.adapter or args.targets:
            raise CsuloraError("--merge takes only the shard files and -o")
        inputs = list(args.merge)
    else:
        from .shards import parse_shard

        if not (args.base and args.aligned):
            raise CsuloraError("subspace needs --base and --aligned (or --merge SHARD_FILES)")
        settings = _subspace_settings(args)
        shard = parse_shard(args.shard) if args.shard is not None else None  # --shard '' is an error, not no shard
        inputs = [args.base, args.aligned, args.adapter]
    # the output is checked and locked before any SVD runs, and stays ours until it is written
    with reserve_output(args.output, force=args.force, owned=is_subspace_file, inputs=inputs) as reserved:
        if args.merge:
            from .shards import merge_shards

            subspace = merge_shards(args.merge)
        else:
            from .subspace_stream import compute_subspace

            subspace = compute_subspace(
                args.base,
                args.aligned,
                targets=_csv(args.targets) if args.targets else None,
                adapter=args.adapter,
                settings=settings,
                allow_pickle=args.allow_pickle,
                progress=not args.quiet,
                device=args.device,
                shard=shard,
            )
        subspace.save(reserved)  # written under the reservation: checked once
    ks = [meta["k"] for meta in subspace.module_metadata().values()]
    span = f", k from {min(ks)} to {max(ks)}" if ks else ""
    print(f"wrote {args.output}: {len(ks)} modules{span}")
    return 0


def cmd_correct(args: argparse.Namespace) -> int:
    from .pipeline import REPORT_NAME, correct_adapter

    report = correct_adapter(
        args.adapter,
        args.output,
        _basis_source(args),
        method=args.method,
        method_settings=_method_settings(args),
        force=args.force,
        progress=not args.quiet,
    )
    kept = report["energy_after"] / report["energy_before"] if report["energy_before"] else 1.0
    print(
        f"wrote {args.output} ({args.method}, {len(report['modules'])} modules, "
        f"{kept:.1%} of the update's energy kept); report in {args.output / REPORT_NAME}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import alignment_diagnostic, format_table, is_png, plot_decomposition
    from .safe_output import reserve_output, strict_json

    if args.plot:
        from .extras import require_extra

        require_extra("plot", "matplotlib", feature="csulora inspect --plot")
    source = _basis_source(args)
    inputs = [args.adapter, args.subspace, args.base, args.aligned]
    with (
        reserve_output(args.plot, force=args.force, owned=is_png, inputs=inputs)
        if args.plot
        else contextlib.nullcontext()
    ) as reserved:
        diagnostic = alignment_diagnostic(args.adapter, source, progress=not args.quiet)
        rows = diagnostic["modules"]
        if args.plot:
            pair = (
                f"subspace {args.subspace}"
                if args.subspace
                else f"base {args.base}, aligned {args.aligned or 'from adapter'}"
            )
            assert reserved is not None  # reserved above whenever --plot is given
            plot_decomposition(rows, reserved, title=f"adapter {args.adapter}  |  {pair}")
    if args.json:
        print(strict_json(diagnostic))
    else:
        print(format_table(rows))
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csulora", description="Closest Safe Update LoRA: post-hoc safety correction of LoRA adapters."
    )
    parser.add_argument("--version", action="version", version=f"csulora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Subcommand)

    p = sub.add_parser("subspace", help="compute the per-module safety subspaces of a (base, aligned) pair")
    p.add_argument("--base", help="base checkpoint (before alignment)")
    p.add_argument("--aligned", help="aligned checkpoint")
    p.add_argument("-o", "--output", required=True, type=Path, help="subspace file to write (.safetensors)")
    p.add_argument("--targets", help="comma-separated module names, PEFT style (q_proj,v_proj,...)")
    p.add_argument("--adapter", help="take the modules of this PEFT adapter instead of --targets")
    p.add_argument("--shard", metavar="I/N", help="compute only shard I of N (0 <= I < N), balanced by size")
    p.add_argument("--merge", nargs="+", metavar="SHARD", help="join the --shard files of one run into -o")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin files (weights_only=True)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_subspace_options(p)
    p.set_defaults(func=cmd_subspace)

    shared: dict[str, argparse.Action] = {}
    p = sub.add_parser(
        "correct",
        help="write a corrected PEFT adapter, its model card and csulora_report.json",
        complete=lambda parser: _add_method_options(parser, shared),  # the registry: only when `correct` runs
    )
    p.add_argument("adapter", help="PEFT LoRA adapter directory (or Hub id)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output adapter directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    _add_source_options(p)
    shared |= _add_subspace_options(p)
    p.set_defaults(func=cmd_correct)

    p = sub.add_parser(
        "inspect", help="per-module decomposition and signed overlap with V of an adapter (writes nothing but --plot)"
    )
    p.add_argument("adapter", help="PEFT LoRA adapter directory (or Hub id)")
    p.add_argument("--json", action="store_true", help='machine-readable output: {"modules": [...], "adapter": {...}}')
    p.add_argument(
        "--plot",
        type=Path,
        help="write a PNG heatmap of rho_f / rho_h / rho_o and the signed overlap with V, layer x module type",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    _add_source_options(p)
    _add_subspace_options(p)
    p.set_defaults(func=cmd_inspect)

    evaluate_cli.register(sub)
    _add_plugin_commands(sub)
    return parser


# Other packages add commands through entry points of this group, each a ``register(subparsers)``
# (the lab's ``csulora lab``); the product imports none of them by name.
COMMANDS_GROUP = "csulora.commands"


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """A command that reads checkpoints module by module sets ``streams_checkpoints=True`` in its defaults."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda entry: entry.name):
        entry.load()(sub)


_default_showwarning = warnings.showwarning
_pending_warnings: list[str] = []


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Our own warnings as one line, once the command succeeds; everybody else's as Python prints them.

    A run that fails prints only its error: one line that says what is wrong.
    """
    if issubclass(category, CsuloraWarning):
        _pending_warnings.append(f"csulora: warning: {message}")
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    """SIGTERM (a scheduler, ``timeout``) unwinds like Ctrl-C, so temporary outputs are removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", CsuloraWarning)  # each run reports its own, even in one process
        warnings.showwarning = _show_warning
        return _run(args)


def _streams_checkpoints(args: argparse.Namespace) -> bool:
    """Whether the command may read checkpoints module by module: ``subspace``, a plugin command that says
    so (the lab), and any command given a base checkpoint (a subspace computed on the fly, or Safe LoRA's
    V even beside --subspace)."""
    return (
        args.func is cmd_subspace
        or getattr(args, "streams_checkpoints", False)
        or getattr(args, "base", None) is not None
    )


# Library messages name settings (``base=...``, ``verify=True``); the CLI's name the flags (``--base``).
_SETTING_IN_MESSAGE = re.compile(r"\b([a-z][a-z0-9_]*)=(?:\.\.\.|True)")


def _in_flags(message: str, args: argparse.Namespace) -> str:
    """``message`` with each setting this command has a flag for named by its flag."""

    def flag(match: re.Match[str]) -> str:
        name = match[1]
        return "--" + name.replace("_", "-") if name in vars(args) else match[0]

    return _SETTING_IN_MESSAGE.sub(flag, message)


def _run(args: argparse.Namespace) -> int:
    if _streams_checkpoints(args):  # big tensors freed module by module go straight back to the OS
        # (not for `correct --subspace` alone: its few-MB factors are reused by malloc instead of being
        # mapped and faulted in afresh, which costs system time; docs/performance.md)
        map_large_allocations()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    _pending_warnings.clear()
    try:
        code = args.func(args)
        for line in _pending_warnings:
            print(_in_flags(line, args), file=sys.stderr)
        return code
    except CsuloraError as exc:
        print(f"csulora: error: {_in_flags(str(exc), args)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that vanished or cannot be read or written: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"csulora: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("csulora: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
