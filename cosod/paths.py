"""Where the library looks for files, importable without torch (the backend's loader watches these)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WEIGHTS_DIR = "weights"


def weights_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights directory: ``path``, else ``$COSOD_WEIGHTS_DIR``, else ``weights/``."""
    return Path(path or os.environ.get("COSOD_WEIGHTS_DIR") or DEFAULT_WEIGHTS_DIR)
