"""Killed fine-tunes, against real processes: two ``cosod-worker`` processes (tiny backbone, heartbeat 1 s)
on a redis-server of this test's own, a stand-in Label Studio over HTTP, one SQLite file and checkpoint
folder. A worker is SIGKILLed while it trains, while it writes the checkpoint, and between the rename and
the registration; then Redis loses the job record as well. After each kill: no acknowledged correction is
lost, no orphaned file is left, the other worker (and the one a supervisor starts in the killed one's
place) go on without help, and the fine-tune completes as the next version number, without a gap or a
repeat. Also, without processes: the lock, the marker and the start-up sweep.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backend.grouping import GroupKey
from backend.jobs.finetuning import enqueue_finetune, finetune_job_id
from backend.jobs.rqueue import RQQueue
from backend.learning.corrections import encode_group_key
from backend.learning.finetune import claim_project, interrupted_finetunes
from backend.learning.store import Store
from backend.learning.versions import LOCK_NAME, Registry
from backend.prediction.projects import ProjectRegistry
from backend.settings import Settings
from cosod.data import synthetic_group

REPO = Path(__file__).resolve().parents[1]
PROJECT = 12
QUEUE = "cosod-ft-faults"
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Object"/></BrushLabels></View>'
)
FINAL = ("finished", "failed", "canceled", "stopped")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own (no persistence), so a flush touches no other test."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    import redis

    port = free_port()
    (tmp_path / "redis").mkdir()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path / "redis",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        wait_until(lambda: _pings(client), 20, f"redis-server on port {port}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class Corrections:
    """The project's images on the stand-in Label Studio and its corrections in the store, as the webhook
    stores them (a row is acknowledged once committed)."""

    def __init__(self, fake_ls: Any, model_dir: Path, groups: int = 2, per_group: int = 10):
        self.store = Store(model_dir)
        self.truth: dict[int, tuple[str, str, np.ndarray]] = {}
        tasks = []
        for g in range(groups):
            imgs, masks = synthetic_group(per_group, size=(72, 96), seed=40 + g)
            for k, (img, mask) in enumerate(zip(imgs, masks, strict=True)):
                tid = 100 * (g + 1) + k
                url = f"/data/upload/{PROJECT}/g{g}-{k}.png"
                fake_ls.add_bytes(url, png(img), headers={"Content-Type": "image/png"})
                tasks.append({"id": tid, "data": {"image": url, "group": f"g{g}"}, "project": PROJECT})
                self.truth[tid] = (f"g{g}", url, mask)
        serve_tasks(fake_ls, tasks)
        self.acknowledged: set[int] = set()

    def add(self, task_ids: list[int]) -> None:
        for tid in task_ids:
            group, url, mask = self.truth[tid]
            self.store.put_correction(
                project=PROJECT,
                annotation_id=10_000 + tid,
                task_id=tid,
                group_key=encode_group_key(GroupKey("field:group", group)),
                image_url=url,
                mask=mask,
            )
            self.acknowledged.add(10_000 + tid)

    def stored(self) -> set[int]:
        with self.store.connect() as con:
            rows = con.execute("SELECT annotation_id FROM corrections WHERE project = ?", (PROJECT,))
            return {int(r[0]) for r in rows}


def serve_tasks(fake_ls: Any, tasks: list[dict[str, Any]]) -> None:
    import json

    def handler(query: dict, headers: dict) -> tuple:
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        chunk = tasks[(page - 1) * size : page * size]
        body = {"tasks": chunk, "total": len(tasks), "total_annotations": 0, "total_predictions": 0}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    fake_ls.add_handler("/api/tasks/", handler)


class Workers:
    """``tests/finetune_worker.py`` processes (the real worker, with the test's stop points and the start-up
    recovery); a killed one is replaced as a supervisor would (``restart: unless-stopped``)."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        self.tmp_path, self.env = tmp_path, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        with open(self.tmp_path / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "finetune_worker.py"), "--name", name],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def kill(self, pid: int) -> str:
        (name,) = [n for n, p in self.procs.items() if p.pid == pid]
        os.kill(pid, signal.SIGKILL)
        self.procs[name].wait(10)
        return name

    def alive(self) -> list[str]:
        return sorted(n for n, p in self.procs.items() if p.poll() is None)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextmanager
def workers(tmp_path: Path, env: dict[str, str]) -> Iterator[Workers]:
    w = Workers(tmp_path, env)
    try:
        yield w
    finally:
        w.stop_all()


def checkpoint_files(model_dir: Path) -> list[str]:
    folder = model_dir / "versions" / f"p{PROJECT}"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.slow
