"""Propagation end to end: the time from a correction (an annotation saved in Label Studio, whose webhook
reaches the backend) to the last updated prediction of its group, against a real Label Studio 1.23.2.

    python bench/propagate_webhook.py                      # groups of 8, 16 and 64, ViT-S/8: about 10 min
    python bench/propagate_webhook.py --groups 16 --backbone tiny                    # a quick run

Per group size: a project with one group of synthetic images (``cosod.data.synthetic_group``, 384x512,
the object in every image), the backend connected (gunicorn, as ``make run`` serves it: one worker, the
in-process job queue, a feature cache), every prediction retrieved once (so the group's features are cached,
as they are once a project is pre-annotated), then two corrections, one after the other: the ground-truth
mask of task 1, then of task 2, saved through Label Studio's API as the editor saves them. The clock starts
right before the annotation request and stops at the poll of Label Studio's predictions (every 50 ms) that
sees the last of the group's other tasks updated. Also printed: the job's own seconds and phases
(``GET /jobs/<id>``: list, images, encode, prototype, refine, crf, resize, push) and the mean IoU of the
other tasks' predictions before and after each correction.

Needs the Label Studio venv (``make ls-venv``; or LS_BIN) and Redis-free: the backend's in-process queue.
Random weights as in bench/propagate.py (no pretrained file can be downloaded here): the timings are those of
the real network, the IoU figures those of random features.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from common import weights_for
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.grouping import GroupKey  # noqa: E402
from backend.jobs.propagation import propagation_job_id  # noqa: E402
from backend.labelstudio.regions import brush_region, rle_to_mask_fast  # noqa: E402
from cosod.data import synthetic_group  # noqa: E402
from tests.e2e import conftest as e2e  # noqa: E402

CONFIG = (REPO / "label_config" / "brush_grouped.xml").read_text()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


def mask_of(pred: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    if not pred["result"]:
        return np.zeros(shape, bool)
    region = pred["result"][0]
    return rle_to_mask_fast(region["value"]["rle"], region["original_height"], region["original_width"]) > 0


def make_project(ls: e2e.Server, n: int, size: tuple[int, int], seed: int) -> tuple[int, list[int], dict]:
    """A project with one group of ``n`` images; returns its id, the task ids in image order and the masks
    by task id."""
    images, masks = synthetic_group(n, size=size, seed=seed)
    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": f"bench {n}", "label_config": CONFIG})[
        "id"
    ]
    files = {}
    for k, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        files[f"f{k}"] = (f"img_{k:03d}.png", buf.getvalue(), "image/png")
    items = list(files.items())
    for start in range(0, len(items), 50):
        e2e.ls_api(ls, "POST", f"/api/projects/{project}/import", files=dict(items[start : start + 50]))
    tasks = e2e.ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=1000")["tasks"]
    by_k = {}
    for t in tasks:
        k = int(t["data"]["image"].rsplit("img_", 1)[1][:3])
        e2e.ls_api(ls, "PATCH", f"/api/tasks/{t['id']}", json={"data": {**t["data"], "group": "g"}})
        by_k[k] = t["id"]
    ids = [by_k[k] for k in range(n)]
    return project, ids, {ids[k]: masks[k] for k in range(n)}


def annotate(ls: e2e.Server, task: int, mask: np.ndarray) -> None:
    region = brush_region(mask, from_name="tag", to_name="image", label="Object", score=1.0, rid="c")
    region.pop("score")
    e2e.ls_api(ls, "POST", f"/api/tasks/{task}/annotations", json={"result": [region]})


def wait_updated(
    ls: e2e.Server, project: int, before: dict, tasks: list[int], t0: float
) -> tuple[dict, float]:
    while True:
        now = e2e.predictions_by_task(ls, project)
        seen = time.perf_counter()
        if all(now[t][0]["updated_at"] != before[t][0]["updated_at"] for t in tasks):
            return now, seen - t0
        if seen - t0 > 300:
            raise TimeoutError(f"not all of {len(tasks)} predictions updated after 300 s")
        time.sleep(0.05)


def job_of(backend: e2e.Server, project: int) -> dict[str, Any]:
    job_id = propagation_job_id(project, GroupKey("field:group", "g"))
    deadline = time.monotonic() + 120
    while True:
        job = requests.get(f"{backend.url}/jobs/{job_id}", timeout=10).json()
        if job.get("status") in ("finished", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def run_size(ls: e2e.Server, backend: e2e.Server, n: int, args: argparse.Namespace) -> dict[str, Any]:
    project, ids, truth = make_project(ls, n, tuple(args.size), seed=40 + n)
    shape = truth[ids[0]].shape
    e2e.connect_backend(ls, project, backend.url)
    t0 = time.perf_counter()
    e2e.retrieve_predictions(ls, project)
    unprompted_s = time.perf_counter() - t0
    preds = e2e.predictions_by_task(ls, project)
    row: dict[str, Any] = {"group": n, "unprompted_s": unprompted_s}
    row["iou_0"] = np.mean([iou(mask_of(preds[t][0], shape), truth[t]) for t in ids[2:]])
    for k in (1, 2):
        t = ids[k - 1]
        others = [i for i in ids if i not in ids[:k]]
        t0 = time.perf_counter()
        annotate(ls, t, truth[t])
        preds, seconds = wait_updated(ls, project, preds, others, t0)
        job = job_of(backend, project)
        result = job.get("result") or {}
        row[f"webhook_to_done_{k}"] = seconds
        row[f"job_{k}"] = {"seconds": result.get("seconds"), **(result.get("timings") or {})}
        row[f"iou_{k}"] = np.mean([iou(mask_of(preds[i][0], shape), truth[i]) for i in ids[2:]])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", nargs="+", type=int, default=[8, 16, 64])
    p.add_argument("--backbone", default="vit_small_patch8_224.dino")
    p.add_argument("--size", nargs=2, type=int, default=[384, 512], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights of a missing file")
    args = p.parse_args()
    binary = e2e.ls_bin()
    if binary is None:
        sys.exit("Label Studio is not installed: run `make ls-venv` (or set LS_BIN)")
    torch.manual_seed(args.seed)
    print(f"{os.cpu_count()} CPUs, backbone {args.backbone}, images {args.size[0]}x{args.size[1]}")
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        wdir, note = weights_for(args.backbone, base)
        print(f"weights: {note}")
        template = base / "ls-template"
        template.mkdir()
        proc, _ = e2e.start_ls(binary, template, base, base / "ls-migrate.log")  # migrate once
        e2e.stop(proc)
        tpl = e2e.LSTemplate(binary, template, "bench")
        env = {"COSOD_BACKBONE": args.backbone, "COSOD_CACHE_DIR": str(base / "features")}
        if wdir:
            env["COSOD_WEIGHTS_DIR"] = wdir
        rows = []
        with e2e.run_label_studio(tpl, base / "ls") as ls:
            with e2e.run_backend(ls.url, e2e.TOKEN, base / "backend", **env) as backend:
                for n in args.groups:
                    rows.append(run_size(ls, backend, n, args))
                    r = rows[-1]
                    print(
                        f"group {n}: unprompted {r['unprompted_s']:.1f} s; correction 1: "
                        f"{r['webhook_to_done_1']:.2f} s ({r['job_1']}); correction 2: "
                        f"{r['webhook_to_done_2']:.2f} s ({r['job_2']})",
                        flush=True,
                    )
        shutil.rmtree(base / "ls", ignore_errors=True)
    print("\nseconds from the annotation request to the last updated prediction; mean IoU % of images 2..")
    print(
        f"{'group':>5} {'1st corr s':>10} {'2nd corr s':>10} {'IoU before':>10} {'1 corr':>7} {'2 corr':>7}"
    )
    for r in rows:
        print(
            f"{r['group']:>5} {r['webhook_to_done_1']:>10.2f} {r['webhook_to_done_2']:>10.2f} "
            f"{100 * r['iou_0']:>10.1f} {100 * r['iou_1']:>7.1f} {100 * r['iou_2']:>7.1f}"
        )


if __name__ == "__main__":
    main()
