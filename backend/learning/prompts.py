"""Provisional exemplars: the mask an interactive prompt (a smart keypoint, rectangle or brush) gave a task,
kept for a while so that the group's propagation job can use it.

A prompt is not an annotation. Its mask never enters the corrections table (:mod:`.store`), so it is never a
fine-tune target; it only joins a group's exemplars in :mod:`backend.jobs.propagation`, and only while

- it is younger than ``COSOD_PROMPT_TTL`` seconds (default 3600): an older one is deleted when read, and
  every new prompt of a project deletes the project's expired ones (so the files stay bounded by what one
  TTL brings, even where no job reads them again: propagation turned off, tasks deleted);
- its task has no annotation: a stored correction of the task, or an annotation Label Studio lists for it,
  supersedes it (the job deletes it then);
- it is the task's latest prompt: a new prompt of the task replaces the file.

Storage: one file per (project, task), ``MODEL_DIR/prompts/<project>/<task>.npz`` (the mask bit-packed,
its size and the Unix time it was made), written atomically. ``MODEL_DIR`` is what the API processes and the
workers already share (the corrections' SQLite lives there), so the job finds the prompt whichever process
received it, with the in-process queue or with RQ workers, and without Redis.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cosod.atomic import atomic_write

log = logging.getLogger(__name__)

PROMPTS_DIR = "prompts"


@dataclass(frozen=True)
class ProvisionalMask:
    """A prompt's mask for a task: bool HxW at the task image's size, and when it was made (Unix seconds)."""

    task_id: int
    mask: np.ndarray
    created: float


class PromptStore:
    """The provisional exemplars of every project under ``model_dir`` (module doc); ``ttl`` in seconds."""

    def __init__(self, model_dir: str | Path, ttl: float):
        self.root = Path(model_dir) / PROMPTS_DIR
        self.ttl = float(ttl)

    def _path(self, project_id: int, task_id: int) -> Path:
        return self.root / str(int(project_id)) / f"{int(task_id)}.npz"

    def put(self, project_id: int, task_id: int, mask: np.ndarray, *, now: float | None = None) -> float:
        """Keep ``mask`` (bool HxW) as task ``task_id``'s provisional exemplar; returns its time."""
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"a provisional mask must be HxW, got shape {mask.shape}")
        created = time.time() if now is None else float(now)
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            bits=np.packbits(mask, axis=None),
            shape=np.asarray(mask.shape, dtype=np.int64),
            created=np.asarray(created, dtype=np.float64),
        )
        atomic_write(self._path(project_id, task_id), lambda f: f.write(buf.getvalue()))
        self.sweep(project_id, now=created)
        return created

    def sweep(self, project_id: int, *, now: float | None = None) -> int:
        """Delete the project's files older than the TTL (by modification time); how many."""
        now = time.time() if now is None else float(now)
        n = 0
        for path in (self.root / str(int(project_id))).glob("*.npz"):
            try:
                if now - path.stat().st_mtime > self.ttl:
                    path.unlink(missing_ok=True)
                    n += 1
            except OSError:
                continue
        return n

    def load(
        self, project_id: int, task_ids: Iterable[int], *, now: float | None = None
    ) -> dict[int, ProvisionalMask]:
        """Task id -> its live provisional mask, for the tasks among ``task_ids`` that have one. Expired and
        unreadable files are deleted."""
        now = time.time() if now is None else float(now)
        out: dict[int, ProvisionalMask] = {}
        for tid in task_ids:
            path = self._path(project_id, tid)
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    h, w = (int(v) for v in z["shape"])
                    created = float(z["created"])
                    bits = z["bits"]
                    if h < 1 or w < 1 or bits.size * 8 < h * w:
                        raise ValueError(f"shape {h}x{w} does not fit {bits.size} bytes")
                    mask = np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("project %s task %s: bad provisional mask deleted: %s", project_id, tid, exc)
                path.unlink(missing_ok=True)
                continue
            if now - created > self.ttl:
                path.unlink(missing_ok=True)
                continue
            out[int(tid)] = ProvisionalMask(int(tid), mask, created)
        return out

    def stamps(self, project_id: int, task_ids: Iterable[int]) -> dict[int, int]:
        """Task id -> its prompt file's modification time (ns), for the tasks among ``task_ids`` that have
        one: a cheap "did a prompt change?" for a running job (no mask decoded)."""
        out: dict[int, int] = {}
        for tid in task_ids:
            try:
                out[int(tid)] = self._path(project_id, tid).stat().st_mtime_ns
            except OSError:
                continue
        return out

    def drop(self, project_id: int, task_ids: Iterable[int]) -> int:
        """Delete the provisional masks of ``task_ids`` (superseded by an annotation); how many there were."""
        n = 0
        for tid in task_ids:
            path = self._path(project_id, tid)
            if path.is_file():
                path.unlink(missing_ok=True)
                n += 1
        return n


__all__ = ["PROMPTS_DIR", "PromptStore", "ProvisionalMask"]
