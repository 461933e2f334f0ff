"""All configuration of the backend, parsed from the environment in exactly one place.

Environment variables (primary name, then aliases) -> field, default:

- LABEL_STUDIO_URL, LABEL_STUDIO_HOST -> label_studio_url; none: then images only from the local-files root
- LABEL_STUDIO_API_KEY, LABEL_STUDIO_ACCESS_TOKEN -> label_studio_api_key (legacy token or personal access
  token); none: then the legacy token Label Studio sends in /setup, which arrives only when /health is ready,
  that is with a local-files root or COSOD_LS_MEDIA_ROOT: without the URL or the key and without either
  root, /health is not ready (backend/api/health.py)
- MODEL_DIR -> model_dir, ./model_dir
- BASIC_AUTH_USER / BASIC_AUTH_PASS -> basic auth on every route, off by default
- LOG_LEVEL -> log_level, INFO
- REDIS_URL -> redis_url; when set, /health is ready only while Redis answers
- COSOD_BACKBONE -> backbone, vit_small_patch8_224.dino
- COSOD_MODEL -> model_name, scosparc (or ums; per project: extra params {"model": ...})
- COSOD_STAGE1_CHECKPOINT / COSOD_UMS_CHECKPOINT -> the models' checkpoint files (UMS needs one)
- COSOD_WEIGHTS_DIR / COSOD_CACHE_DIR -> weights_dir / cache_dir, library defaults
- COSOD_GROUP_BY -> group_by: auto (default), project, field:<name>, filename:<regex> or similar[:<threshold>]
- COSOD_SIMILAR_THRESHOLD / COSOD_SIMILAR_MIN_GROUP / COSOD_SIMILAR_MAX_GROUP -> the ``similar`` rule's
  cosine threshold (0.8), smallest group (2) and largest group (64); see backend/grouping/similar.py
- COSOD_MAX_REFS -> max_refs, 24
- COSOD_MAX_GROUP_IMAGES -> max_group_images, 64: larger groups use the asked tasks + K references
- COSOD_DEVICE -> device, cpu
- COSOD_CRF_WORKERS -> crf_workers, unset: processes for a group's dense CRFs, the CPUs (at most 8); 1 runs
  them in the serving process. The masks are the same whatever the number.
- COSOD_MAX_IMAGE_BYTES / COSOD_MAX_IMAGE_PIXELS -> image limits, 64 MiB / 50 Mpx
  (the pixel limit also bounds a stored correction: a brush region's original_width x original_height,
  checked before its RLE is decoded, and each stored mask before a fine-tune reads it)
- COSOD_MAX_BODY_BYTES -> max_body_bytes, 16 MiB: a larger request body is answered 413 before it is read
  (JSON nested deeper than Python's parser allows is answered 400)
- COSOD_MAX_PREDICT_TASKS -> max_predict_tasks, 256: the tasks one /predict computes; those beyond it get a
  per-task error naming this variable (pre-annotate big projects with POST /jobs/prelabel)
- COSOD_TASK_LIST_TTL -> task_list_ttl, 60 s (how long a project's task list is cached)
- COSOD_GROUP_CACHE_SIZE -> group_cache_size, 64 groups
- LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, LOCAL_FILES_DOCUMENT_ROOT -> local_files_root, none: then
  /data/local-files/ images are refused (mount Label Studio's local-files root and name it here)
- COSOD_LS_MEDIA_ROOT -> ls_media_root, none: Label Studio's media folder (its MEDIA_ROOT, e.g.
  /label-studio/data/media in its image) mounted read-only here; uploaded images (/data/upload/...) are then
  read from it instead of over HTTP (a file not found there is still downloaded)
- COSOD_QUEUE -> queue_name, cosod (the RQ queue the jobs go to; workers listen on it)
- COSOD_READ_AHEAD -> read_ahead, 1: a prelabel job reads the images it needs next (its next chunk, or the
  next queued group's) while the pipeline computes; 0 turns this off
- COSOD_JOB_TIMEOUT -> job_timeout, 3600 s (one group's pre-annotation job)
- COSOD_JOB_RESULT_TTL / COSOD_JOB_FAILURE_TTL -> how long finished / failed jobs are kept, 7 / 30 days
- COSOD_JOB_RETRIES -> job_retries, 2: re-runs of a job whose transient faults persisted (a run whose worker
  died is re-run without using one, up to 10 deaths)
- COSOD_JOB_ATTEMPTS / COSOD_JOB_BACKOFF -> tries of each Label Studio call within a job, 4, with
  exponential backoff starting at 2 s (2, 4, 8 s)
- COSOD_WORKER_HEARTBEAT -> worker_heartbeat, 10 s: a worker silent for twice this (plus 1 s) is taken as
  dead and its job is re-queued
- COSOD_REDIS_OUTAGE_WAIT -> redis_outage_wait, 600 s: how long a worker waits for an unreachable Redis, at
  any point of a job, before it exits 1
- COSOD_WORKER_GPU -> worker_gpu, unset: a worker uses the GPUs CUDA_VISIBLE_DEVICES shows it; auto: it
  claims one free GPU of its machine in Redis and shows itself only that one (replicas of one compose service)
- COSOD_WORKERS_PER_GPU -> workers_per_gpu, 1 / COSOD_GPU_POOL -> gpu_pool, default (one name per machine
  when workers of several machines share a Redis)
- COSOD_TRAIN_EVERY -> train_every, 10: new corrections in a project before a fine-tune is enqueued
- COSOD_PROPAGATE -> propagate, 1: a correction queues a job that re-predicts the other unannotated tasks of
  its group from the group's corrections (backend/jobs/propagation.py); 0 turns it off (per project: extra
  params {"propagate": false})
- COSOD_ABSENCE -> absence, 0: 1 runs the absence decision (cosod/absence.py) on every project's groups: an
  image judged without the group's object gets no mask, score 0.0 and, when the config has one, the "no common
  object" choice (backend/prediction/absence.py); per project: extra params {"absence": true}. Off, the
  predictions and their model_version are the official method's
- COSOD_PROMPT_TTL -> prompt_ttl, 3600 s: how long the mask of an interactive prompt (a smart keypoint,
  rectangle or brush on a task) stays an exemplar of its group's propagation (backend/learning/prompts.py)
- COSOD_PROMOTE_METRIC / COSOD_PROMOTE_MARGIN -> promote_metric, iou / promote_margin, 0.005: a candidate
  replaces the active version only if, over the held-out corrections, the lower bound of the one-sided 95 %
  paired-bootstrap interval of its mean per-image gain on the metric is above the margin (for mae and hce
  lower is better; see cosod/promotion.py)
- COSOD_PROMOTE_MIN_HELDOUT -> promote_min_heldout, 5: with fewer held-out images a candidate is kept, never
  promoted
- COSOD_FINETUNE_STEPS / COSOD_FINETUNE_LR -> 300 optimiser steps at 1e-3
- COSOD_HELDOUT_FRACTION -> heldout_fraction, 0.2 of the corrected images (chosen by image hash)
- COSOD_FINETUNE_MIN_CORRECTIONS -> 3: below this a fine-tune is skipped
- COSOD_FINETUNE_TIMEOUT -> finetune_timeout, 7200 s
- (no variable) -> http_timeout, 30 s: the timeout of each Label Studio HTTP request
- COSOD_BACKEND_URL -> backend_url, http://127.0.0.1:9090: the running backend ``cosod-backend`` talks to
  (its ``--backend`` option wins)

How values are read: ``Settings.from_env(env)`` reads only ``env`` (default ``os.environ``; never a ``.env``
file). A variable's value is stripped of surrounding whitespace, and an empty (or blank) value counts as
unset; of a field's names the first one set wins, so a primary name beats its aliases. Names are
case-sensitive. ``Settings(field=value, ...)`` reads no environment at all: fields not given keep their
defaults. Either way every value is validated, and a bad one raises ``ValueError`` with one line per problem
that names the variable and quotes the value (``COSOD_MAX_REFS must be an integer, got 'many'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cosod.imageio import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

from .rules import parse_group_by

DEFAULT_BACKBONE = "vit_small_patch8_224.dino"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
ModelName = Literal["scosparc", "ums"]
PromoteMetric = Literal[  # the keys of cosod.finetune.HIGHER_IS_BETTER, without importing torch here
    "iou", "max_f", "mean_f", "max_e", "mean_e", "s_measure", "mae", "hce"
]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
MODELS: tuple[str, ...] = get_args(ModelName)
PROMOTE_METRICS: tuple[str, ...] = get_args(PromoteMetric)

_NAME_CHARS = "must be letters, digits, '-', '_' or '.'"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env(default: Any, *names: str, **constraints: Any) -> Any:
    """A field read from the env variables ``names`` (primary first, then aliases), with its one default."""
    return Field(default, validation_alias=AliasChoices(*names), **constraints)


def _names_of(field: FieldInfo) -> tuple[str, ...]:
    """The env variables of a field, primary first; () for a field no variable sets."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(c for c in alias.choices if isinstance(c, str))
    return (alias,) if isinstance(alias, str) else ()


