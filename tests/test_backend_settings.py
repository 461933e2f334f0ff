"""backend.settings: env parsing, aliases, defaults and messages for bad values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from backend import settings as settings_module
from backend.settings import DEFAULT_BACKBONE, Settings, parse_group_by

# Every field's default as the hand-written parser (before pydantic-settings) gave it, written out by hand.
TODAYS_DEFAULTS: dict[str, Any] = {
    "label_studio_url": None,
    "label_studio_api_key": None,
    "model_dir": "model_dir",
    "basic_auth_user": None,
    "basic_auth_pass": None,
    "log_level": "INFO",
    "redis_url": None,
    "backbone": "vit_small_patch8_224.dino",
    "weights_dir": None,
    "cache_dir": None,
    "group_by": "auto",
    "similar_threshold": 0.8,
    "similar_min_group": 2,
    "similar_max_group": 64,
    "max_refs": 24,
    "max_group_images": 64,
    "device": "cpu",
    "crf_workers": None,
    "max_image_bytes": 64 * 1024 * 1024,
    "max_image_pixels": 50_000_000,
    "max_body_bytes": 16 * 1024 * 1024,
    "max_predict_tasks": 256,
    "local_files_root": None,
    "ls_media_root": None,
    "task_list_ttl": 60.0,
    "group_cache_size": 64,
    "http_timeout": 30.0,
    "model_name": "scosparc",
    "stage1_checkpoint": None,
    "ums_checkpoint": None,
    "queue_name": "cosod",
    "read_ahead": True,
    "job_timeout": 3600,
    "job_result_ttl": 604_800,
    "job_failure_ttl": 2_592_000,
    "job_retries": 2,
    "job_attempts": 4,
    "job_backoff": 2.0,
    "worker_heartbeat": 10,
    "redis_outage_wait": 600.0,
    "worker_gpu": None,
    "workers_per_gpu": 1,
    "gpu_pool": "default",
    "train_every": 10,
    "propagate": True,
    "absence": False,
    "prompt_ttl": 3600.0,
    "promote_metric": "iou",
    "promote_margin": 0.005,
    "promote_min_heldout": 5,
    "finetune_steps": 300,
    "finetune_lr": 1e-3,
    "heldout_fraction": 0.2,
    "finetune_min_corrections": 3,
    "finetune_timeout": 7200,
    "backend_url": "http://127.0.0.1:9090",
}
# The fields that must be a whole number >= 1, by their variable.
AT_LEAST_ONE = (
    "COSOD_PROMOTE_MIN_HELDOUT",
    "COSOD_MAX_REFS",
    "COSOD_MAX_GROUP_IMAGES",
    "COSOD_MAX_IMAGE_BYTES",
    "COSOD_MAX_IMAGE_PIXELS",
    "COSOD_GROUP_CACHE_SIZE",
    "COSOD_JOB_TIMEOUT",
    "COSOD_JOB_RESULT_TTL",
    "COSOD_JOB_FAILURE_TTL",
    "COSOD_JOB_ATTEMPTS",
    "COSOD_WORKER_HEARTBEAT",
    "COSOD_WORKERS_PER_GPU",
    "COSOD_TRAIN_EVERY",
    "COSOD_FINETUNE_STEPS",
    "COSOD_FINETUNE_MIN_CORRECTIONS",
    "COSOD_FINETUNE_TIMEOUT",
    "COSOD_CRF_WORKERS",
)


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.backbone == DEFAULT_BACKBONE == "vit_small_patch8_224.dino"
    assert s.max_refs == 24 and s.group_by == "auto" and s.device == "cpu"
    assert s.label_studio_url is None and not s.basic_auth
    assert s.crf_workers is None  # the pipeline's default: the CPUs, at most 8
    assert Settings.from_env({"COSOD_CRF_WORKERS": "3"}).crf_workers == 3


def test_full_env_and_aliases() -> None:
    s = Settings.from_env(
        {
            "LABEL_STUDIO_HOST": "http://ls.example:8080/",
            "LABEL_STUDIO_ACCESS_TOKEN": "tok",
            "MODEL_DIR": "/m",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "p",
            "LOG_LEVEL": "debug",
            "REDIS_URL": "redis://127.0.0.1:6379/3",
            "COSOD_BACKBONE": "tiny",
            "COSOD_WEIGHTS_DIR": "/w",
            "COSOD_CACHE_DIR": "/c",
            "COSOD_GROUP_BY": "field:album",
            "COSOD_MAX_REFS": "8",
            "COSOD_DEVICE": "cuda",
            "COSOD_MAX_IMAGE_BYTES": "1000",
            "COSOD_MAX_IMAGE_PIXELS": "2000",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/data/files",
        }
    )
    assert s.label_studio_url == "http://ls.example:8080" and s.label_studio_api_key == "tok"
    assert (s.model_dir, s.basic_auth_user, s.basic_auth_pass, s.log_level) == ("/m", "u", "p", "DEBUG")
    assert (
        s.redis_url.endswith("/3") and s.backbone == "tiny" and s.weights_dir == "/w" and s.cache_dir == "/c"
    )
    assert s.group_by == "field:album" and s.max_refs == 8 and s.device == "cuda"
    assert (s.max_image_bytes, s.max_image_pixels, s.local_files_root) == (1000, 2000, "/data/files")
    assert s.basic_auth


def test_job_io_settings() -> None:
    assert Settings.from_env({}).read_ahead and Settings.from_env({}).ls_media_root is None
    s = Settings.from_env({"COSOD_READ_AHEAD": "off", "COSOD_LS_MEDIA_ROOT": "/label-studio/data/media"})
    assert not s.read_ahead and s.ls_media_root == "/label-studio/data/media"
    assert Settings.from_env({"COSOD_READ_AHEAD": "TRUE"}).read_ahead


def test_primary_names_win_over_aliases() -> None:
    s = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://a",
            "LABEL_STUDIO_HOST": "http://b",
            "LABEL_STUDIO_API_KEY": "k1",
            "LABEL_STUDIO_ACCESS_TOKEN": "k2",
        }
    )
    assert (s.label_studio_url, s.label_studio_api_key) == ("http://a", "k1")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COSOD_MAX_REFS": "many"}, "COSOD_MAX_REFS must be an integer, got 'many'"),
        ({"COSOD_MAX_REFS": "2.5"}, "COSOD_MAX_REFS must be an integer, got '2.5'"),
        ({"COSOD_MAX_REFS": "0"}, "COSOD_MAX_REFS must be >= 1, got '0'"),
        ({"COSOD_TASK_LIST_TTL": "soon"}, "COSOD_TASK_LIST_TTL must be a number, got 'soon'"),
        (
            {"LABEL_STUDIO_URL": "localhost:8080"},
            "LABEL_STUDIO_URL must start with http:// or https://, got 'localhost:8080'",
        ),
        (
            {"COSOD_GROUP_BY": "folder"},
            "COSOD_GROUP_BY must be 'auto', 'project', 'field:<name>', 'filename:<regex with a capture "
            "group>' or 'similar[:<threshold in (0, 1)>]', got 'folder'",
        ),
        (
            {"LOG_LEVEL": "LOUD"},
            "LOG_LEVEL must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL', got 'LOUD'",
        ),
        ({"COSOD_MODEL": "sam"}, "COSOD_MODEL must be one of 'scosparc', 'ums', got 'sam'"),
        (
            {"COSOD_PROMOTE_METRIC": "f1"},
            "COSOD_PROMOTE_METRIC must be one of 'iou', 'max_f', 'mean_f', 'max_e', "
            "'mean_e', 's_measure', 'mae', 'hce', got 'f1'",
        ),
        ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"),
        ({"BASIC_AUTH_PASS": "p"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"),
        (
            {"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/"},
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT must not be '/', got '/'",
        ),
        (
            {"LOCAL_FILES_DOCUMENT_ROOT": "/"},
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT must not be '/', got '/'",
        ),
        ({"COSOD_LS_MEDIA_ROOT": "/"}, "COSOD_LS_MEDIA_ROOT must not be '/', got '/'"),
        ({"COSOD_READ_AHEAD": "maybe"}, "COSOD_READ_AHEAD must be 1 or 0 (true or false), got 'maybe'"),
        ({"COSOD_CRF_WORKERS": "all"}, "COSOD_CRF_WORKERS must be an integer, got 'all'"),
        ({"COSOD_HELDOUT_FRACTION": "0"}, "COSOD_HELDOUT_FRACTION must be > 0.0, got '0'"),
        ({"COSOD_HELDOUT_FRACTION": "1"}, "COSOD_HELDOUT_FRACTION must be < 1.0, got '1'"),
        ({"COSOD_FINETUNE_LR": "0"}, "COSOD_FINETUNE_LR must be > 0.0, got '0'"),
        ({"COSOD_PROMOTE_MARGIN": "-0.1"}, "COSOD_PROMOTE_MARGIN must be >= 0.0, got '-0.1'"),
        ({"COSOD_JOB_RETRIES": "-1"}, "COSOD_JOB_RETRIES must be >= 0, got '-1'"),
        ({"COSOD_JOB_BACKOFF": "-2"}, "COSOD_JOB_BACKOFF must be >= 0.0, got '-2'"),
        ({"COSOD_QUEUE": "my queue"}, "COSOD_QUEUE must be letters, digits, '-', '_' or '.', got 'my queue'"),
        ({"COSOD_GPU_POOL": "a/b"}, "COSOD_GPU_POOL must be letters, digits, '-', '_' or '.', got 'a/b'"),
        (
            {"REDIS_URL": "127.0.0.1:6379"},
            "REDIS_URL must start with redis://, rediss:// or unix://, got '127.0.0.1:6379'",
        ),
        (
            {"COSOD_WORKER_GPU": "first", "COSOD_DEVICE": "cuda"},
            "COSOD_WORKER_GPU must be 'auto' or unset, got 'first'",
        ),
        ({"COSOD_WORKER_GPU": "auto"}, "COSOD_WORKER_GPU=auto needs COSOD_DEVICE=cuda, got 'cpu'"),
    ],
)
def test_bad_values_are_quoted(env: dict[str, str], message: str) -> None:
    """The whole message is one line naming the variable (its primary name) and quoting the bad value."""
    with pytest.raises(ValueError) as exc:
        Settings.from_env(env)
    assert str(exc.value) == message


@pytest.mark.parametrize("name", AT_LEAST_ONE)
def test_counts_must_be_at_least_one(name: str) -> None:
    with pytest.raises(ValueError) as exc:
        Settings.from_env({name: "0"})
    assert str(exc.value) == f"{name} must be >= 1, got '0'"
    (field,) = (f for f, names in Settings.env_names().items() if name in names)
    assert getattr(Settings.from_env({name: "1"}), field) == 1


def test_every_problem_gets_one_line_and_no_pydantic_noise() -> None:
    with pytest.raises(ValueError) as exc:
        Settings.from_env({"COSOD_MAX_REFS": "many", "COSOD_DEVICE": "cpu", "COSOD_JOB_TIMEOUT": "-5"})
    assert str(exc.value).splitlines() == [
        "COSOD_MAX_REFS must be an integer, got 'many'",
        "COSOD_JOB_TIMEOUT must be >= 1, got '-5'",
    ]
    assert "pydantic" not in str(exc.value) and "validation error" not in str(exc.value)


def test_defaults_are_todays() -> None:
    assert set(Settings.model_fields) == set(TODAYS_DEFAULTS), "a new field needs its default written here"
    for built in (Settings.from_env({}), Settings()):
        got = built.model_dump()
        assert got == TODAYS_DEFAULTS
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in TODAYS_DEFAULTS.items()}


def test_from_env_reads_only_its_mapping(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COSOD_MAX_REFS", "7")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("COSOD_MAX_GROUP_IMAGES=5\nCOSOD_DEVICE=cuda\n")
    assert Settings.from_env({}).max_refs == 24 and Settings().max_refs == 24  # keywords read nothing
    s = Settings.from_env()  # os.environ, and still no .env file
    assert (s.max_refs, s.max_group_images, s.device) == (7, 64, "cpu")
    assert Settings.from_env({"cosod_max_refs": "3"}).max_refs == 24  # names are case-sensitive


def test_empty_and_blank_values_are_unset() -> None:
    s = Settings.from_env(
        {
            "COSOD_MAX_REFS": "",
            "MODEL_DIR": "   ",
            "COSOD_CRF_WORKERS": "",
            "COSOD_READ_AHEAD": "",
            "LOG_LEVEL": "",
            "COSOD_WORKER_GPU": " ",
            "LABEL_STUDIO_URL": "",
            "LABEL_STUDIO_HOST": "http://b",
            "LABEL_STUDIO_API_KEY": " \t",
            "LABEL_STUDIO_ACCESS_TOKEN": "k2",
        }
    )
    assert (s.max_refs, s.model_dir, s.crf_workers, s.read_ahead) == (24, "model_dir", None, True)
    assert (s.log_level, s.worker_gpu) == ("INFO", None)
    assert (s.label_studio_url, s.label_studio_api_key) == ("http://b", "k2")  # an empty primary: the alias


def test_values_are_stripped() -> None:
    s = Settings.from_env(
        {
            "COSOD_MAX_REFS": " 8\n",
            "MODEL_DIR": "  /m ",
            "COSOD_FINETUNE_LR": " 0.01 ",
            "COSOD_READ_AHEAD": " no ",
            "LOG_LEVEL": " warning ",
            "COSOD_GROUP_BY": " field: album ",
            "LABEL_STUDIO_URL": " https://ls.example/ ",
        }
    )
    assert (s.max_refs, s.model_dir, s.finetune_lr, s.read_ahead) == (8, "/m", 0.01, False)
    assert (s.log_level, s.group_by, s.label_studio_url) == ("WARNING", "field:album", "https://ls.example")


def test_every_alias() -> None:
    s = Settings.from_env(
        {
            "LABEL_STUDIO_HOST": "http://h",
            "LABEL_STUDIO_ACCESS_TOKEN": "pat",
            "LOCAL_FILES_DOCUMENT_ROOT": "/data/files",
        }
    )
    assert (s.label_studio_url, s.label_studio_api_key, s.local_files_root) == (
        "http://h",
        "pat",
        "/data/files",
    )
    both = Settings.from_env(
        {"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/primary", "LOCAL_FILES_DOCUMENT_ROOT": "/alias"}
    )
    assert both.local_files_root == "/primary"


@pytest.mark.parametrize(
    ("raw", "value"),
    [(w, True) for w in ("1", "true", "TRUE", "yes", "On")]
    + [(w, False) for w in ("0", "false", "No", "off")],
)
def test_read_ahead_words(raw: str, value: bool) -> None:
    assert Settings.from_env({"COSOD_READ_AHEAD": raw}).read_ahead is value


def test_normalised_values() -> None:
    s = Settings.from_env(
        {
            "COSOD_WORKER_GPU": "Auto",
            "COSOD_DEVICE": "cuda:1",
            "LOG_LEVEL": "error",
            "COSOD_GROUP_BY": "PROJECT",
        }
    )
    assert (s.worker_gpu, s.log_level, s.group_by) == ("auto", "ERROR", "project")
    assert Settings(label_studio_url="http://ls//").label_studio_url == "http://ls"
    assert Settings(worker_gpu="").worker_gpu is None


def test_settings_are_frozen_and_hashable() -> None:
    s = Settings()
    with pytest.raises(ValueError, match="frozen"):
        s.max_refs = 3
    assert s.max_refs == 24 and hash(s) == hash(Settings()) and s == Settings()


def test_keyword_construction_by_field_name_is_validated() -> None:
    s = Settings(model_dir="/m", max_refs=5, read_ahead=False, crf_workers=2)
    assert (s.model_dir, s.max_refs, s.read_ahead, s.crf_workers) == ("/m", 5, False, 2)
    with pytest.raises(ValueError) as exc:
        Settings(max_refs=0)
    assert str(exc.value) == "COSOD_MAX_REFS must be >= 1, got 0"
    with pytest.raises(ValueError) as exc:
        Settings(max_refz=3)
    assert str(exc.value) == "'max_refz' is not a setting"
    with pytest.raises(ValueError) as exc:
        Settings(http_timeout="long")
    assert str(exc.value) == "http_timeout must be a number, got 'long'"  # no variable: the field's name


def test_with_returns_a_validated_copy() -> None:
    s = Settings(model_dir="/m")
    t = s.with_(max_refs=3, model_name="ums")
    assert (t.max_refs, t.model_name, t.model_dir) == (3, "ums", "/m")
    assert (s.max_refs, s.model_name) == (24, "scosparc")  # the original is unchanged
    assert s.with_(label_studio_url="http://x/").label_studio_url == "http://x"
    with pytest.raises(ValueError) as exc:
        s.with_(max_refs=0)
    assert str(exc.value) == "COSOD_MAX_REFS must be >= 1, got 0"
    with pytest.raises(ValueError, match="COSOD_MODEL must be one of 'scosparc', 'ums', got 'sam'"):
        s.with_(model_name="sam")
    with pytest.raises(ValueError, match="COSOD_WORKER_GPU=auto needs COSOD_DEVICE=cuda"):
        s.with_(worker_gpu="auto")
    with pytest.raises(ValueError, match="'bogus' is not a setting"):
        s.with_(bogus=1)


def test_secrets_stay_out_of_the_repr() -> None:
    s = Settings(label_studio_api_key="tok-123", basic_auth_user="u", basic_auth_pass="hunter2")
    assert "tok-123" not in repr(s) and "hunter2" not in repr(s)


def test_every_env_variable_is_documented() -> None:
    """The module docstring is the reference: each field's variables (primary, then aliases, in that order)
    are in it, and it names no variable that no field reads."""
    doc = settings_module.__doc__ or ""
    names = Settings.env_names()
    assert {f for f, n in names.items() if not n} == {"http_timeout"}, "a field without an env variable"
    documented = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", doc))
    read = {n for ns in names.values() for n in ns}
    assert read - documented == set(), "variables missing from the docstring"
    assert documented - read == {"CUDA_VISIBLE_DEVICES", "MEDIA_ROOT"}, "documented but read by no field"
    for field, ns in names.items():
        if len(ns) > 1:
            assert ", ".join(ns) in doc, f"{field}: the docstring lists its names in another order"


def test_group_by_forms() -> None:
    assert parse_group_by("") == "auto" and parse_group_by("PROJECT") == "project"
    assert parse_group_by("field: album ") == "field:album"
    with pytest.raises(ValueError):
        parse_group_by("field:")


def test_the_commands_report_a_bad_setting_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """cosod-backend and cosod-worker exit 2 with the message on one line, before any network or Redis."""
    from backend.api import cli
    from backend.api.app import create_app
    from backend.jobs import worker

    monkeypatch.setenv("COSOD_MAX_REFS", "many")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never reached
    assert cli.main(["--backend", "http://127.0.0.1:9", "jobs"]) == 2
    assert capsys.readouterr().err == "cosod-backend: COSOD_MAX_REFS must be an integer, got 'many'\n"
    assert worker.main([]) == 2
    assert capsys.readouterr().err == "cosod-worker: COSOD_MAX_REFS must be an integer, got 'many'\n"
    with pytest.raises(ValueError, match="^COSOD_MAX_REFS must be an integer, got 'many'$"):
        create_app()  # gunicorn fails to boot with it


def test_the_settings_choices_are_the_librarys() -> None:
    """Settings name the models and promotion metrics without importing torch; they must be cosod's."""
    from backend.settings import MODELS, PROMOTE_METRICS
    from cosod.finetune import HIGHER_IS_BETTER
    from cosod.methods import METHODS

    assert set(MODELS) == set(METHODS)
    assert set(PROMOTE_METRICS) == set(HIGHER_IS_BETTER)
