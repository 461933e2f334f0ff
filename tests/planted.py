"""A real pipeline whose backbone features are planted: the group of ``tests/test_propagate.py``'s
``planted`` (a 7x7-cell object near one direction in every present image, random background tokens,
optionally a recurring distractor), looked up by image content hash. Everything after the backbone (the
identity stage 1, the threshold, region refinement, the absence decision, the output size) is the real
tiny pipeline's; the tiny random backbone itself sees nothing in images, so a known answer needs these.

Used by tests/test_backend_absence.py in-process and by tests/e2e/test_absence.py, whose backend runs
``gunicorn 'tests.planted:create_app()'`` (the group is made from ``COSOD_TEST_PLANTED``, ``seed:absent``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from cosod.features import image_hash
from cosod.pipeline import Pipeline, PipelineConfig


def planted_group(n: int, absent: Sequence[int], seed: int, *, distractor: bool = False) -> Any:
    """``(feats, images, object masks)`` of a planted group (tests/test_propagate.py's ``planted``)."""
    from tests.test_propagate import planted

    feats, images, obj, _ = planted(n, absent=tuple(absent), distractor=distractor, seed=seed)
    return feats, images, obj


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class PlantedPipeline(Pipeline):
    """The tiny pipeline (no CRF) with features looked up by image hash instead of a backbone pass."""

    def __init__(self, feats: Any, images: Sequence[np.ndarray], config: PipelineConfig | None = None):
        base = Pipeline.build(config or PipelineConfig(backbone="tiny", crf=False), crf_workers=1)
        super().__init__(base.config, base.backbone, base.head, crf_workers=1)
        self.planted = feats
        self.rows = {image_hash(im): i for i, im in enumerate(images)}

    def _encode(self, backbone: Any, images: Sequence[np.ndarray], hashes: Sequence[str] | None) -> Any:
        digests = list(hashes) if hashes is not None else [image_hash(im) for im in images]
        return self.planted.select([self.rows[h] for h in digests])


def from_env() -> tuple[Any, list[np.ndarray], list[np.ndarray], PlantedPipeline]:
    """The group and pipeline ``COSOD_TEST_PLANTED`` (``"<n>:<seed>:<absent,absent>"``) names."""
    n, seed, absent = os.environ.get("COSOD_TEST_PLANTED", "10:5:2,7").split(":")
    feats, images, obj = planted_group(int(n), [int(a) for a in absent.split(",") if a], int(seed))
    return feats, images, obj, PlantedPipeline(feats, images)


def create_app() -> Any:
    """The backend app (settings from the environment) serving the planted pipeline."""
    from backend.api.app import create_app as make

    pipeline = from_env()[3]
    return make(pipeline_factory=lambda _settings: pipeline)