def test_killed_finetunes_are_redone_without_orphans_gaps_or_lost_corrections(
    tmp_path: Path, fake_ls: Any, redis_url: str
) -> None:
    import redis

    model_dir = tmp_path / "model"
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    settings = Settings(
        model_dir=str(model_dir), redis_url=redis_url, queue_name=QUEUE, job_retries=2, backbone="tiny"
    )
    ProjectRegistry(settings).get(PROJECT, CONFIG, {})  # as /setup leaves it
    data = Corrections(fake_ls, model_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COSOD_", "LABEL_STUDIO_"))}
    env.update(
        {
            "REDIS_URL": redis_url,
            "COSOD_QUEUE": QUEUE,
            "COSOD_BACKBONE": "tiny",
            "COSOD_WORKER_HEARTBEAT": "1",
            "COSOD_CRF_WORKERS": "1",
            "COSOD_FINETUNE_STEPS": "12",
            "COSOD_CACHE_DIR": str(tmp_path / "features"),
            "MODEL_DIR": str(model_dir),
            "LABEL_STUDIO_URL": fake_ls.url,
            "LABEL_STUDIO_API_KEY": "tok",
            "TEST_FT_PAUSE_DIR": str(pause_dir),
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        }
    )
    q = RQQueue(redis_url, QUEUE)
    job_id = finetune_job_id(PROJECT)
    figures: list[str] = []
    # (stop point, restart the killed worker at once (its start-up sweep races the re-run to the orphans)
    # or only after the re-run (the re-run deletes them), Redis loses the job record)
    rounds = [("train", True, False), ("write", False, False), ("saved", False, False), ("saved", True, True)]
    with workers(tmp_path, env) as w:
        w.start("w1")
        w.start("w2")
        for n, (point, restart_now, lose_redis) in enumerate(rounds, start=1):
            # more corrections arrive, then the fine-tune is asked for; one worker stops at `point`
            data.add([100 + 2 * (n - 1), 101 + 2 * (n - 1), 200 + 2 * (n - 1), 201 + 2 * (n - 1)])
            (pause_dir / "at").write_text(point)
            assert enqueue_finetune(settings, PROJECT) == job_id
            paused = wait_until(lambda: _read(pause_dir / "paused"), 180, f"a worker stopped at {point}")
            (pause_dir / "paused").unlink()
            pid = int(paused.split()[0])
            files_at_kill = checkpoint_files(model_dir)
            victim = w.kill(pid)
            t_kill, wall_kill = time.monotonic(), time.time()
            if lose_redis:  # the queue forgets the job: only the start-up recovery knows of it
                redis.Redis.from_url(redis_url).flushdb()
            data.add([108, 208] if n == 1 else [])  # corrections acknowledged while the worker is dead
            if restart_now:
                w.start(f"{victim}-again")  # the supervisor restarts the killed worker at once
            info = wait_until(
                lambda: (j := q.fetch(job_id)) is not None and j.status in FINAL and j, 240, "the re-run"
            )
            seconds = time.monotonic() - t_kill
            assert info.status == "finished", (point, info, (tmp_path / f"{victim}.log").read_text()[-3000:])
            result = info.result
            started = dt.datetime.fromisoformat(str(info.started_at)).timestamp() - wall_kill
            figures.append(
                f"kill at {point}{' + Redis flushed' if lose_redis else ''}: re-run started {started:.1f} s "
                f"after the kill, done {seconds:.1f} s after"
            )
            if not restart_now:
                assert len(w.alive()) == 1, w.alive()  # the other worker did it alone
                w.start(f"{victim}-again")

            # the version numbering: v1..vn, registered once each, the redo took the number the kill left
            version = f"scosparc-p{PROJECT}-v{n}"
            assert result["version"] == version, result
            reg = Registry(Store(model_dir))
            names = [v.version for v in reg.list_versions(PROJECT)]
            assert names[1:] == [f"scosparc-p{PROJECT}-v{k}" for k in range(1, n + 1)], names
            assert reg.active_name(PROJECT) in names
            # the redo saw the killed run's marker; what the kill left was deleted, by the redo or by the
            # restarted worker's start-up sweep (whichever held the project's lock first)
            recovered = result["recovered"]
            assert recovered["interrupted"]["owner"] == job_id and recovered["starts"] >= 2, recovered
            left = {"train": [], "write": [f for f in files_at_kill if f.endswith(".tmp")]}
            expected = left.get(point, [f"{version}.pt"])
            if point == "write":
                assert len(expected) == 1 and expected[0].startswith(f".{version}.pt."), files_at_kill
            logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
            for name in expected:
                assert logs.count(f"deleted the orphaned {name} ") == 1, name
            if restart_now:
                assert set(recovered["removed"]) <= set(expected), recovered
            else:
                assert recovered["removed"] == expected, recovered
            # no orphaned file, the marker is cleared
            assert checkpoint_files(model_dir) == sorted(
                [LOCK_NAME] + [f"scosparc-p{PROJECT}-v{k}.pt" for k in range(1, n + 1)]
            )
            assert (model_dir / "versions" / f"p{PROJECT}" / LOCK_NAME).read_bytes() == b""
            # no acknowledged correction lost; the redo trained on all of them
            assert data.stored() == data.acknowledged
            assert result["corrections"] == len(data.acknowledged) and data.store.pending(PROJECT) == 0
            # the workers go on by themselves: the other one, and the restarted one
            wait_until(lambda: len(w.alive()) == 2, 10, "two live workers")
    print("\n".join(figures))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# -- without processes --------------------------------------------------------------------------------


def test_the_start_up_sweep_cleans_idle_projects_only_and_stops_a_kill_loop(tmp_path: Path) -> None:
    reg = Registry(Store(tmp_path))
    p7, p8 = reg.root / "p7", reg.root / "p8"
    p7.mkdir(parents=True)
    p8.mkdir(parents=True)
    for folder, n in ((p7, 7), (p8, 8)):
        (folder / f"scosparc-p{n}-v1.pt").write_bytes(b"unregistered")
        (folder / f".scosparc-p{n}-v2.pt.abc123_x.tmp").write_bytes(b"")
        (folder / "notes.txt").write_text("not ours")  # not a checkpoint name: left alone
    with reg.locked(8, wait=0) as held:  # a fine-tune is at work on project 8
        assert held is not None
        held.set_marker({"owner": "finetune-p8", "starts": 1})
        found = interrupted_finetunes(reg, max_starts=3)
    assert [(f.project, f.marker, f.requeue) for f in found] == [(7, None, False)]
    assert sorted(found[0].removed) == [".scosparc-p7-v2.pt.abc123_x.tmp", "scosparc-p7-v1.pt"]
    assert sorted(p.name for p in p7.iterdir()) == [LOCK_NAME, "notes.txt"]
    assert len(list(p8.iterdir())) == 4  # busy: nothing touched

    # project 8's fine-tune was killed (its marker stays): re-queued while it has runs left ...
    (found,) = interrupted_finetunes(reg, max_starts=3)
    assert (found.project, found.marker, found.requeue) == (8, {"owner": "finetune-p8", "starts": 1}, True)
    assert sorted(p.name for p in p8.iterdir()) == [LOCK_NAME, "notes.txt"]
    # ... and given up (marker cleared) once it was killed max_starts times in a row
    with reg.locked(8) as held:
        assert held is not None
        held.set_marker({"owner": "finetune-p8", "starts": 3})
    (found,) = interrupted_finetunes(reg, max_starts=3)
    assert found.requeue is False
    assert interrupted_finetunes(reg, max_starts=3) == []


def test_a_claim_counts_killed_runs_and_waits_for_a_live_one(tmp_path: Path) -> None:
    import threading

    reg = Registry(Store(tmp_path))
    with reg.locked(5) as held:  # as a killed run leaves it
        assert held is not None
        held.set_marker({"owner": "finetune-p5", "starts": 2})
    order: list[str] = []
    with claim_project(reg, 5, "first") as claim:
        assert claim.previous == {"owner": "finetune-p5", "starts": 2} and claim.starts == 3
        assert claim.summary()["recovered"]["starts"] == 3

        def second() -> None:
            with claim_project(reg, 5, "second") as c:
                order.append(f"second starts={c.starts} previous={c.previous}")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        order.append("first done")
    t.join(10)
    assert order == ["first done", "second starts=1 previous=None"]
    with pytest.raises(RuntimeError):
        with claim_project(reg, 5, "third"):
            raise RuntimeError("an exception clears the marker")
    with reg.locked(5) as held:
        assert held is not None and held.marker() is None


def test_a_writer_killed_mid_write_leaves_a_temp_file_that_is_named_for_its_destination(
    tmp_path: Path,
) -> None:
    """``atomic_write`` removes its temp file on an exception, but a SIGKILL leaves it (what the clean-up
    is for); the destination is never touched."""
    from cosod.atomic import atomic_write, temp_file_target

    dest = tmp_path / "scosparc-p3-v1.pt"
    code = (
        "import os, signal, sys\n"
        "from cosod.atomic import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(dest)!r}, write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (left,) = tmp_path.iterdir()
    assert temp_file_target(left.name) == dest.name and left.read_bytes() == b"half"
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "other.pt", lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
    assert [p.name for p in tmp_path.iterdir()] == [left.name]  # an exception leaves nothing
    for name in ("scosparc-p3-v1.pt", ".hidden", ".x.tmp", "a.pt.abc.tmp", "..tmp"):
        assert temp_file_target(name) is None, name


def test_recover_finetunes_never_fails_a_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis down: the killed fine-tune is logged, not queued, and the start goes on; one killed as often
    as COSOD_JOB_RETRIES allows is given up."""
    from types import SimpleNamespace

    from backend.jobs.finetuning import recover_finetunes

    reg = Registry(Store(tmp_path))
    for project, starts in ((1, 1), (2, 3)):
        with reg.locked(project) as held:
            assert held is not None
            held.set_marker({"owner": f"finetune-p{project}", "starts": starts})
    settings = Settings(
        model_dir=str(tmp_path), redis_url=f"redis://127.0.0.1:{free_port()}/0", job_retries=2
    )
    ctx = SimpleNamespace(settings=settings, model=SimpleNamespace(registry=reg))
    out = recover_finetunes(ctx)  # type: ignore[arg-type]
    assert [(o["project"], o["job"]) for o in out] == [(1, None), (2, None)]
    assert "the killed fine-tune is not queued again" in caplog.text
    assert "killed 3 times in a row" in caplog.text
    assert [(o["project"], o["job"]) for o in recover_finetunes(ctx)] == [(1, None)]  # 2: given up
