"""Checkpoint file I/O. Atomic writes: a temp file in the destination's folder, renamed into place.

Readers in other processes see the old file or the new one, never a partial one; a crash mid-write leaves
the old file and no temp file behind (the temp file is removed on any exception).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(dest: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a binary temp file next to ``dest``, then rename it to ``dest``."""
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
