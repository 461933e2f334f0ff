"""Prediction: from Label Studio tasks to masks, per project.

- :mod:`.adapter`: :class:`~.adapter.CoSODModel`, the protocol adapter (``setup``, ``predict``, ``fit``) and
  the ``model_version`` rule;
- :mod:`.groupcache`: group results cached per (model version, group content);
- :mod:`.pipelines`: loading the pipelines (in the background, one per model kind);
- :mod:`.projects`: per-project state (label config, grouping rule, model) kept under ``MODEL_DIR``.

:func:`build_model` is the one place these are put together (the API app and the workers both call it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..grouping import GroupKey
from ..labelstudio.client import LabelStudioClient
from ..metrics import Metrics
from ..settings import Settings
from .adapter import CoSODModel
from .pipelines import PipelineFactory, PipelineLoader


def build_model(
    settings: Settings,
    pipeline_factory: PipelineFactory | None = None,
    metrics: Metrics | None = None,
    schedule_finetune: Callable[[int], Mapping[str, Any]] | None = None,
    schedule_propagation: Callable[[int, GroupKey, int], Mapping[str, Any]] | None = None,
) -> CoSODModel:
    """The process's model: its pipeline loader, Label Studio client and metrics. ``schedule_finetune``
    (project id -> what was enqueued, see ``backend.jobs.finetuning.schedule_finetune``) is what ``fit``
    calls when a project has enough new corrections; without it they are stored and nothing is enqueued.
    ``schedule_propagation`` (project id, group key, corrected task id -> what was enqueued, see
    ``backend.jobs.propagation.schedule_propagation``) is what ``fit`` calls for each stored correction."""
    loader = PipelineLoader(settings, pipeline_factory)
    ls = LabelStudioClient(settings)
    return CoSODModel(
        settings,
        loader,
        ls,
        metrics or Metrics(),
        schedule_finetune=schedule_finetune,
        schedule_propagation=schedule_propagation,
    )


__all__ = ["CoSODModel", "PipelineLoader", "build_model"]
