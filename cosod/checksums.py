"""Content sha256 of (large) files, streamed in chunks and cached in a sidecar next to each file.

A weights file is named by what it holds, not by where or when it was written: copying it keeps its digest,
changing one byte changes it. Hashing a ViT-B file (~350 MB) takes about a second, so the digest is cached in
``<file>.sha256``, a small JSON object::

    {"sha256": "<64 hex>", "name": "<file name>", "size": <bytes>, "mtime_ns": <int>, "inode": <int>}

The sidecar is only a shortcut. It is used when its name, size, mtime_ns and inode all match the file and the
sidecar itself was written after the file's last change (a file rewritten within the same clock tick as the
sidecar is rehashed, as git does for "racily clean" entries); in every other case the file is hashed again and
the sidecar rewritten. A folder that cannot be written (a read-only mount) still works: the file is hashed at
every start and the failed write is logged once per folder, at debug level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .atomic import atomic_write

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read: memory stays bounded whatever the file size
SIDECAR_SUFFIX = ".sha256"
FILE_MODE = 0o644  # weights and digests are public: readable by the (non-root) user that serves them
_unwritable_logged: set[str] = set()


def file_sha256(path: str | os.PathLike[str], chunk: int = CHUNK) -> str:
    """Hex sha256 of the file's content, read ``chunk`` bytes at a time (never the whole file at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the digest of ``path`` is cached: ``<path>.sha256``."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _key(path: Path, st: os.stat_result) -> dict[str, int | str]:
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def read_sidecar(path: str | os.PathLike[str]) -> str | None:
    """The cached digest of ``path`` when its sidecar is present, readable and fresh, else None."""
    p = Path(path)
    side = sidecar_path(p)
    try:
        st, side_st = p.stat(), side.stat()
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in _key(p, st).items()):
        return None
    if side_st.st_mtime_ns <= st.st_mtime_ns:  # written in the file's own clock tick: cannot be trusted
        return None
    digest = data.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        return None
    return digest


def write_sidecar(path: str | os.PathLike[str], digest: str, st: os.stat_result | None = None) -> bool:
    """Cache ``digest`` for ``path`` (atomically). ``st``: the stat taken before hashing, so a file changed
    while it was hashed is never recorded under its new stat. False when the folder is not writable."""
    p = Path(path)
    record = json.dumps({"sha256": digest, **_key(p, st or p.stat())}).encode()

    def write(f: IO[bytes]) -> None:
        os.fchmod(f.fileno(), FILE_MODE)
        f.write(record)

    try:
        atomic_write(sidecar_path(p), write)
    except OSError as exc:
        folder = str(p.parent)
        if folder not in _unwritable_logged:
            _unwritable_logged.add(folder)
            log.debug(
                "cannot write sha256 sidecars in %s (%s): its files are hashed at each start",
                folder,
                exc,
            )
        return False
    return True


def cached_sha256(path: str | os.PathLike[str], *, use_sidecar: bool = True) -> str:
    """Content sha256 of ``path``: from its sidecar when fresh (and ``use_sidecar``), else hashed (and the
    sidecar rewritten)."""
    p = Path(path)
    if use_sidecar and (digest := read_sidecar(p)) is not None:
        return digest
    st = p.stat()
    digest = file_sha256(p)
    write_sidecar(p, digest, st)
    log.debug("sha256 of %s: %s", p, digest)
    return digest


def copy_with_sha256(
    src: str | os.PathLike[str], dest: str | os.PathLike[str], check: Callable[[str], None] | None = None
) -> str:
    """Copy ``src`` to ``dest`` atomically, hashing the bytes as they are copied (one pass, ``CHUNK`` at a
    time), and cache the digest in ``dest``'s sidecar; both files get mode 0644. ``check(digest)`` runs
    before ``dest`` is replaced: when it raises, ``dest`` is left as it was and no temporary file remains."""
    h = hashlib.sha256()

    def write(out: IO[bytes]) -> None:
        os.fchmod(out.fileno(), FILE_MODE)  # not the temp file's 0600
        with open(src, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
                out.write(block)
        if check is not None:
            check(h.hexdigest())

    written = atomic_write(dest, write)
    write_sidecar(written, h.hexdigest())
    return h.hexdigest()
