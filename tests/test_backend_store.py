"""The corrections store on a real SQLite file: replace, delete, re-delivery, crash safety, many writers."""

from __future__ import annotations

import io
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_input import big_png
from PIL import Image

from backend.learning.store import Store, ls_time, mask_to_png, png_to_mask

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


# -- hostile and oversized input (issue 13) ------------------------------------------------------------


def _raw_row(store: Store, ann: int, task: int, png: bytes | None, width: int, height: int) -> None:
    """A corrections row written straight into SQLite, as an older backend may have left it."""
    con = sqlite3.connect(store.path)
    try:
        con.execute(
            "INSERT INTO corrections (project, annotation_id, task_id, group_key, image_url, image_hash, "
            "mask_png, width, height, empty, digest, ls_updated, updated) "
            "VALUES (1, ?, ?, 'g', 'u', NULL, ?, ?, ?, 0, 'd', '', 1.0)",
            (ann, task, png, width, height),
        )
        con.commit()
    finally:
        con.close()


def test_big_png_is_a_png_of_that_size(monkeypatch: pytest.MonkeyPatch) -> None:
    assert np.array_equal(png_to_mask(big_png(13, 5)), np.zeros((5, 13), bool))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(big_png(16384, 16384))) as im:
        assert im.size == (16384, 16384) and im.mode == "1"


def test_poisoned_rows_are_skipped_with_their_reason_not_decoded(tmp_path: Path) -> None:
    store = Store(tmp_path)
    poison = big_png(16384, 16384)
    _raw_row(store, 101, 11, poison, 16384, 16384)  # the 16384x16384 correction of the issue
    _raw_row(store, 102, 12, poison, 10, 10)  # a row whose PNG is not what it says
    _raw_row(store, 103, 13, mask_to_png(_mask()), 10, 10)
    _raw_row(store, 104, 14, b"\x89PNG not really", 10, 10)
    _raw_row(store, 105, 15, None, -1, 4)
    _put(store, _mask(), ann=106, task=16)
    _raw_row(store, 107, 16, poison, 16384, 16384)  # a later, bad annotation of a task: the good one is used
    _raw_row(store, 108, 17, mask_to_png(_mask())[:50], 16, 12)  # truncated
    t0 = time.perf_counter()
    good, skipped = store.load_corrections(1)
    print(f"{len(skipped)} bad rows skipped in {1000 * (time.perf_counter() - t0):.0f} ms")
    assert [(c.annotation_id, c.task_id) for c in good] == [(106, 16)]
    reasons = {s.annotation_id: s.reason for s in skipped}
    assert reasons[101] == "the stored mask is 16384x16384, over the limit of 50000000 pixels"
    assert reasons[102] == "the stored mask is 16384x16384, over the limit of 50000000 pixels"
    assert reasons[103] == "the stored mask is 16x12, its row says 10x10"
    assert reasons[104] == "the stored mask is not a readable PNG (no PNG header)"
    assert reasons[105] == "the stored mask's size -1x4 is negative"
    assert reasons[107] == reasons[101]
    assert reasons[108].startswith("the stored mask is not a readable PNG (")
    assert skipped[0].as_dict() == {"project": 1, "annotation_id": 101, "task_id": 11, "reason": reasons[101]}
    assert [c.annotation_id for c in store.corrections(1)] == [106]
    assert [c.annotation_id for c in store.corrections(1, max_pixels=100)] == []


def test_delete_corrections_is_one_transaction_and_leaves_tombstones_only_for_stored_rows(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    for a in (3, 4):
        _put(store, _mask(), ann=a, task=a, ls_updated="2026-01-01T00:00:00Z")
    assert store.delete_corrections(1, [4, *range(10, 10_010), 4]) == 1
    assert store.pending(1) == 3
    con = sqlite3.connect(store.path)
    try:
        rows = con.execute(
            "SELECT project, annotation_id, task_id, cutoff >= deleted FROM tombstones"
        ).fetchall()
    finally:
        con.close()
    assert rows == [(1, 4, 4, 1)]
    assert _put(store, _mask(), ann=10) == "inserted"  # in the deleted list, never stored: not blocked
    with pytest.raises(ValueError, match=r"0..2\*\*63-1"):
        store.delete_corrections(1, [2**63])
    assert store.delete_corrections(1, []) == 0


def test_tombstones_of_the_old_schema_block_nothing(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "cosod.sqlite3")
    try:
        con.execute(
            "CREATE TABLE tombstones (project INTEGER NOT NULL, annotation_id INTEGER NOT NULL, "
            "deleted REAL NOT NULL, PRIMARY KEY (project, annotation_id))"
        )
        con.executemany("INSERT INTO tombstones VALUES (1, ?, 1.0)", [(k,) for k in range(1, 1001)])
        con.commit()
    finally:
        con.close()
    store = Store(tmp_path)  # adds the new columns
    assert _put(store, _mask(), ann=5) == "inserted"


def test_ls_time() -> None:
    assert ls_time("2026-11-22T10:00:00Z") == ls_time("2026-11-22T10:00:00+00:00") == 1795341600.0
    assert ls_time("2026-11-22T10:00:00") == 1795341600.0  # naive: UTC
    assert ls_time("2026-11-22T10:00:00.500000Z") == 1795341600.5
    assert ls_time("") is None and ls_time("yesterday") is None and ls_time("9" * 100) is None


def _open_store(root: str, go: Any) -> None:
    go.wait(30)
    Store(root)


def test_processes_opening_a_new_model_dir_together_all_start(tmp_path: Path) -> None:
    """Workers started together on a new MODEL_DIR race for the switch to WAL, which SQLite refuses at once
    ("database is locked") instead of waiting: one of two compose workers used to die at start."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        root, go = str(tmp_path / f"m{round_}"), ctx.Event()
        procs = [ctx.Process(target=_open_store, args=(root, go)) for _ in range(6)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
