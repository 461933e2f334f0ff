"""Per-image time of each pipeline stage, and peak memory for a large group.

    python bench/pipeline.py                       # ViT-S/8 and ViT-B/8 at 224, groups of 8 and 32, CPU
    python bench/pipeline.py --backbones tiny --groups 8 --memory-group 0

Prints, per backbone and group size, milliseconds per image for: backbone, stage 1, threshold + region
refinement, CRF, final resize, and the share of the total spent outside the backbone (target with ViT-S/8 and
a group of 32: at most 25 %). Then the peak resident memory of a separate process that predicts one group of
``--memory-group`` images with ``--memory-backbone`` (target for 64 images with ViT-B/8: under 4 GB).

With ``--models scosparc ums`` the UMS-CoSOD path runs at the same sizes: ViT-S/8 pairs with DINOv2 ViT-S/14
and ViT-B/8 with DINOv2 ViT-B/14 (both with registers); its "stage1" column is the UMS network.

When a backbone's weights file is absent (no internet here), a file with the same architecture and random
values is written to a temporary folder: the timings are those of the real network, the masks are not. The
UMS network is likewise untrained (random weights of the real architecture) unless --ums-checkpoint is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import weights_for

from cosod.data import synthetic_group
from cosod.pipeline import Pipeline, PipelineConfig

STAGES = ("backbone", "stage1", "refine", "crf", "resize")
V2_FOR = {
    "vit_small_patch8_224.dino": "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch8_224.dino": "vit_base_patch14_reg4_dinov2.lvd142m",
    "tiny": "tiny_dinov2",
}


def build(
    model: str, name: str, scratch: Path, ums_checkpoint: str | None, crf_workers: int | None = None
) -> tuple[Pipeline, str]:
    wdir, note = weights_for(name, scratch)
    if model == "scosparc":
        cfg = PipelineConfig(backbone=name, input_size=224)
        return Pipeline.build(cfg, weights_dir=wdir, crf_workers=crf_workers), note
    from cosod.backbones import build_backbone
    from cosod.ums.checkpoint import UMSCheckpoint, save_ums
    from cosod.ums.net import UMSNet

    v2name = V2_FOR[name]
    v2dir, v2note = weights_for(v2name, scratch)
    if ums_checkpoint is None:
        dims = [build_backbone(n, weights_dir=d).embed_dim for n, d in ((name, wdir), (v2name, v2dir))]
        ums_checkpoint = str(scratch / f"ums-{name}.pt")
        save_ums(UMSCheckpoint(UMSNet.build(dim=dims[0], v2_dim=dims[1]), name, v2name, 0.5), ums_checkpoint)
        note += "; UMS network untrained (timing only)"
    cfg = PipelineConfig(model="ums", ums_checkpoint=ums_checkpoint, input_size=224)
    pipe = Pipeline.build(cfg, weights_dir=wdir if wdir == v2dir else scratch, crf_workers=crf_workers)
    return pipe, f"{note}; {v2name}: {v2note}"


def run_group(pipe: Pipeline, n: int, size: tuple[int, int], seed: int) -> dict[str, float]:
    images, _ = synthetic_group(n, size=size, seed=seed)
    pred = pipe.predict_group(images)
    return {k: v for k, v in pred.timings.items()}


def timing_table(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            for name in args.backbones:
                pipe, note = build(model, name, Path(scratch), args.ums_checkpoint, args.crf_workers)
                print(f"\n{model} / {name}: {note}; CRF on {pipe.crf_workers} process(es)")
                run_group(pipe, 2, tuple(args.image_size), seed=99)  # warm-up
                header = f"{'group':>5} " + " ".join(f"{s + ' ms':>12}" for s in STAGES)
                print(header + f" {'total ms':>10} {'group s':>8} {'non-backbone':>13}")
                for n in args.groups:
                    best: dict[str, float] | None = None
                    for r in range(args.repeats):
                        t = run_group(pipe, n, tuple(args.image_size), seed=r)
                        if best is None or t["total"] < best["total"]:
                            best = t
                    assert best is not None
                    per = {k: 1000.0 * v / n for k, v in best.items()}
                    share = 1.0 - best["backbone"] / best["total"]
                    print(
                        f"{n:>5} "
                        + " ".join(f"{per.get(s, 0.0):>12.1f}" for s in STAGES)
                        + f" {per['total']:>10.1f} {best['total']:>8.1f} {100 * share:>12.1f}%"
                    )
                    rows.append(
                        {
                            "model": model,
                            "backbone": name,
                            "group": n,
                            "per_image_ms": per,
                            "group_seconds": best["total"],
                            "non_backbone_share": share,
                            "weights": note,
                        }
                    )
    return rows


def memory_child(name: str, n: int, size: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        wdir, note = weights_for(name, Path(scratch))
        pipe = Pipeline.build(PipelineConfig(backbone=name), weights_dir=wdir)
        images, _ = synthetic_group(n, size=size, seed=0)
        t0 = time.perf_counter()
        pipe.predict_group(images)
        seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mb": peak_rss_mb(), "seconds": seconds, "weights": note}))


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM of its address space). Not ru_maxrss: Linux carries
    that across fork and exec, so a child would report its parent's peak when the parent was larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def memory_peak(args: argparse.Namespace) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        args.memory_backbone,
        str(args.memory_group),
        "--image-size",
        *map(str, args.image_size),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"\npeak memory, one group of {args.memory_group} with {args.memory_backbone}: "
        f"{result['peak_mb']:.0f} MB RSS ({result['seconds']:.1f} s; {result['weights']})"
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backbones", nargs="+", default=["vit_small_patch8_224.dino", "vit_base_patch8_224.dino"]
    )
    p.add_argument("--groups", nargs="+", type=int, default=[8, 32])
    p.add_argument("--models", nargs="+", choices=["scosparc", "ums"], default=["scosparc"])
    p.add_argument("--ums-checkpoint", default=None, help="a trained UMS checkpoint (its backbones are used)")
    p.add_argument("--image-size", nargs=2, type=int, default=[384, 512], metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--crf-workers",
        type=int,
        default=None,
        help="processes for a group's CRFs (default: the CPUs, at most 8)",
    )
    p.add_argument("--memory-group", type=int, default=64, help="0 skips the memory run")
    p.add_argument("--memory-backbone", default="vit_base_patch8_224.dino")
    p.add_argument("--memory-child", nargs=2, metavar=("BACKBONE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), tuple(args.image_size))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, input 224, images "
        f"{args.image_size[0]}x{args.image_size[1]}"
    )
    report: dict[str, object] = {"timings": timing_table(args)}
    if args.memory_group:
        report["memory"] = memory_peak(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    np.seterr(all="ignore")
    main()