class _Environment(PydanticBaseSettingsSource):
    """A field's value is that of the first of its env variables set to a non-blank value, stripped."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        for name in _names_of(field):
            value = (self.env.get(name) or "").strip()
            if value:
                return value, name, False
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {name: self.get_field_value(f, name)[0] for name, f in self.settings_cls.model_fields.items()}
        return {name: value for name, value in found.items() if value is not None}


# How pydantic's error types read after "<VARIABLE> "; ctx fills the braces. Others keep pydantic's text.
_PROBLEMS = {
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
}


def _problem(err: Mapping[str, Any]) -> str:
    """What one pydantic error says the value must be, e.g. ``must be >= 1``."""
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error":  # our validators raise ValueError("must ...")
        return str(ctx.get("error", err["msg"]))
    if err["type"] == "literal_error":  # pydantic's "'a', 'b' or 'c'" as this code base writes it
        return "must be one of " + str(ctx["expected"]).replace("' or '", "', '")
    template = _PROBLEMS.get(err["type"])
    return template.format(**ctx) if template else err["msg"]


def _explain(exc: ValidationError, labels: Mapping[str, str]) -> str:
    """One line per problem: ``<VARIABLE> <what it must be>, got <value>``; ``labels`` maps a field's name
    or alias to the variable named. A check across fields (no location) reads as its own message."""
    lines = []
    for err in exc.errors(include_url=False):
        if not err["loc"]:
            lines.append(_problem(err))
        elif err["type"] == "extra_forbidden":
            lines.append(f"{err['loc'][0]!r} is not a setting")
        else:
            label = labels.get(str(err["loc"][0]), str(err["loc"][0]))
            lines.append(f"{label} {_problem(err)}, got {err['input']!r}")
    return "\n".join(lines)


class Settings(BaseSettings):
    """The backend's configuration, immutable; see the module docstring for each field's variable."""

    model_config = SettingsConfigDict(
        frozen=True, populate_by_name=True, extra="forbid", protected_namespaces=()
    )

    label_studio_url: str | None = _env(None, "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST")
    label_studio_api_key: str | None = _env(
        None, "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN", repr=False
    )
    model_dir: str = _env("model_dir", "MODEL_DIR")
    basic_auth_user: str | None = _env(None, "BASIC_AUTH_USER")
    basic_auth_pass: str | None = _env(None, "BASIC_AUTH_PASS", repr=False)
    log_level: LogLevel = _env("INFO", "LOG_LEVEL")
    redis_url: str | None = _env(None, "REDIS_URL")
    backbone: str = _env(DEFAULT_BACKBONE, "COSOD_BACKBONE")
    weights_dir: str | None = _env(None, "COSOD_WEIGHTS_DIR")
    cache_dir: str | None = _env(None, "COSOD_CACHE_DIR")
    group_by: str = _env("auto", "COSOD_GROUP_BY")
    similar_threshold: float = _env(0.8, "COSOD_SIMILAR_THRESHOLD", gt=0.0, lt=1.0)
    similar_min_group: int = _env(2, "COSOD_SIMILAR_MIN_GROUP", ge=1)
    similar_max_group: int = _env(64, "COSOD_SIMILAR_MAX_GROUP", ge=2)
    max_refs: int = _env(24, "COSOD_MAX_REFS", ge=1)
    max_group_images: int = _env(64, "COSOD_MAX_GROUP_IMAGES", ge=1)
    device: str = _env("cpu", "COSOD_DEVICE")
    crf_workers: int | None = _env(None, "COSOD_CRF_WORKERS", ge=1)
    max_image_bytes: int = _env(DEFAULT_MAX_BYTES, "COSOD_MAX_IMAGE_BYTES", ge=1)
    max_image_pixels: int = _env(DEFAULT_MAX_PIXELS, "COSOD_MAX_IMAGE_PIXELS", ge=1)
    max_body_bytes: int = _env(16 * 1024 * 1024, "COSOD_MAX_BODY_BYTES", ge=1024)
    max_predict_tasks: int = _env(256, "COSOD_MAX_PREDICT_TASKS", ge=1)
    local_files_root: str | None = _env(
        None, "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT"
    )
    ls_media_root: str | None = _env(None, "COSOD_LS_MEDIA_ROOT")
    task_list_ttl: float = _env(60.0, "COSOD_TASK_LIST_TTL")
    group_cache_size: int = _env(64, "COSOD_GROUP_CACHE_SIZE", ge=1)
    http_timeout: float = 30.0  # no env variable
    model_name: ModelName = _env("scosparc", "COSOD_MODEL")
    stage1_checkpoint: str | None = _env(None, "COSOD_STAGE1_CHECKPOINT")
    ums_checkpoint: str | None = _env(None, "COSOD_UMS_CHECKPOINT")
    queue_name: str = _env("cosod", "COSOD_QUEUE")
    read_ahead: bool = _env(True, "COSOD_READ_AHEAD")
    job_timeout: int = _env(3600, "COSOD_JOB_TIMEOUT", ge=1)
    job_result_ttl: int = _env(7 * 24 * 3600, "COSOD_JOB_RESULT_TTL", ge=1)
    job_failure_ttl: int = _env(30 * 24 * 3600, "COSOD_JOB_FAILURE_TTL", ge=1)
    job_retries: int = _env(2, "COSOD_JOB_RETRIES", ge=0)
    job_attempts: int = _env(4, "COSOD_JOB_ATTEMPTS", ge=1)
    job_backoff: float = _env(2.0, "COSOD_JOB_BACKOFF", ge=0)
    worker_heartbeat: int = _env(10, "COSOD_WORKER_HEARTBEAT", ge=1)
    redis_outage_wait: float = _env(600.0, "COSOD_REDIS_OUTAGE_WAIT", ge=1)
    worker_gpu: str | None = _env(None, "COSOD_WORKER_GPU")
    workers_per_gpu: int = _env(1, "COSOD_WORKERS_PER_GPU", ge=1)
    gpu_pool: str = _env("default", "COSOD_GPU_POOL")
    train_every: int = _env(10, "COSOD_TRAIN_EVERY", ge=1)
    propagate: bool = _env(True, "COSOD_PROPAGATE")
    absence: bool = _env(False, "COSOD_ABSENCE")
    prompt_ttl: float = _env(3600.0, "COSOD_PROMPT_TTL", gt=0)
    promote_metric: PromoteMetric = _env("iou", "COSOD_PROMOTE_METRIC")
    promote_margin: float = _env(0.005, "COSOD_PROMOTE_MARGIN", ge=0)
    promote_min_heldout: int = _env(5, "COSOD_PROMOTE_MIN_HELDOUT", ge=1)
    finetune_steps: int = _env(300, "COSOD_FINETUNE_STEPS", ge=1)
    finetune_lr: float = _env(1e-3, "COSOD_FINETUNE_LR", gt=0)
    heldout_fraction: float = _env(0.2, "COSOD_HELDOUT_FRACTION", gt=0, lt=1)
    finetune_min_corrections: int = _env(3, "COSOD_FINETUNE_MIN_CORRECTIONS", ge=1)
    finetune_timeout: int = _env(7200, "COSOD_FINETUNE_TIMEOUT", ge=1)
    backend_url: str = _env("http://127.0.0.1:9090", "COSOD_BACKEND_URL")

    def __init__(self, **values: Any) -> None:
        """Keyword construction by field name; a bad value raises ``ValueError`` (see ``_explain``)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ValueError(_explain(exc, _labels(type(self)))) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the keywords given: the environment is read by ``from_env`` alone, and no file ever."""
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build from ``env`` (default ``os.environ``) alone; raises ValueError quoting a bad value."""
        return cls(**_Environment(cls, os.environ if env is None else env)())

    @classmethod
    def env_names(cls) -> dict[str, tuple[str, ...]]:
        """Each field's env variables, primary first; () for a field no variable sets."""
        return {name: _names_of(field) for name, field in cls.model_fields.items()}

    @property
    def basic_auth(self) -> bool:
        return bool(self.basic_auth_user)

    @property
    def private_paths(self) -> dict[str, str]:
        """The server's folders, by the variable that names them, which no answer may show."""
        named = {
            "MODEL_DIR": self.model_dir,
            "COSOD_CACHE_DIR": self.cache_dir,
            "COSOD_WEIGHTS_DIR": self.weights_dir,
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": self.local_files_root,
            "COSOD_LS_MEDIA_ROOT": self.ls_media_root,
        }
        out = {}
        for name, folder in named.items():
            if folder:
                out[os.path.abspath(folder)] = f"${name}"
        return out

    @property
    def secrets(self) -> tuple[str, ...]:
        """The configured secrets, which no answer may show (see :func:`backend.errors.redact`)."""
        redis_password = urlsplit(self.redis_url).password if self.redis_url else None
        found = (self.label_studio_api_key, self.basic_auth_pass, redis_password)
        return tuple(s for s in found if s)

    def with_(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (by field name), validated like a new one."""
        return type(self)(**{**self.model_dump(), **changes})

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("worker_gpu", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return (v.lower() or None) if isinstance(v, str) else v

    @field_validator("read_ahead", mode="before")
    @classmethod
    def _flag(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if v.lower() in _TRUE + _FALSE:
            return v.lower() in _TRUE
        raise ValueError("must be 1 or 0 (true or false)")

    @field_validator("label_studio_url", "backend_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        v = v.rstrip("/") if v else v
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("group_by")
    @classmethod
    def _group_by(cls, v: str) -> str:
        try:
            return parse_group_by(v)
        except ValueError as exc:
            message = str(exc).removeprefix("group_by ")
            raise ValueError(message.removesuffix(f", got {v!r}")) from None

    @field_validator("queue_name", "gpu_pool")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(_NAME_CHARS)
        return v

    @field_validator("worker_gpu")
    @classmethod
    def _auto_or_unset(cls, v: str | None) -> str | None:
        if v not in (None, "auto"):
            raise ValueError("must be 'auto' or unset")
        return v

    @field_validator("local_files_root", "ls_media_root")
    @classmethod
    def _not_root(cls, v: str | None) -> str | None:
        if v and os.path.abspath(v) == os.path.abspath(os.sep):
            raise ValueError("must not be '/'")
        return v

    @model_validator(mode="after")
    def _together(self) -> Settings:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        if self.worker_gpu == "auto" and not self.device.startswith("cuda"):
            raise ValueError(f"COSOD_WORKER_GPU=auto needs COSOD_DEVICE=cuda, got {self.device!r}")
        if self.similar_min_group > self.similar_max_group:
            raise ValueError(
                f"COSOD_SIMILAR_MIN_GROUP ({self.similar_min_group}) must be at most "
                f"COSOD_SIMILAR_MAX_GROUP ({self.similar_max_group})"
            )
        return self


def _labels(cls: type[Settings]) -> dict[str, str]:
    """Field name or alias -> the name a message uses: the primary env variable, or the field's name."""
    labels = {}
    for name, names in cls.env_names().items():
        for key in (name, *names):
            labels[key] = names[0] if names else name
    return labels
