"""Checkpoint file I/O. Atomic writes: a temp file in the destination's folder, renamed into place.

Readers in other processes see the old file or the new one, never a partial one. A write that raises
leaves the old file and no temp file (the temp file is removed on any exception). A process killed
mid-write (SIGKILL, the OOM killer, a power cut) cannot remove its temp file: it stays, named
``.<dest name>.<random>.tmp`` next to ``dest``, and is never read as ``dest``. :func:`temp_file_target`
names such a file's destination, for a cleaner that knows no writer is at work (e.g. under the writers'
lock). The folder is fsynced after the rename, so a rename that returned survives a power cut: a record
naming ``dest`` that is written after this returns never outlives the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


TEMP_SUFFIX = ".tmp"


def atomic_write(dest: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a binary temp file next to ``dest``, then rename it to ``dest``."""
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is done
        pass
    finally:
        os.close(fd)


def temp_file_target(name: str) -> str | None:
    """The destination name of a temp file :func:`atomic_write` made (``.<dest>.<random>.tmp`` -> ``<dest>``),
    or None for any other name. A temp file that outlived its writer (killed mid-write) is found this way;
    delete it only when no writer of that destination can still be running."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    dest, dot, rand = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    return dest if dot and dest and rand else None


def torch_save_atomic(obj: Any, dest: str | os.PathLike[str]) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(dest, lambda f: torch.save(obj, f))


def torch_load_dict(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """``torch.load`` a dict with ``weights_only=True`` (no code runs); CheckpointError naming ``what`` and
    the path when the file is missing, unreadable or not a dict."""
    import torch

    from .errors import CheckpointError

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} not found: {p}")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {what} {p}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{p} holds a {type(raw).__name__}, not a {what}")
    return raw
