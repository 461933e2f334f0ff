"""What each deliberate difference from the official SCoSPARC code changes on the equivalence set.

    python bench/equivalence.py                          # set A (tests/equivalence/setA)
    python bench/equivalence.py --set DIR --reference DIR

Writes the generated official weights (tests/equivalence/make_weights.py) to a temporary folder, runs the
default pipeline (ViT-B/8, the official stage-1 checkpoint) and then each named option alone, and prints
per run: masks equal to the reference after > 127, mean and pooled IoU, and pixel-identical masks. The
backbone runs once: later runs read its float32 features from a feature cache (the float16 option rounds
them, as its own cache would). ``backbone_amp`` acts on CUDA only and is not measured on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cosod.data import load_groups
from cosod.features import image_hash
from cosod.imageio import read_images
from cosod.pipeline import Pipeline, PipelineConfig

HERE = Path(__file__).resolve().parents[1] / "tests" / "equivalence"
OPTIONS: list[tuple[str, dict[str, object]]] = [
    ("default (official)", {}),
    ("feature_precision=float16", {"feature_precision": "float16"}),
    ("crf_aspect=keep", {"crf_aspect": "keep"}),
    ("crf_uniform=keep", {"crf_uniform": "keep"}),
    ("refine_fallback=best", {"refine_fallback": "best"}),
    ("binary output (cosod predict --binary)", {}),
]


def make_weights(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_weights", HERE / "make_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out)


def score(refs: dict[str, np.ndarray], preds: dict[str, np.ndarray]) -> tuple[int, float, float, int]:
    equal, identical, ious, inter, union = 0, 0, [], 0, 0
    for key, ref in refs.items():
        a, b = ref > 127, preds[key] > 127
        i, u = int((a & b).sum()), int((a | b).sum())
        inter, union = inter + i, union + u
        ious.append(1.0 if u == 0 else i / u)
        equal += int(np.array_equal(a, b))
        identical += int(np.array_equal(ref, preds[key]))
    return equal, float(np.mean(ious)), inter / union if union else 1.0, identical


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", type=Path, default=HERE / "setA", help="CoSOD layout <set>/images/<group>/*")
    p.add_argument("--reference", type=Path, default=None, help="default: <set>/reference")
    args = p.parse_args(argv)
    reference = args.reference or args.set / "reference"
    groups = load_groups(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        weights, cache = Path(tmp) / "weights", Path(tmp) / "cache"
        make_weights(weights)
        data = []
        for g in groups:
            images, paths, _ = read_images(g.images)
            data.append((g.name, images, paths, [image_hash(im) for im in images]))
        refs = {
            f"{name}/{path.stem}": np.asarray(Image.open(reference / name / f"{path.stem}.png"))
            for name, _, paths, _ in data
            for path in paths
        }
        print(f"{len(refs)} images in {len(groups)} groups; reference {reference}\n")
        print("| run | equal (> 127) | mean IoU | pooled IoU | pixel-identical | s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, option in OPTIONS:
            config = PipelineConfig(
                backbone="vit_base_patch8_224.dino",
                stage1_checkpoint=str(weights / "model_combined.pt"),
                **option,
            )
            pipe = Pipeline.build(config, weights_dir=str(weights), cache_dir=str(cache))
            t0 = time.perf_counter()
            preds = {}
            for name, images, paths, hashes in data:
                pred = pipe.predict_group(images, hashes=hashes)
                outputs = pred.masks if label.startswith("binary") else pred.mask_maps
                for path, out in zip(paths, outputs, strict=True):
                    preds[f"{name}/{path.stem}"] = out.astype(np.uint8) * 255 if out.dtype == bool else out
            equal, mean_iou, pooled, identical = score(refs, preds)
            seconds = time.perf_counter() - t0
            row = [label, f"{equal} of {len(refs)}", f"{mean_iou:.4f}", f"{pooled:.4f}", identical]
            print("| " + " | ".join(map(str, row)) + f" | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
