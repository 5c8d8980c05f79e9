"""Atomic file writes (a reader sees the old file or folder or the new one, never half of one), and sizes in bytes."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

__all__ = ["atomic_dir", "atomic_file", "parse_bytes", "replace_dir", "write_text_atomic"]


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside ``path`` to write; on success it is renamed onto ``path``, on
    any failure removed (an existing ``path`` is left untouched). The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp folder beside ``directory`` to fill; on success it replaces ``directory``
    (see :func:`replace_dir`), on any failure it is removed. The parent folder is created."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to a temp file beside ``path``, syncs it, and renames it into place.

    The parent folder is created if needed; on any failure the temp file is removed and an
    existing ``path`` is left untouched.
    """
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def replace_dir(tmp: Path, directory: Path) -> Path:
    """Moves the finished folder ``tmp`` to ``directory``, replacing an existing one.

    ``tmp`` must sit beside ``directory`` (same file system). An existing ``directory`` is first
    renamed aside, so at every instant ``directory`` is either the old folder or the new one.
    The folder and its files get the usual permissions (``mkdtemp`` makes them private).
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
        os.replace(directory, old / "x")
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


_UNITS = {"": 1, "B": 1, "KB": 2**10, "K": 2**10, "MB": 2**20, "M": 2**20, "GB": 2**30, "G": 2**30, "TB": 2**40, "T": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"2GB"``, ``"512MB"``, ``"1.5G"`` or a number of bytes → bytes (binary units).

    Raises:
        ConfigError: not a positive size.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(text).upper())
        if not m:
            raise ConfigError(f"memory budget {text!r}: give a size such as 2GB, 512MB or 1.5G")
        value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise ConfigError(f"memory budget {text!r} must be positive")
    return int(value * _UNITS[unit])
