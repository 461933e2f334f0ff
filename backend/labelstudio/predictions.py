"""Predictions updated in place, and which tasks people have annotated (for the propagation job).

Label Studio 1.23.2 updates a prediction with ``PATCH /api/predictions/<id>`` (``PredictionAPI``, a Django
REST ``ModelViewSet`` in ``label_studio/tasks/api.py``; the SDK's ``predictions.update``): the row keeps its
id, task and ``model_version``, so a task keeps exactly one prediction of a version, and the labeling stream
reads it again when the task is opened. ``PredictionSerializer.validate``
(``label_studio/tasks/serializers.py``) checks a ``result`` against the label config only under the feature
flag ``fflag_feat_utc_210_prediction_validation_15082025`` (off in 1.23.2), and then needs the task or
project in the same request, so the task is always sent along.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .client import NO_SDK_RETRY, LabelStudioClient, _sdk_error

IDS_PER_STATE_REQUEST = 50  # tasks per Data Manager request that carries their predictions and annotations


@dataclass(frozen=True)
class TaskPredictions:
    """Whether a task has an annotation, and the ids of its predictions of one version (None: not listed,
    ask :func:`version_predictions`)."""

    annotated: bool
    predictions: tuple[int, ...] | None


def annotated_tasks(ls: LabelStudioClient, project_id: int, task_ids: Iterable[int]) -> dict[int, bool]:
    """Task id -> whether it has an annotation (submitted or skipped), for the tasks among ``task_ids``
    that Label Studio lists in the project (deleted ones are left out): the Data Manager's task list with
    the ``total_annotations`` and ``cancelled_annotations`` counters, one request per 200 ids."""
    include = "id,total_annotations,cancelled_annotations"
    out = {}
    for t in ls._selected(project_id, task_ids, include):
        total = int(getattr(t, "total_annotations", 0) or 0)
        cancelled = int(getattr(t, "cancelled_annotations", 0) or 0)
        out[int(t.id)] = total + cancelled > 0
    return out


def version_predictions(ls: LabelStudioClient, task_id: int, model_version: str) -> list[int]:
    """The ids of the task's predictions of ``model_version``, oldest first."""
    try:
        preds = ls.sdk().predictions.list(task=task_id, request_options=NO_SDK_RETRY)
    except Exception as exc:
        raise _sdk_error(
            exc, f"listing the predictions of task {task_id}", ls.settings.label_studio_url
        ) from None
    return sorted(int(p.id) for p in preds if p.model_version == model_version and p.id is not None)


def update_prediction(
    ls: LabelStudioClient, prediction_id: int, task_id: int, result: Sequence[dict[str, Any]], score: float
) -> None:
    """Replace the result and score of prediction ``prediction_id`` (of task ``task_id``) in place."""
    try:
        ls.sdk().predictions.update(
            id=prediction_id,
            task=task_id,
            result=list(result),
            score=score,
            request_options=NO_SDK_RETRY,
        )
    except Exception as exc:
        raise _sdk_error(
            exc, f"updating prediction {prediction_id} of task {task_id}", ls.settings.label_studio_url
        ) from None


def task_predictions(
    ls: LabelStudioClient, project_id: int, task_ids: Iterable[int], model_version: str
) -> dict[int, TaskPredictions]:
    """For the tasks among ``task_ids`` that Label Studio lists in the project: whether each has an
    annotation and the ids of its predictions of ``model_version``, from the Data Manager's task list with
    ``fields=all`` (which carries each task's predictions, with their results), one request per
    :data:`IDS_PER_STATE_REQUEST` ids: one request for a usual group instead of one per task."""
    ids = sorted({int(i) for i in task_ids})
    out: dict[int, TaskPredictions] = {}
    for start in range(0, len(ids), IDS_PER_STATE_REQUEST):
        chunk = ids[start : start + IDS_PER_STATE_REQUEST]
        query = json.dumps({"selectedItems": {"all": False, "included": chunk}})
        try:
            listed = ls._list_tasks(
                NO_SDK_RETRY,
                project=project_id,
                fields="all",
                include="id,total_annotations,cancelled_annotations,predictions",
                query=query,
                page_size=len(chunk),
            )
        except Exception as exc:
            raise _sdk_error(
                exc,
                f"listing {len(chunk)} tasks of project {project_id}",
                ls.settings.label_studio_url,
                project_id,
            ) from None
        for t in listed:
            if t.id is None or int(t.id) not in chunk:
                continue
            preds = getattr(t, "predictions", None)
            found: tuple[int, ...] | None = None
            if isinstance(preds, list):
                found = tuple(
                    sorted(
                        int(pid)
                        for p in preds
                        if _get(p, "model_version") == model_version and (pid := _get(p, "id")) is not None
                    )
                )
            total = int(getattr(t, "total_annotations", 0) or 0) + int(
                getattr(t, "cancelled_annotations", 0) or 0
            )
            out[int(t.id)] = TaskPredictions(total > 0, found)
    return out


def _get(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)
