"""The default SCoSPARC path reproduces the official code's masks (tests/equivalence/README.md): ViT-B/8 with
the generated weights on set A, through `cosod predict` and the real weight loading; about a minute on 2 CPU
cores."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cosod.cli import main

HERE = Path(__file__).resolve().parent / "equivalence"
SET_A = HERE / "setA"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def official_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("make_weights", HERE / "make_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("official-weights")
    module.main(out)
    return out


def test_cosod_predict_writes_the_official_masks_of_set_a(official_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    argv = [
        "predict",
        str(SET_A),
        "--out",
        str(out),
        "--backbone",
        "vit_base_patch8_224.dino",
        "--checkpoint",
        str(official_weights / "model_combined.pt"),
        "--weights-dir",
        str(official_weights),
    ]
    assert main(argv) == 0
    compare = subprocess.run(
        [sys.executable, str(HERE / "compare.py"), str(SET_A / "reference"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compare.stdout.strip().splitlines()[-1].startswith("32 of 32 masks equal"), compare.stdout
    assert compare.returncode == 0
    refs = sorted((SET_A / "reference").rglob("*.png"))
    assert len(refs) == 32
    for ref in refs:  # not only equal after > 127: the soft edges are the official bytes too
        got = np.asarray(Image.open(out / ref.relative_to(SET_A / "reference")))
        assert np.array_equal(got, np.asarray(Image.open(ref))), ref
