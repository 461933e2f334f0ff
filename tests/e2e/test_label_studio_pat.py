"""End to end with legacy tokens switched off: the backend uses a personal access token and basic auth, and
gives the project's webhook its credentials itself (backend/labelstudio/webhooks.py).

Also covers tasks without a ``group`` field: the whole project is then one group.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from backend.labelstudio.regions import rle_to_mask
from backend.learning.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((60, 80, 3)) * 80 + 90).astype(np.uint8)
    y, x = int(rng.integers(5, 30)), int(rng.integers(5, 40))
    img[y : y + 24, x : x + 30] = (30, 200, 60)  # the common object: a green box
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def call(ls_url: str, headers: dict[str, str], method: str, path: str, **kw: Any) -> Any:
    resp = requests.request(method, f"{ls_url}{path}", headers=headers, timeout=120, **kw)
    assert resp.status_code < 400, f"{method} {path} -> {resp.status_code}: {resp.text[:500]}"
    return resp.json() if resp.content else None


def metric(url: str, name: str, auth: tuple[str, str]) -> float:
    text = requests.get(f"{url}/metrics", auth=auth, timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_personal_access_token_with_legacy_tokens_off(
    label_studio: Any, start_backend: Any, tmp_path: Path
) -> None:
    ls = label_studio.url
    legacy = {"Authorization": f"Token {label_studio.token}"}
    pat = call(ls, legacy, "POST", "/api/token/")["token"]
    access = call(ls, {}, "POST", "/api/token/refresh/", json={"refresh": pat})["access"]
    bearer = {"Authorization": f"Bearer {access}"}
    call(
        ls,
        legacy,
        "POST",
        "/api/jwt/settings",
        json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False},
    )
    try:
        assert requests.get(f"{ls}/api/projects", headers=legacy, timeout=30).status_code == 401
        config = (REPO / "label_config" / "brush.xml").read_text()
        project = call(ls, bearer, "POST", "/api/projects", json={"title": "pat", "label_config": config})[
            "id"
        ]
        files = {f"f{i}": (f"img{i}.png", png(i), "image/png") for i in range(3)}  # no group field
        assert call(ls, bearer, "POST", f"/api/projects/{project}/import", files=files)["task_count"] == 3

        auth = ("ml-user", "ml-secret-pass")
        env = {"BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1]}
        with start_backend(ls, pat, tmp_path / "backend", **env) as backend:
            assert requests.get(f"{backend.url}/health", timeout=5).status_code == 401
            ml = call(
                ls,
                bearer,
                "POST",
                "/api/ml",
                json={
                    "url": backend.url,
                    "project": project,
                    "title": "cosod-pat",
                    "auth_method": "BASIC_AUTH",
                    "basic_auth_user": auth[0],
                    "basic_auth_pass": auth[1],
                },
            )
            assert ml["state"] == "CO", ml
            call(
                ls,
                bearer,
                "POST",
                f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                json={"selectedItems": {"all": True, "excluded": []}},
            )
            preds = call(ls, bearer, "GET", f"/api/predictions?project={project}")
            assert len(preds) == 3 and {p["model_version"] for p in preds} == {ml["model_version"]}
            for p in preds:
                (region,) = p["result"]
                assert (region["original_width"], region["original_height"]) == (80, 60)
                assert rle_to_mask(region["value"]["rle"], 60, 80).any()
            # the images were read with the PAT (legacy is off) and the 3 ungrouped tasks formed one group
            assert metric(backend.url, "cosod_group_images_total", auth) == 3
            assert metric(backend.url, "cosod_group_cache_misses_total", auth) == 1

            # the webhook Label Studio made for the model now sends the backend's basic auth, so a
            # correction reaches /webhook and is stored (before: 401, dropped)
            hooks = call(ls, bearer, "GET", f"/api/webhooks?project={project}")
            (hook,) = [h for h in hooks if h["url"] == f"{backend.url}/webhook"]
            assert hook["headers"]["Authorization"].startswith("Basic "), hook
            task = preds[0]["task"]
            result = preds[0]["result"]
            call(ls, bearer, "POST", f"/api/tasks/{task}/annotations", json={"result": result})
            store = Store(tmp_path / "backend" / "model")
            deadline = time.monotonic() + 20
            while store.count_corrections(project) == 0:
                assert time.monotonic() < deadline, backend.log.read_text(errors="replace")[-2000:]
                time.sleep(0.2)
            assert "Traceback" not in backend.log.read_text(errors="replace")
    finally:
        call(
            ls,
            bearer,
            "POST",
            "/api/jwt/settings",
            json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True},
        )
