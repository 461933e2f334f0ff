"""The corrections store on a real SQLite file: replace, delete, re-delivery, crash safety, many writers."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backend.learning.store import Store, png_to_mask

ROOT = Path(__file__).resolve().parents[1]


def _mask(h: int = 12, w: int = 16, box: tuple[int, int, int, int] = (2, 8, 3, 9)) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[box[0] : box[1], box[2] : box[3]] = True
    return m


def _put(store: Store, mask: np.ndarray | None, *, ann: int = 5, task: int = 50, **kw: object) -> str:
    args = dict(
        project=1,
        annotation_id=ann,
        task_id=task,
        group_key='["field:group", "a"]',
        image_url=f"/data/upload/1/{task}.png",
        mask=mask,
    )
    args.update(kw)
    return store.put_correction(**args)  # type: ignore[arg-type]


def test_insert_update_replaces_and_redelivery_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert _put(store, _mask()) == "inserted"
    assert store.pending(1) == 1
    assert _put(store, _mask()) == "unchanged"  # the same event delivered again
    assert store.pending(1) == 1
    new = _mask(box=(0, 4, 0, 4))
    assert _put(store, new) == "updated"
    assert store.pending(1) == 2
    (c,) = store.corrections(1)
    assert np.array_equal(c.mask, new) and (c.height, c.width) == (12, 16) and not c.empty
    assert store.count_corrections(1) == 1


def test_stale_event_does_not_revert(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert _put(store, _mask(box=(0, 4, 0, 4)), ls_updated="2026-01-02T00:00:00Z") == "inserted"
    assert _put(store, _mask(), ls_updated="2026-01-01T00:00:00Z") == "stale"
    assert np.array_equal(store.corrections(1)[0].mask, _mask(box=(0, 4, 0, 4)))


def test_delete_removes_and_tombstone_blocks_late_create(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _put(store, _mask())
    assert store.delete_correction(1, 5) is True
    assert store.corrections(1) == []
    assert store.pending(1) == 2
    assert store.delete_correction(1, 5) is False  # re-delivered delete
    assert store.pending(1) == 2
    assert _put(store, _mask()) == "deleted_before"
    assert store.corrections(1) == []


def test_empty_correction_and_latest_annotation_per_task(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert _put(store, None, ann=1, task=7) == "inserted"
    assert _put(store, _mask(), ann=2, task=7) == "inserted"  # a second annotator, same task, later
    (c,) = store.corrections(1)
    assert c.annotation_id == 2
    _put(store, None, ann=3, task=8)
    empty = [c for c in store.corrections(1) if c.task_id == 8][0]
    assert empty.empty and empty.mask is None and empty.width == 0


def test_image_hash_kept_across_mask_updates_of_the_same_image(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _put(store, _mask())
    store.set_image_hash(1, 5, "ab" * 32)
    assert store.pending(1) == 1  # filling the hash is not a change
    _put(store, _mask(box=(1, 2, 1, 2)))
    assert store.corrections(1)[0].image_hash == "ab" * 32
    _put(store, _mask(box=(1, 2, 1, 2)), image_url="/data/upload/1/other.png")
    assert store.corrections(1)[0].image_hash is None


def test_mark_trained_resets_the_counter_to_what_was_read(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for a in range(4):
        _put(store, _mask(), ann=a, task=a)
    seq = store.change_seq(1)
    _put(store, _mask(), ann=9, task=9)  # arrives while the fine-tune runs
    store.request_training(1)
    with store.write() as con:
        store.mark_trained(con, 1, seq)
    assert store.pending(1) == 1
    assert store.training_requested(1) is False


def test_bad_mask_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="bool HxW"):
        _put(store, np.zeros((3, 3), np.uint8))
    with pytest.raises(TypeError, match="'7'"):
        _put(store, _mask(), task="7")


def _run(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def test_correction_survives_sigkill_right_after_the_write(tmp_path: Path) -> None:
    proc = _run(
        f"""
        import os, sys, time, numpy as np
        from backend.learning.store import Store
        s = Store({str(tmp_path)!r})
        m = np.zeros((9, 11), bool); m[2:5, 3:8] = True
        print(s.put_correction(project=3, annotation_id=1, task_id=2, group_key="k", image_url="u", mask=m),
              flush=True)
        time.sleep(60)
        """
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "inserted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    (c,) = Store(tmp_path).corrections(3)
    expected = np.zeros((9, 11), bool)
    expected[2:5, 3:8] = True
    assert np.array_equal(c.mask, expected)
    con = sqlite3.connect(tmp_path / "cosod.sqlite3")  # a plain reader sees the committed row too
    try:
        (png,) = con.execute("SELECT mask_png FROM corrections WHERE project = 3").fetchone()
    finally:
        con.close()
    assert np.array_equal(png_to_mask(png), expected)


def test_concurrent_writers_from_several_processes(tmp_path: Path) -> None:
    Store(tmp_path)
    procs = [
        _run(
            f"""
            import numpy as np
            from backend.learning.store import Store
            s = Store({str(tmp_path)!r})
            for k in range(40):
                m = np.zeros((8, 8), bool); m[: (k % 8) + 1] = True
                s.put_correction(project=1, annotation_id={w} * 1000 + k, task_id={w} * 1000 + k,
                                 group_key="g", image_url=f"u{{k}}", mask=m)
                if k % 10 == 9:
                    s.delete_correction(1, {w} * 1000 + k)
            print("done", flush=True)
            """
        )
        for w in range(4)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "done"
    store = Store(tmp_path)
    assert store.count_corrections(1) == 4 * 36
    assert store.pending(1) == 4 * 44  # 40 inserts and 4 deletes per writer, none lost
