"""The dense CRF's process pool: same masks as one by one, real worker processes, failures handled."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import cosod.densecrf as densecrf
from cosod.densecrf import CRFFailed, CRFParams, CRFWorkerError, default_workers, dense_crf, run_crfs
from cosod.refine import crf_refine, crf_refine_group


def scenes(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images of several sizes and aspect ratios with a bright disc, and rough masks around the disc."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for k in range(n):
        h, w = [(120, 160), (224, 224), (300, 180), (97, 311)][k % 4]
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
        img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        img[disc] = rng.integers(180, 255, (int(disc.sum()), 3)).astype(np.uint8)
        rough = (np.abs(yy - h / 2) < h / 3) & (np.abs(xx - w / 2) < w / 3)
        images.append(img)
        masks.append(rough)
    return images, masks


@pytest.fixture
def fresh_pools(monkeypatch):
    """A pool state of this test's own, shut down afterwards."""
    pools = densecrf._Pools()
    monkeypatch.setattr(densecrf, "_POOLS", pools)
    yield pools
    for executor in pools.executors.values():
        executor.shutdown(wait=True, cancel_futures=True)


def test_the_pool_gives_the_masks_of_the_one_by_one_crf(fresh_pools):
    images, masks = scenes(6)
    alone = [crf_refine(img, m) for img, m in zip(images, masks, strict=True)]
    for aspect in ("squash", "keep"):
        one = crf_refine_group(images, masks, aspect=aspect, workers=1)
        two = crf_refine_group(images, masks, aspect=aspect, workers=2)
        for a, b in zip(one, two, strict=True):
            assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
    for a, b in zip(alone, crf_refine_group(images, masks, workers=2), strict=True):
        assert np.array_equal(a, b)
    assert any(a.any() for a in alone) and not all(a.all() for a in alone)  # real masks, not trivial ones
    assert fresh_pools.proven and fresh_pools.disabled is None
    # the CRFs ran in other processes: the pool's workers are children of this one
    executor = fresh_pools.executors[2]
    assert executor.submit(os.getpid).result(timeout=60) != os.getpid()


def test_a_crf_error_in_a_worker_comes_back_named_and_the_pool_stays(fresh_pools):
    images, masks = scenes(2)
    run_crfs(images, masks, CRFParams(), workers=2)
    bad = [masks[0], masks[1][:10]]  # the second mask does not fit its image
    with pytest.raises(CRFFailed, match="ValueError: image .* sizes differ"):
        run_crfs(images, bad, CRFParams(), workers=2)
    assert fresh_pools.disabled is None
    again = run_crfs(images, masks, CRFParams(), workers=2)
    assert np.array_equal(again[0], dense_crf(images[0], masks[0]))


def test_a_worker_killed_mid_group_fails_that_group_and_the_next_gets_a_new_pool(fresh_pools):
    images, masks = scenes(2)
    run_crfs(images, masks, CRFParams(), workers=2)  # proven
    executor = fresh_pools.executors[2]
    # large CRFs keep the workers busy long enough to be killed while they hold the group
    big = [np.tile(img, (8, 8, 1)) for img in images]
    big_masks = [np.tile(m, (8, 8)) for m in masks]
    slow = CRFParams(iterations=200)

    def kill_soon() -> None:
        time.sleep(1.0)
        for pid in list(executor._processes):  # noqa: SLF001 - the test needs the worker pids
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises(CRFWorkerError):
        run_crfs(big, big_masks, slow, workers=2)
    killer.join()
    assert 2 not in fresh_pools.executors
    out = run_crfs(images, masks, CRFParams(), workers=2)
    assert np.array_equal(out[1], dense_crf(images[1], masks[1]))
    assert fresh_pools.executors[2] is not executor


def test_a_pool_that_cannot_start_is_switched_off_and_the_crfs_run_here(fresh_pools, monkeypatch, caplog):
    class NoProcesses:
        def __init__(self, *args, **kwargs):
            raise OSError("fork/exec not allowed here")

    monkeypatch.setattr(densecrf, "ProcessPoolExecutor", NoProcesses)
    images, masks = scenes(3)
    with caplog.at_level(logging.WARNING, logger="cosod.densecrf"):
        out = run_crfs(images, masks, CRFParams(), workers=2)
    assert "cannot start" in caplog.text and "fork/exec not allowed" in fresh_pools.disabled
    for img, m, got in zip(images, masks, out, strict=True):
        assert np.array_equal(got, dense_crf(img, m))
    out = run_crfs(images, masks, CRFParams(), workers=2)  # stays off, no second try
    assert len(out) == 3


def test_the_pool_starts_under_a_script_and_its_workers_do_not_run_the_script(tmp_path):
    script = tmp_path / "crf_script.py"
    script.write_text(
        "import os, sys\n"
        "import numpy as np\n"
        f"sys.path.insert(0, {str(os.path.dirname(__file__))!r})\n"
        "from test_densecrf import scenes\n"
        "from cosod.densecrf import CRFParams, run_crfs, _POOLS\n"
        "print('top level ran in', os.getpid(), flush=True)\n"
        "if __name__ == '__main__':\n"
        "    images, masks = scenes(4)\n"
        "    out = run_crfs(images, masks, CRFParams(), workers=2)\n"
        "    assert _POOLS.proven and _POOLS.disabled is None\n"
        "    print('masks', sum(int(o.sum()) for o in out))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # spawn imports the script again in each worker, as __mp_main__: its guarded block runs once
    assert sum(line.startswith("masks ") for line in lines) == 1
    assert 1 <= sum(line.startswith("top level ran") for line in lines) <= 3


def test_a_pipeline_starts_its_crf_processes_when_it_is_built(fresh_pools):
    from cosod.pipeline import Pipeline, PipelineConfig

    Pipeline.build(PipelineConfig(backbone="tiny"), crf_workers=2)
    assert 2 in fresh_pools.executors  # started before the first group
    Pipeline.build(PipelineConfig(backbone="tiny", crf=False), crf_workers=3)
    assert 3 not in fresh_pools.executors  # no CRF, no processes


def test_default_workers_is_the_usable_cpus_capped():
    assert 1 <= default_workers() <= min(len(os.sched_getaffinity(0)), densecrf.MAX_AUTO_WORKERS)


def test_mismatched_lists_are_refused():
    images, masks = scenes(2)
    with pytest.raises(ValueError, match="2 images but 1 label maps"):
        run_crfs(images, masks[:1], CRFParams(), workers=2)
