"""Throughput of batch pre-annotation: a real Label Studio, the backend, Redis and 1 or 2 ``cosod-worker``s.

    python bench/prelabel.py                                  # tiny backbone, 200 images in groups of 20
    python bench/prelabel.py --backbones tiny vit_small_patch8_224.dino --workers 1 2

For each backbone and worker count it creates a fresh project (``--images`` PNGs of ``--size``, groups of
``--group-size``), posts ``/jobs/prelabel`` and waits for every group job. It prints images per second (from
the request to the last job's end) and the share of time spent outside the pipeline's ``predict_group``:

- *in jobs*: 1 - pipeline seconds / job seconds (Label Studio I/O, image decoding, RLE, pushes);
- *overall*: 1 - pipeline seconds / (wall seconds x workers) (adds the queue and idle workers);

and that share of job time split by the jobs' phases: ``list`` (the group's tasks and their prediction
versions), ``check`` (tasks asked one by one when the list could not tell), ``images`` (download and
decode), ``encode`` (masks to RLE), ``push`` (re-check and import), ``other`` (project state, version).

Target: at most 10 % outside the pipeline. Needs the Label Studio venv (``make ls-venv``) and Redis
(``--redis-url``, default database 14 on 127.0.0.1:6379, flushed before and after). Processes are started with
the helpers of ``tests/e2e/conftest.py``. A backbone without its weights file runs on random weights of the
real architecture (timings only) and the table says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]


def _e2e() -> Any:
    spec = importlib.util.spec_from_file_location("cosod_e2e_helpers", REPO / "tests" / "e2e" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _weights(name: str, scratch: Path) -> tuple[str | None, str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import weights_for

    return weights_for(name, scratch)


def _wait_jobs(url: str, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [requests.get(f"{url}/jobs/{i}", timeout=30).json() for i in ids]
        if all(j["status"] in ("finished", "failed", "canceled") for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs still running after {timeout:.0f} s")
        time.sleep(0.1)


def run_one(
    h: Any,
    ls: Any,
    base: Path,
    backbone: str,
    workers: int,
    source: str,
    args: argparse.Namespace,
    env: dict[str, str],
) -> dict[str, Any]:
    n_groups = args.images // args.group_size
    groups = {f"g{g:03d}": args.group_size for g in range(n_groups)}
    project, _ = h.create_grouped_project(
        ls, groups, title=f"bench {backbone} x{workers}", size=tuple(args.size)
    )
    queue = f"bench-{backbone.replace('.', '-')}-{workers}-{source}"
    # a feature cache of the run's own: the images are the same in every run, and a shared cache would
    # spare the later runs the backbone
    full = {**env, "COSOD_QUEUE": queue, "COSOD_CACHE_DIR": str(base / f"features-{queue}")}
    wenv = {
        **full,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": h.TOKEN,
        "COSOD_WORKER_HEARTBEAT": "10",
    }
    if source == "shared":  # the workers read uploads from Label Studio's media folder, as in compose
        wenv["COSOD_LS_MEDIA_ROOT"] = str(base / "ls-data" / "media")
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    wenv["OMP_NUM_THREADS"] = wenv["MKL_NUM_THREADS"] = str(threads)
    with ExitStack() as stack:
        api = stack.enter_context(h.run_backend(ls.url, h.TOKEN, base / f"api-{queue}", **full))
        for w in range(workers):
            stack.enter_context(h.run_worker(base / f"w-{queue}", wenv, name=f"w{w}"))
        deadline = time.monotonic() + 600
        while requests.get(f"{api.url}/health", timeout=30).json().get("workers") != workers:
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not register")
            time.sleep(0.3)
        t0 = time.monotonic()
        r = requests.post(f"{api.url}/jobs/prelabel", json={"project": project}, timeout=300)
        r.raise_for_status()
        jobs = _wait_jobs(api.url, r.json()["jobs"], timeout=3600)
        wall = time.monotonic() - t0
    bad = [j for j in jobs if j["status"] != "finished"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not finish: {bad[0]['error']}")
    images = sum(j["result"]["pushed"] for j in jobs)
    job_s = sum(j["result"]["seconds"] for j in jobs)
    pipe_s = sum(j["result"]["pipeline_seconds"] for j in jobs)
    ahead = sum(j["result"].get("images_read_ahead", 0) for j in jobs)
    phases: dict[str, float] = {}
    for j in jobs:
        for phase, seconds in j["result"]["timings"].items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    return {
        "phases": {k: v / job_s for k, v in phases.items()},
        "ahead": ahead,
        "backbone": backbone,
        "workers": workers,
        "source": source,
        "images": images,
        "groups": len(jobs),
        "wall_s": wall,
        "img_per_s": images / wall,
        "outside_in_jobs": 1 - pipe_s / job_s,
        "outside_overall": 1 - pipe_s / (wall * workers),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["tiny"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--group-size", type=int, default=20)
    p.add_argument("--size", nargs=2, type=int, default=[320, 240], metavar=("W", "H"))
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    p.add_argument(
        "--images-from",
        nargs="+",
        choices=["http", "shared"],
        default=["http", "shared"],
        help="how workers read uploads: over HTTP from Label Studio, or from its media folder shared "
        "with them (COSOD_LS_MEDIA_ROOT, the docker-compose setup)",
    )
    p.add_argument(
        "--threads", type=int, help="torch threads per worker (OMP_NUM_THREADS); default: CPU cores / workers"
    )
    args = p.parse_args()
    if args.images < args.group_size or args.group_size < 1:
        p.error(f"--images must be >= --group-size >= 1, got {args.images} and {args.group_size}")

    import redis

    h = _e2e()
    binary = h.ls_bin()
    if binary is None:
        print("bench/prelabel.py: Label Studio is not installed; run `make ls-venv`", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(args.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"bench/prelabel.py: Redis at {args.redis_url} is unreachable: {exc}", file=sys.stderr)
        return 2
    client.flushdb()
    base = Path(tempfile.mkdtemp(prefix="cosod-bench-prelabel-"))
    rows, notes = [], {}
    try:
        data = base / "ls-data"
        template = next(iter(sorted((REPO / ".pytest_cache" / "d").glob("ls-data-*/.migrated"))), None)
        if template is not None:
            shutil.copytree(template.parent, data)
        else:
            data.mkdir()  # first start migrates (~25 s)
        (base / "files").mkdir()
        proc, url = h.start_ls(binary, data, base / "files", base / "ls.log")
        ls = h.Server(url, base / "ls.log", proc)
        try:
            for backbone in args.backbones:
                weights_dir, notes[backbone] = _weights(backbone, base)
                env = {
                    "REDIS_URL": args.redis_url,
                    "COSOD_BACKBONE": backbone,
                    "MODEL_DIR": str(base / "model"),
                }
                if weights_dir:
                    env["COSOD_WEIGHTS_DIR"] = weights_dir
                for workers in args.workers:
                    for source in args.images_from:
                        print(
                            f"running {backbone} with {workers} worker(s), images over {source}...",
                            file=sys.stderr,
                            flush=True,
                        )
                        rows.append(run_one(h, ls, base, backbone, workers, source, args, env))
        finally:
            h.stop(proc)
    finally:
        client.flushdb()
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"\n{args.images} images of {args.size[0]}x{args.size[1]} in groups of {args.group_size}, "
        f"CPU ({os.cpu_count()} cores, shared with Label Studio), torch threads per worker: "
        f"{args.threads or 'cores / workers'}"
    )
    header = f"{'backbone':<28}{'workers':>8}{'images':>8}{'uploads':>8}{'wall s':>9}{'img/s':>8}"
    print(header + f"{'outside (jobs)':>16}{'outside (all)':>15}")
    for r in rows:
        print(
            f"{r['backbone']:<28}{r['workers']:>8}{r['images']:>8}{r['source']:>8}{r['wall_s']:>9.1f}"
            f"{r['img_per_s']:>8.2f}{r['outside_in_jobs']:>15.1%}{r['outside_overall']:>15.1%}"
        )
    order = ["list", "check", "images", "encode", "push", "other"]
    print("\nshare of job time outside the pipeline, by phase (images: download and decode; encode: RLE)")
    print(
        f"{'backbone':<28}{'workers':>8}{'uploads':>8}" + "".join(f"{p:>9}" for p in order) + "   read ahead"
    )
    for r in rows:
        shares = "".join(f"{r['phases'].get(p, 0.0):>9.1%}" for p in order)
        print(f"{r['backbone']:<28}{r['workers']:>8}{r['source']:>8}" + shares + f"{r['ahead']:>13}")
    for backbone, note in notes.items():
        print(f"{backbone}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
