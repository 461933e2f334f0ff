"""``cosod-worker`` as ``tests/test_finetune_faults.py`` runs it: the real worker, plus two things done
here, in the test's process tree only (nothing in ``backend/`` knows about them):

- **A stop at a chosen point of a fine-tune**, so that the test's SIGKILL lands exactly there. The test
  writes the point (``train``: after the second training step; ``write``: half of the checkpoint's bytes
  in its temp file; ``saved``: the checkpoint renamed into place, not yet registered) to
  ``$TEST_FT_PAUSE_DIR/at``. The first worker of the test to reach that point takes the file (an atomic
  rename, so one worker only), writes its pid to ``$TEST_FT_PAUSE_DIR/paused`` and sleeps until killed;
  every other run goes through.
- **The start-up recovery** (:func:`backend.jobs.finetuning.recover_finetunes`), called right after the
  worker installs its job context, where ``backend/jobs/worker.py`` is to call it.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any

PAUSE_DIR = os.environ.get("TEST_FT_PAUSE_DIR")


def _take(point: str) -> bool:
    """True for the one process that claims the pending stop at ``point``."""
    if not PAUSE_DIR:
        return False
    at = Path(PAUSE_DIR) / "at"
    try:
        if at.read_text().strip() != point:
            return False
        at.rename(Path(PAUSE_DIR) / f"taken-{os.getpid()}")
    except OSError:  # no stop asked, or another worker took it first
        return False
    return True


def _stop_here(point: str) -> None:
    paused = Path(PAUSE_DIR or ".") / "paused"
    paused.with_suffix(".tmp").write_text(f"{os.getpid()} {point}")
    paused.with_suffix(".tmp").rename(paused)
    while True:  # until SIGKILL
        time.sleep(60)


def _install_stops() -> None:
    import torch

    import backend.learning.finetune as lf

    stage = lf._stage

    def stage_then_stop(progress: Any, name: str, **info: Any) -> None:
        stage(progress, name, **info)
        if (name == "saved" or (name == "train" and info.get("step", 0) >= 2)) and _take(name):
            _stop_here(name)

    lf._stage = stage_then_stop  # type: ignore[assignment]

    save = torch.save

    def save_then_stop(obj: Any, f: Any, *args: Any, **kw: Any) -> None:
        if hasattr(f, "write") and _take("write"):  # the checkpoint's temp file (cosod.atomic)
            buf = io.BytesIO()
            save(obj, buf, *args, **kw)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _stop_here("write")
        save(obj, f, *args, **kw)

    torch.save = save_then_stop


def _install_recovery() -> None:
    import backend.jobs.worker as worker
    from backend.jobs.finetuning import recover_finetunes

    install = worker.install_context

    def install_and_recover(ctx: Any) -> None:
        install(ctx)
        recover_finetunes(ctx)

    worker.install_context = install_and_recover  # type: ignore[assignment]


if __name__ == "__main__":
    _install_stops()
    _install_recovery()
    from backend.jobs.worker import main

    sys.exit(main(sys.argv[1:]))
