"""Propagation of corrections within a group (cosod.propagate): mask quality, absence decision, speed.

    python bench/propagate.py                                   # tiny and ViT-S/8, 6-9 min on 2 busy CPUs
    python bench/propagate.py --backbones tiny --quality-groups 3 --timing-groups 8 16   # a quick run
    python bench/propagate.py --backbones tiny --first-group 5 --quality-groups 15 --maps neighbours \
        --timing-groups                                         # 15 more groups, none used to set k and tau

Quality, per backbone: ``--quality-groups`` synthetic groups (``cosod.data.synthetic_group``) of ``--images``
images, each with ``--absent`` images drawn without the common object (never image 0) and a recurring
distractor in about half of the images. The evaluated images are those from index 3 on, the same for every
row: mean IoU over the evaluated images that hold the object, before (the unprompted pipeline) and after
propagating 1, 2 and 3 corrections, the corrections being the ground-truth masks of images 0, 1, 2 (an absent
one among them is an empty correction). Once per propagation map (``--maps``): "neighbours" (the default:
each token takes the foreground fraction of its nearest corrected tokens) and "prototype" (the first design:
one mean vector per side); see cosod/propagate.py. The absence decision (cosod.absence, as
``PipelineConfig.absence`` would apply it) on the same evaluated images: precision and recall of "absent"
over all groups.

Speed: the propagation step for groups of ``--timing-groups`` images with the features already in memory (as
from the feature cache): corrections -> prototypes -> maps -> threshold, refinement -> CRF -> masks at the
image size. Best of ``--repeats``, after a warm-up on a group of 4. The backend's webhook, queue and Label
Studio calls are not part of it: bench/propagate_webhook.py times those, against a real Label Studio.

No pretrained weights here: the tiny backbone is random by design and ViT-S/8 ("vit_small_patch8_224.dino")
is built with RANDOM weights of the real architecture when its file is absent (see bench/common.py). The
timings are those of the real networks; the IoU figures are those of random-weight features (colour and
texture statistics), not of DINO; ``--seed`` fixes those random weights, so a run repeats its figures.
The stage-1 head is the training-free identity variant (no checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import weights_for

from cosod.absence import decide_from_regions
from cosod.data import synthetic_group
from cosod.features import image_hash
from cosod.pipeline import Pipeline, PipelineConfig
from cosod.propagate import propagate

K_MAX = 3


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


def make_group(
    g: int, n: int, n_absent: int, size: tuple[int, int]
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    rng = np.random.default_rng(1000 + g)
    absent = sorted(int(i) for i in rng.choice(np.arange(1, n), size=min(n_absent, n - 1), replace=False))
    recurring = sorted(int(i) for i in rng.choice(n, size=max(1, n // 2), replace=False))
    images, masks = synthetic_group(n, size=size, seed=100 + g, absent=absent, recurring=recurring)
    return images, masks, absent


def quality(pipe: Pipeline, args: argparse.Namespace, kind: str) -> dict[str, object]:
    """IoU before / after k corrections per group, and the absence decision's counts, with the propagation
    maps ``kind`` (cosod.propagate: "neighbours", the default, or "prototype", the first design)."""
    rows = []
    counts = {k: {"tp": 0, "fp": 0, "fn": 0} for k in range(K_MAX + 1)}
    for g in range(args.first_group, args.first_group + args.quality_groups):
        images, gt, absent = make_group(g, args.images, args.absent, tuple(args.image_size))
        feats = pipe.encode(images)
        evaluated = list(range(K_MAX, len(images)))
        present = [i for i in evaluated if i not in absent]
        maps = pipe.head_maps([feats], [image_hash(im) for im in images])
        before = pipe.masks_from_maps(images, maps)
        preds = {0: ({i: before.masks[i] for i in evaluated}, [before.regions[i] for i in evaluated])}
        for k in range(1, K_MAX + 1):
            out = propagate(pipe, feats, images, {i: gt[i] for i in range(k)}, targets=evaluated, maps=kind)
            assert out.prediction is not None  # image 0 always holds the object
            preds[k] = (out.masks, out.prediction.regions)
        row: dict[str, object] = {"group": g, "absent": absent}
        for k, (masks, regions) in preds.items():
            row[f"iou_{k}"] = float(np.mean([iou(masks[i], gt[i]) for i in present]))
            decision = decide_from_regions(regions, z_threshold=pipe.config.absence_z)
            flagged = {evaluated[j] for j in decision.absent}
            truth = {i for i in evaluated if i in absent}
            counts[k]["tp"] += len(flagged & truth)
            counts[k]["fp"] += len(flagged - truth)
            counts[k]["fn"] += len(truth - flagged)
        rows.append(row)
    return {"groups": rows, "absence": counts}


def time_propagation(pipe: Pipeline, n: int, args: argparse.Namespace) -> dict[str, float]:
    images, gt, _ = make_group(500 + n, n, max(1, n // 8), tuple(args.timing_size))
    feats = pipe.encode(images)  # in memory, as from the feature cache
    corrections = {0: gt[0]}
    best: dict[str, float] | None = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = propagate(pipe, feats, images, corrections)
        wall = time.perf_counter() - t0
        if best is None or wall < best["total"]:
            best = {**out.timings, "total": wall}
    assert best is not None
    return best


def pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def report_backbone(pipe: Pipeline, name: str, note: str, args: argparse.Namespace) -> dict[str, object]:
    print(f"\n== {name}: {note}; CRF on {pipe.crf_workers} process(es)")
    out: dict[str, object] = {"backbone": name, "weights": note}
    for maps in args.maps if args.quality_groups else []:
        t0 = time.perf_counter()
        q = quality(pipe, args, maps)
        out[f"quality_{maps}"] = q
        print(
            f"maps={maps}: mean IoU (%) of images {K_MAX}..{args.images - 1} holding the object, "
            f"{args.images}-image groups, {args.absent} absent each ({time.perf_counter() - t0:.0f} s)"
        )
        print(f"{'group':>5} {'absent':>8} {'before':>7} " + " ".join(f"{f'{k} corr':>7}" for k in (1, 2, 3)))
        rows = q["groups"]
        assert isinstance(rows, list)
        for r in rows:
            print(
                f"{r['group']:>5} {','.join(map(str, r['absent'])):>8} "
                + " ".join(f"{pct(r[f'iou_{k}']):>7}" for k in range(K_MAX + 1))
            )
        means = [float(np.mean([r[f"iou_{k}"] for r in rows])) for k in range(K_MAX + 1)]
        print(f"{'mean':>5} {'':>8} " + " ".join(f"{pct(m):>7}" for m in means))
        rising = sum(all(r[f"iou_{k}"] > r[f"iou_{k - 1}"] for k in range(1, K_MAX + 1)) for r in rows)
        print(f"groups whose IoU rises with each correction (before < 1 < 2 < 3): {rising} of {len(rows)}")
        print(f"absence decision on the same images (z < -{pipe.config.absence_z}):")
        print(f"{'':>14} {'precision':>9} {'recall':>7} {'tp':>4} {'fp':>4} {'fn':>4}")
        counts = q["absence"]
        assert isinstance(counts, dict)
        for k, c in counts.items():
            prec = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan")
            rec = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
            label = "unprompted" if k == 0 else f"{k} correction{'s' if k > 1 else ''}"
            print(f"{label:>14} {prec:>9.2f} {rec:>7.2f} {c['tp']:>4} {c['fp']:>4} {c['fn']:>4}")
    if args.timing_groups:
        print(
            f"propagation step, 1 correction, features in memory, images {args.timing_size[0]}x"
            f"{args.timing_size[1]} (best of {args.repeats}):"
        )
        print(
            f"{'group':>5} {'prototype ms':>12} {'refine ms':>10} {'crf ms':>8} {'resize ms':>10} "
            f"{'total s':>8}"
        )
        time_propagation(pipe, 4, argparse.Namespace(**{**vars(args), "repeats": 1}))  # warm-up: CRF pool
        timings = []
        for n in args.timing_groups:
            t = time_propagation(pipe, n, args)
            timings.append({"group": n, **t})
            print(
                f"{n:>5} {1000 * t.get('prototype', 0):>12.1f} {1000 * t.get('refine', 0):>10.1f} "
                f"{1000 * t.get('crf', 0):>8.1f} {1000 * t.get('resize', 0):>10.1f} {t['total']:>8.2f}"
            )
        out["timings"] = timings
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["tiny", "vit_small_patch8_224.dino"])
    p.add_argument("--quality-groups", type=int, default=5, help="synthetic groups for IoU (0: skip)")
    p.add_argument("--first-group", type=int, default=0, help="seed offset of the quality groups")
    p.add_argument(
        "--maps", nargs="+", default=["neighbours", "prototype"], choices=["neighbours", "prototype"]
    )
    p.add_argument("--images", type=int, default=12, help="images per quality group")
    p.add_argument("--absent", type=int, default=2, help="images without the object per quality group")
    p.add_argument("--image-size", nargs=2, type=int, default=[96, 128], metavar=("H", "W"))
    p.add_argument("--timing-groups", nargs="*", type=int, default=[8, 16, 64], help="none: skip timing")
    p.add_argument("--timing-size", nargs=2, type=int, default=[384, 512], metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--crf-workers", type=int, default=None, help="default: the CPUs, at most 8")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights of a missing file")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    if args.images < K_MAX + 2:
        p.error(f"--images must be at least {K_MAX + 2}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, input 224")
    torch.manual_seed(args.seed)  # the random weights written for a missing file: the same every run
    report = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.backbones:
            wdir, note = weights_for(name, Path(scratch))
            pipe = Pipeline.build(
                PipelineConfig(backbone=name), weights_dir=wdir, crf_workers=args.crf_workers
            )
            report.append(report_backbone(pipe, name, note, args))
    print(f"\nwhole run: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
