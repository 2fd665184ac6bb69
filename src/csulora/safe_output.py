"""Safe output: never clobber, never touch an input, never leave a half-written or missing output.

Every output is written into a temporary sibling and renamed into place, under a lock file next to
it so that two runs writing the same path cannot both win. Temporaries, the lock and a displaced old
output carry the writer's pid in their names (``.NAME.csulora-tmp-PID-XXXX``, a directory that holds
the file being written and anything its writer puts beside it), so a later run can recognise those
of a killed process and remove them (or restore the old output, see ``atomic_dir``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CsuloraError, CsuloraWarning

TMP_TAG = "csulora-tmp"
OLD_TAG = "csulora-old"
LOCK_TAG = "csulora-lock"

_held_locks: dict[str, int] = {}  # real path -> nesting depth, so one run may re-enter its own reservation


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{LOCK_TAG}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_stale(path: Path) -> None:
    """Remove temporaries of dead csulora runs next to ``path``; restore an old output they displaced."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.({TMP_TAG}|{OLD_TAG})-(\d+)-[0-9a-f]+$")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for sibling in sorted(siblings):
        match = pattern.match(sibling.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == OLD_TAG and not os.path.lexists(path):
            os.rename(sibling, path)  # a run killed between its two renames: the old output comes back
            warnings.warn(f"{path}: restored the previous output after an interrupted run", CsuloraWarning, 2)
        else:
            _remove(sibling)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold ``.NAME.csulora-lock`` (holding our pid) while this run owns ``path``."""
    key = str(path)
    if key in _held_locks:
        _held_locks[key] += 1
        try:
            yield
        finally:
            _held_locks[key] -= 1
        return
    lock = _lock_path(path)
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
                age = time.time() - lock.stat().st_mtime
            except (OSError, ValueError):
                pid, age = 0, 0.0
            # a lock without a pid yet may be a run that has just created it: live for a few seconds
            if pid and _pid_alive(pid) or not pid and age < 10:
                who = f"pid {pid}" if pid else "starting"
                raise CsuloraError(f"{path}: another csulora run ({who}) is writing this output") from None
            lock.unlink(missing_ok=True)  # left by a killed run
            continue
        except OSError as exc:
            raise CsuloraError(f"{path}: cannot write in {path.parent} ({exc.strerror})") from None
        break
    else:
        raise CsuloraError(f"{path}: cannot take the lock {lock}")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        _held_locks[key] = 1
        yield
    finally:
        _held_locks.pop(key, None)
        lock.unlink(missing_ok=True)


def real_path(path: str | os.PathLike) -> Path:
    """The absolute path with every symlink of its existing part resolved."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, is inside, or contains an input or the current directory."""
    target = real_path(out)
    cwd = real_path(os.getcwd())
    if target == cwd or target in cwd.parents:
        raise CsuloraError(f"{out}: is (or contains) the current directory; choose another output path")
    for source in inputs:
        if source is None or not os.path.lexists(os.path.expanduser(source)):
            continue  # a Hub id: not a local path
        resolved = real_path(source)
        linked = [resolved]
        if resolved.is_dir():  # a Hub snapshot's files are links into its blob store
            with contextlib.suppress(OSError):
                linked += [real_path(child) for child in resolved.iterdir() if child.is_symlink()]
        if any(_overlaps(target, item) for item in linked):
            raise CsuloraError(f"{out}: is, is inside or contains the input {source}; choose another output path")


def _check_replaceable(
    path: Path, shown: str | os.PathLike, force: bool, owned: Callable[[Path], bool] | None, kind: str
) -> None:
    if not os.path.lexists(path):
        return
    if not force:
        raise CsuloraError(f"{shown}: already exists (force=True overwrites it)")
    if kind == "file" and path.is_dir():
        raise CsuloraError(f"{shown}: is a directory, expected a file path")
    if kind == "dir" and not path.is_dir():
        raise CsuloraError(f"{shown}: is a file, expected a directory path")
    empty = path.is_dir() and not any(path.iterdir()) or path.is_file() and path.stat().st_size == 0
    if not empty and (not owned(path) if owned is not None else kind == "dir"):
        raise CsuloraError(
            f"{shown}: exists and was not written by csulora; force=True only replaces csulora's outputs"
        )


@dataclass(frozen=True)
class ReservedOutput:
    """An output that ``reserve_output`` checked and holds the lock of.

    Give it to ``atomic_file`` / ``atomic_dir`` in place of a path: they write it without checking it again.
    """

    target: Path  # the real path
    shown: str | os.PathLike  # the path as given, for messages
    force: bool
    owned: Callable[[Path], bool] | None
    kind: str  # "file" or "dir"


Output = str | os.PathLike | ReservedOutput


@contextlib.contextmanager
def reserve_output(
    path: str | os.PathLike,
    *,
    force: bool = False,
    owned: Callable[[Path], bool] | None = None,
    inputs: Iterable = (),
    kind: str = "file",
) -> Iterator[ReservedOutput]:
    """Check ``path`` can be written (before any work is done) and hold its lock; yields the reservation.

    ``owned(path)`` says whether an existing ``path`` is an output csulora wrote, the only kind
    ``force`` may replace (an empty file or directory always may). Re-entrant within one process.
    """
    check_not_input(path, inputs)
    target = real_path(path)
    created = []
    for parent in reversed([target.parent, *target.parent.parents]):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as exc:
                raise CsuloraError(f"{path}: cannot create {parent} ({exc.strerror})") from None
            created.append(parent)
    try:
        with _lock(target):
            _clean_stale(target)
            _check_replaceable(target, path, force, owned, kind)
            yield ReservedOutput(target, path, force, owned, kind)
    except BaseException:
        for parent in reversed(created):  # only the empty directories this run made
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


@contextlib.contextmanager
def _reserved(
    path: Output, force: bool, owned: Callable[[Path], bool] | None, inputs: Iterable, kind: str
) -> Iterator[ReservedOutput]:
    """``path``'s reservation: the one given, or a new one."""
    if isinstance(path, ReservedOutput):
        if path.kind != kind:
            raise ValueError(f"{path.shown}: reserved as a {path.kind}, written as a {kind}")
        yield path
        return
    with reserve_output(path, force=force, owned=owned, inputs=inputs, kind=kind) as reserved:
        yield reserved


@contextlib.contextmanager
def atomic_file(
    path: Output,
    *,
    force: bool = False,
    owned: Callable[[Path], bool] | None = None,
    inputs: Iterable = (),
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it becomes ``path`` in one rename.

    The temporary file lies in a directory of its own (``.NAME.csulora-tmp-PID-XXXX/NAME``), so that
    whatever a writer puts beside it (safetensors writes a ``.tmpXXXXXX`` and renames it) is inside
    a directory that is provably ours, and a later run removes it all if this one is killed. ``path``
    may be a ``ReservedOutput``: then it is written as it was reserved (``force``, ``owned`` and
    ``inputs`` are its own).
    """
    with _reserved(path, force, owned, inputs, "file") as reserved:
        target, shown, force, owned = reserved.target, reserved.shown, reserved.force, reserved.owned
        tmp_dir = _sibling(target, TMP_TAG)
        tmp = tmp_dir / target.name
        try:
            os.mkdir(tmp_dir, 0o700)
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode from the umask
            mode = tmp.stat().st_mode & 0o777
            yield tmp
            os.chmod(tmp, mode)  # writers that recreate the file (safetensors does) make it 0600
            _check_replaceable(target, shown, force, owned, "file")
            if force:
                os.replace(tmp, target)
            else:
                _link_new(tmp, target, shown)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _link_new(tmp: Path, target: Path, shown: str | os.PathLike) -> None:
    """Put ``tmp`` at ``target`` only if nothing is there (a hard link cannot clobber)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise CsuloraError(f"{shown}: already exists (force=True overwrites it)") from None
    except OSError:  # no hard links on this filesystem: the lock already excludes other csulora runs
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(
    path: Output,
    *,
    force: bool = False,
    owned: Callable[[Path], bool] | None = None,
    inputs: Iterable = (),
) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it becomes ``path``.

    With ``force`` the old and new directories swap in one ``renameat2(RENAME_EXCHANGE)``; where
    that is unavailable the old one is renamed aside first and, if the run dies between the two
    renames, the next run that writes ``path`` puts it back. Either way ``path`` always holds a
    complete output, old or new. ``path`` may be a ``ReservedOutput`` (see ``atomic_file``).
    """
    with _reserved(path, force, owned, inputs, "dir") as reserved:
        target, shown, force, owned = reserved.target, reserved.shown, reserved.force, reserved.owned
        tmp = _sibling(target, TMP_TAG)
        try:
            os.mkdir(tmp, 0o777)  # mode from the umask
            yield tmp
            file_mode = tmp.stat().st_mode & 0o666
            for item in tmp.rglob("*"):  # writers that recreate files (safetensors does) make them 0600
                if item.is_file() and not item.is_symlink():
                    os.chmod(item, file_mode)
            _check_replaceable(target, shown, force, owned, "dir")
            if not os.path.lexists(target):
                os.rename(tmp, target)
            elif _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
            else:
                old = _sibling(target, OLD_TAG)
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value


def strict_json(value: Any, indent: int | None = 2) -> str:
    """JSON that any parser accepts: a non-finite number becomes the string "inf", "-inf" or "nan"."""
    return json.dumps(_strict(value), indent=indent, allow_nan=False)
