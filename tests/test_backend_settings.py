"""backend.settings: env parsing, aliases, defaults and messages for bad values."""

from __future__ import annotations

import pytest

from backend.settings import DEFAULT_BACKBONE, Settings, parse_group_by


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
        ({"COSOD_MAX_REFS": "0"}, "max_refs must be >= 1"),
        ({"LABEL_STUDIO_URL": "localhost:8080"}, "must start with http"),
        ({"COSOD_GROUP_BY": "folder"}, "got 'folder'"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"BASIC_AUTH_USER": "u"}, "together"),
        ({"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/"}, "must not be '/'"),
        ({"COSOD_LS_MEDIA_ROOT": "/"}, "COSOD_LS_MEDIA_ROOT must not be '/'"),
        ({"COSOD_READ_AHEAD": "maybe"}, "COSOD_READ_AHEAD must be 1 or 0 .* got 'maybe'"),
        ({"COSOD_CRF_WORKERS": "0"}, "COSOD_CRF_WORKERS must be >= 1, got 0"),
    ],
)
def test_bad_values_are_quoted(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_group_by_forms() -> None:
    assert parse_group_by("") == "auto" and parse_group_by("PROJECT") == "project"
    assert parse_group_by("field: album ") == "field:album"
    with pytest.raises(ValueError):
        parse_group_by("field:")
