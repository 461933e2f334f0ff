"""All configuration of the backend, parsed from the environment in exactly one place.

Environment variables (primary name, then aliases) -> field, default:

- LABEL_STUDIO_URL, LABEL_STUDIO_HOST -> label_studio_url; none: then images only from the local-files root
- LABEL_STUDIO_API_KEY, LABEL_STUDIO_ACCESS_TOKEN -> label_studio_api_key (legacy token or personal access
  token); none: then the legacy token Label Studio sends in /setup
- MODEL_DIR -> model_dir, ./model_dir
- BASIC_AUTH_USER / BASIC_AUTH_PASS -> basic auth on every route, off by default
- LOG_LEVEL -> log_level, INFO
- REDIS_URL -> redis_url; when set, /health is ready only while Redis answers
- COSOD_BACKBONE -> backbone, vit_small_patch8_224.dino
- COSOD_MODEL -> model_name, scosparc (or ums; per project: extra params {"model": ...})
- COSOD_STAGE1_CHECKPOINT / COSOD_UMS_CHECKPOINT -> the models' checkpoint files (UMS needs one)
- COSOD_WEIGHTS_DIR / COSOD_CACHE_DIR -> weights_dir / cache_dir, library defaults
- COSOD_GROUP_BY -> group_by: auto (default), project or field:<name>
- COSOD_MAX_REFS -> max_refs, 24
- COSOD_MAX_GROUP_IMAGES -> max_group_images, 64: larger groups use the asked tasks + K references
- COSOD_DEVICE -> device, cpu
- COSOD_CRF_WORKERS -> crf_workers, unset: processes for a group's dense CRFs, the CPUs (at most 8); 1 runs
  them in the serving process. The masks are the same whatever the number.
- COSOD_MAX_IMAGE_BYTES / COSOD_MAX_IMAGE_PIXELS -> image limits, 64 MiB / 50 Mpx
- COSOD_TASK_LIST_TTL -> task_list_ttl, 60 s (how long a project's task list is cached)
- COSOD_GROUP_CACHE_SIZE -> group_cache_size, 64 groups
- LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, LOCAL_FILES_DOCUMENT_ROOT -> local_files_root, none
- COSOD_LS_MEDIA_ROOT -> ls_media_root, none: Label Studio's media folder (its MEDIA_ROOT, e.g.
  /label-studio/data/media in its image) mounted read-only here; uploaded images (/data/upload/...) are then
  read from it instead of over HTTP (a file not found there is still downloaded)
- COSOD_QUEUE -> queue_name, cosod (the RQ queue the jobs go to; workers listen on it)
- COSOD_READ_AHEAD -> read_ahead, 1: a prelabel job reads the images it needs next (its next chunk, or the
  next queued group's) while the pipeline computes; 0 turns this off
- COSOD_JOB_TIMEOUT -> job_timeout, 3600 s (one group's pre-annotation job)
- COSOD_JOB_RESULT_TTL / COSOD_JOB_FAILURE_TTL -> how long finished / failed jobs are kept, 7 / 30 days
- COSOD_JOB_RETRIES -> job_retries, 2 (re-runs of a job whose worker died or whose transient faults persisted)
- COSOD_JOB_ATTEMPTS / COSOD_JOB_BACKOFF -> tries of each Label Studio call within a job, 4, with
  exponential backoff starting at 2 s (2, 4, 8 s)
- COSOD_WORKER_HEARTBEAT -> worker_heartbeat, 10 s: a worker silent for twice this (plus 1 s) is taken as
  dead and its job is re-queued
- COSOD_WORKER_GPU -> worker_gpu, unset: a worker uses the GPUs CUDA_VISIBLE_DEVICES shows it; auto: it
  claims one free GPU of its machine in Redis and shows itself only that one (replicas of one compose service)
- COSOD_WORKERS_PER_GPU -> workers_per_gpu, 1 / COSOD_GPU_POOL -> gpu_pool, default (one name per machine
  when workers of several machines share a Redis)
- COSOD_TRAIN_EVERY -> train_every, 10: new corrections in a project before a fine-tune is enqueued
- COSOD_PROMOTE_METRIC / COSOD_PROMOTE_MARGIN -> promote_metric, iou / promote_margin, 0.005: a candidate
  replaces the active version only if it beats it on the held-out corrections by more than the margin
  (for mae and hce lower is better)
- COSOD_FINETUNE_STEPS / COSOD_FINETUNE_LR -> 300 optimiser steps at 1e-3
- COSOD_HELDOUT_FRACTION -> heldout_fraction, 0.2 of the corrected images (chosen by image hash)
- COSOD_FINETUNE_MIN_CORRECTIONS -> 3: below this a fine-tune is skipped
- COSOD_FINETUNE_TIMEOUT -> finetune_timeout, 7200 s
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cosod.imageio import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

DEFAULT_BACKBONE = "vit_small_patch8_224.dino"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODELS = ("scosparc", "ums")
PROMOTE_METRICS = (
    "iou",
    "max_f",
    "mean_f",
    "max_e",
    "mean_e",
    "s_measure",
    "mae",
    "hce",
)  # cosod.pipeline.MODELS, without importing torch here


def parse_group_by(value: str) -> str:
    """Validate a grouping rule: ``auto``, ``project`` or ``field:<name>``; returns it normalised."""
    v = (value or "").strip()
    if v.lower() in ("", "auto"):
        return "auto"
    if v.lower() == "project":
        return "project"
    if v.lower().startswith("field:") and v[6:].strip():
        return "field:" + v[6:].strip()
    raise ValueError(f"group_by must be 'auto', 'project' or 'field:<name>', got {value!r}")


@dataclass(frozen=True)
class Settings:
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    model_dir: str = "model_dir"
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    log_level: str = "INFO"
    redis_url: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights_dir: str | None = None
    cache_dir: str | None = None
    group_by: str = "auto"
    max_refs: int = 24
    max_group_images: int = 64
    device: str = "cpu"
    crf_workers: int | None = None
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    local_files_root: str | None = None
    ls_media_root: str | None = None
    task_list_ttl: float = 60.0
    group_cache_size: int = 64
    http_timeout: float = 30.0
    model_name: str = "scosparc"
    stage1_checkpoint: str | None = None
    ums_checkpoint: str | None = None
    queue_name: str = "cosod"
    read_ahead: bool = True
    job_timeout: int = 3600
    job_result_ttl: int = 7 * 24 * 3600
    job_failure_ttl: int = 30 * 24 * 3600
    job_retries: int = 2
    job_attempts: int = 4
    job_backoff: float = 2.0
    worker_heartbeat: int = 10
    worker_gpu: str | None = None
    workers_per_gpu: int = 1
    gpu_pool: str = "default"
    train_every: int = 10
    promote_metric: str = "iou"
    promote_margin: float = 0.005
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    heldout_fraction: float = 0.2
    finetune_min_corrections: int = 3
    finetune_timeout: int = 7200

    def __post_init__(self) -> None:
        if self.model_name not in MODELS:
            raise ValueError(f"COSOD_MODEL must be one of {MODELS}, got {self.model_name!r}")
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise ValueError(
                f"LABEL_STUDIO_URL must start with http:// or https://, got {self.label_studio_url!r}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL must be one of {LOG_LEVELS}, got {self.log_level!r}")
        object.__setattr__(self, "group_by", parse_group_by(self.group_by))
        for name in (
            "max_refs",
            "max_group_images",
            "max_image_bytes",
            "max_image_pixels",
            "group_cache_size",
            "job_timeout",
            "job_result_ttl",
            "job_failure_ttl",
            "job_attempts",
            "worker_heartbeat",
            "workers_per_gpu",
            "train_every",
            "finetune_steps",
            "finetune_min_corrections",
            "finetune_timeout",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.crf_workers is not None and self.crf_workers < 1:
            raise ValueError(f"COSOD_CRF_WORKERS must be >= 1, got {self.crf_workers!r}")
        if self.promote_metric not in PROMOTE_METRICS:
            raise ValueError(
                f"COSOD_PROMOTE_METRIC must be one of {PROMOTE_METRICS}, got {self.promote_metric!r}"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"COSOD_HELDOUT_FRACTION must lie in (0, 1), got {self.heldout_fraction!r}")
        if self.finetune_lr <= 0 or self.promote_margin < 0:
            raise ValueError("COSOD_FINETUNE_LR must be > 0 and COSOD_PROMOTE_MARGIN >= 0")
        if self.job_retries < 0:
            raise ValueError(f"COSOD_JOB_RETRIES must be >= 0, got {self.job_retries!r}")
        if self.job_backoff < 0:
            raise ValueError(f"COSOD_JOB_BACKOFF must be >= 0 seconds, got {self.job_backoff!r}")
        if not self.queue_name or not all(c.isalnum() or c in "-_." for c in self.queue_name):
            raise ValueError(f"COSOD_QUEUE must be letters, digits, '-', '_' or '.', got {self.queue_name!r}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        if self.worker_gpu not in (None, "auto"):
            raise ValueError(f"COSOD_WORKER_GPU must be 'auto' or unset, got {self.worker_gpu!r}")
        if self.worker_gpu == "auto" and not self.device.startswith("cuda"):
            raise ValueError(f"COSOD_WORKER_GPU=auto needs COSOD_DEVICE=cuda, got {self.device!r}")
        if not self.gpu_pool or not all(c.isalnum() or c in "-_." for c in self.gpu_pool):
            raise ValueError(
                f"COSOD_GPU_POOL must be letters, digits, '-', '_' or '.', got {self.gpu_pool!r}"
            )
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        if self.local_files_root and os.path.abspath(self.local_files_root) == os.path.abspath(os.sep):
            raise ValueError("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT must not be '/'")
        if self.ls_media_root and os.path.abspath(self.ls_media_root) == os.path.abspath(os.sep):
            raise ValueError("COSOD_LS_MEDIA_ROOT must not be '/'")

    @property
    def basic_auth(self) -> bool:
        return bool(self.basic_auth_user)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build from ``env`` (default ``os.environ``); raises ValueError quoting a bad value."""
        e = os.environ if env is None else env

        def first(*names: str) -> str | None:
            for n in names:
                if e.get(n):
                    return e[n].strip()
            return None

        def integer(name: str, default: int) -> int:
            raw = first(name)
            try:
                return int(raw) if raw is not None else default
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None

        def flag(name: str, default: bool) -> bool:
            raw = first(name)
            if raw is None:
                return default
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name} must be 1 or 0 (true or false), got {raw!r}")

        def number(name: str, default: float) -> float:
            raw = first(name)
            try:
                return float(raw) if raw is not None else default
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None

        url = first("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST")
        return cls(
            label_studio_url=url.rstrip("/") if url else None,
            label_studio_api_key=first("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
            model_dir=first("MODEL_DIR") or "model_dir",
            basic_auth_user=first("BASIC_AUTH_USER"),
            basic_auth_pass=first("BASIC_AUTH_PASS"),
            log_level=(first("LOG_LEVEL") or "INFO").upper(),
            redis_url=first("REDIS_URL"),
            backbone=first("COSOD_BACKBONE") or DEFAULT_BACKBONE,
            weights_dir=first("COSOD_WEIGHTS_DIR"),
            cache_dir=first("COSOD_CACHE_DIR"),
            group_by=first("COSOD_GROUP_BY") or "auto",
            max_refs=integer("COSOD_MAX_REFS", 24),
            max_group_images=integer("COSOD_MAX_GROUP_IMAGES", 64),
            device=first("COSOD_DEVICE") or "cpu",
            crf_workers=integer("COSOD_CRF_WORKERS", 0) if first("COSOD_CRF_WORKERS") else None,
            max_image_bytes=integer("COSOD_MAX_IMAGE_BYTES", DEFAULT_MAX_BYTES),
            max_image_pixels=integer("COSOD_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS),
            local_files_root=first("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT"),
            ls_media_root=first("COSOD_LS_MEDIA_ROOT"),
            task_list_ttl=number("COSOD_TASK_LIST_TTL", 60.0),
            group_cache_size=integer("COSOD_GROUP_CACHE_SIZE", 64),
            model_name=first("COSOD_MODEL") or "scosparc",
            stage1_checkpoint=first("COSOD_STAGE1_CHECKPOINT"),
            ums_checkpoint=first("COSOD_UMS_CHECKPOINT"),
            queue_name=first("COSOD_QUEUE") or "cosod",
            read_ahead=flag("COSOD_READ_AHEAD", True),
            job_timeout=integer("COSOD_JOB_TIMEOUT", 3600),
            job_result_ttl=integer("COSOD_JOB_RESULT_TTL", 7 * 24 * 3600),
            job_failure_ttl=integer("COSOD_JOB_FAILURE_TTL", 30 * 24 * 3600),
            job_retries=integer("COSOD_JOB_RETRIES", 2),
            job_attempts=integer("COSOD_JOB_ATTEMPTS", 4),
            job_backoff=number("COSOD_JOB_BACKOFF", 2.0),
            worker_heartbeat=integer("COSOD_WORKER_HEARTBEAT", 10),
            worker_gpu=(first("COSOD_WORKER_GPU") or "").lower() or None,
            workers_per_gpu=integer("COSOD_WORKERS_PER_GPU", 1),
            gpu_pool=first("COSOD_GPU_POOL") or "default",
            train_every=integer("COSOD_TRAIN_EVERY", 10),
            promote_metric=first("COSOD_PROMOTE_METRIC") or "iou",
            promote_margin=number("COSOD_PROMOTE_MARGIN", 0.005),
            finetune_steps=integer("COSOD_FINETUNE_STEPS", 300),
            finetune_lr=number("COSOD_FINETUNE_LR", 1e-3),
            heldout_fraction=number("COSOD_HELDOUT_FRACTION", 0.2),
            finetune_min_corrections=integer("COSOD_FINETUNE_MIN_CORRECTIONS", 3),
            finetune_timeout=integer("COSOD_FINETUNE_TIMEOUT", 7200),
        )
