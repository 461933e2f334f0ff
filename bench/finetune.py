"""Fine-tune time for a project's corrections on the CPU, and the held-out scores before and after.

    python bench/finetune.py                 # 5 groups x 25 images, 20 corrected per group (100), 300 steps
    python bench/finetune.py --steps 150 --groups 3

Runs the real fine-tune job body (``backend.learning.finetune.run_finetune``) on synthetic groups whose masks
are the truth, with the tiny backbone (random features: the scores show the logic works, not what DINO would
give), a real SQLite store in a temporary folder, and images served from memory instead of Label Studio.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from backend.grouping import GroupKey, TaskRef
from backend.learning.corrections import encode_group_key
from backend.learning.finetune import run_finetune
from backend.learning.store import Store
from backend.learning.versions import Registry
from cosod.data import synthetic_group
from cosod.finetune import FinetuneConfig
from cosod.pipeline import Pipeline, PipelineConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=5)
    p.add_argument("--images", type=int, default=25, help="images per group")
    p.add_argument("--corrected", type=int, default=20, help="corrected images per group")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp())
    store = Store(root)
    registry = Registry(store)
    images, tasks = {}, []
    for g in range(args.groups):
        imgs, masks = synthetic_group(args.images, size=(96, 128), seed=40 + g)
        for k, (img, mask) in enumerate(zip(imgs, masks, strict=True)):
            tid, url = 100 * g + k, f"/data/upload/1/g{g}-{k}.png"
            images[url] = img
            tasks.append(TaskRef(tid, {"image": url, "group": f"g{g}"}))
            if k < args.corrected:
                key = encode_group_key(GroupKey("field:group", f"g{g}"))
                store.put_correction(
                    project=1, annotation_id=tid, task_id=tid, image_url=url, mask=mask, group_key=key
                )
    pipe = Pipeline.build(PipelineConfig(backbone="tiny"), cache_dir=str(root / "features"))
    print(
        f"{store.count_corrections(1)} corrections, {len(tasks)} images, {args.steps} steps, "
        f"{torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    out = run_finetune(
        1,
        store=store,
        registry=registry,
        base_pipeline=pipe,
        base_version="scosparc-p1-base",
        read_image=lambda url, task: images[url],
        list_group_tasks=lambda project: tasks,
        config=FinetuneConfig(steps=args.steps),
    )
    total = time.perf_counter() - t0
    keys = ("status", "version", "heldout", "train_images", "images", "train_seconds", "seconds")
    print(json.dumps({k: out[k] for k in keys}))
    for k in ("iou", "max_f", "mae", "hce"):
        print(f"{k}: active {out['active_scores'][k]:.4f} -> candidate {out['scores'][k]:.4f}")
    print(f"whole job {total:.1f} s")


if __name__ == "__main__":
    main()
