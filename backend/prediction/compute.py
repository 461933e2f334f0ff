"""One ``predict_group`` on a set of tasks: their images read in parallel, each task's outcome.

Used by :class:`~backend.prediction.adapter.CoSODModel` for ``/predict`` and by the batch jobs through it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cosod.errors import ImageReadError

from ..errors import BackendError, ImageFetchError, ImageRefusedError, brief
from ..grouping import TaskRef
from ..labelstudio.client import LabelStudioClient
from ..metrics import Metrics
from .groupcache import Outcome

log = logging.getLogger(__name__)


def compute_outcomes(
    ls: LabelStudioClient,
    metrics: Metrics,
    tasks: list[TaskRef],
    image_key: str,
    pipeline: Any,
    project_id: int,
) -> dict[int, Outcome]:
    """Fetch the images of ``tasks`` (of project ``project_id``: a cloud image is read only for a task
    Label Studio lists there) and run one ``predict_group`` on the readable ones: task id -> outcome (a
    mask at the image's size and a score, or the reason there is none)."""
    t0 = time.perf_counter()
    outcomes: dict[int, Outcome] = {}

    def load(t: TaskRef) -> tuple[TaskRef, np.ndarray | None, Outcome | None]:
        try:
            return t, ls.read_image(t.data.get(image_key), t.id, project_id=project_id), None
        except ImageReadError as exc:
            return t, None, _failed(t.id, "image_unreadable", "image not decodable, empty result", exc)
        except ImageRefusedError as exc:
            return t, None, _failed(t.id, "image_refused", "image refused", exc)
        except (ImageFetchError, BackendError) as exc:
            return t, None, _failed(t.id, "image_fetch", "image not fetched", exc)

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(tasks)))) as pool:
        loaded = list(pool.map(load, tasks))
    good = [(t, img) for t, img, bad in loaded if img is not None]
    outcomes.update({t.id: bad for t, _, bad in loaded if bad is not None})
    if good:
        pred = pipeline.predict_group([img for _, img in good])
        metrics.group_images.inc(len(good))
        decision = getattr(pred, "absence", None)  # with the absence decision on (backend.prediction.absence)
        absent = set(decision.absent) if decision is not None else set()
        for k, (t, img) in enumerate(good):
            mask = np.asarray(pred.masks[k], dtype=bool)
            if mask.shape != img.shape[:2]:
                raise RuntimeError(f"the pipeline returned a {mask.shape} mask for a {img.shape[:2]} image")
            outcomes[t.id] = Outcome(mask=mask, score=float(pred.scores[k]), absent=k in absent)
        log.debug(
            "group of %d: mode %s, timings %s",
            len(good),
            getattr(pred, "mode", "?"),
            getattr(pred, "timings", {}),
        )
    metrics.pipeline_seconds.observe(time.perf_counter() - t0)
    return outcomes


def _failed(task_id: int, kind: str, what: str, exc: Exception) -> Outcome:
    message = brief(str(exc))
    log.warning("task %s: %s: %s", task_id, what, message)
    return Outcome(error=message, kind=kind)
