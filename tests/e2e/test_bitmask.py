"""BitmaskLabels end to end against a real Label Studio 1.23.2: Label Studio validates
label_config/bitmask.xml, "Retrieve predictions" stores PNG data URL regions that decode to the masks the
backend computed, and a person's BitmaskLabels annotation reaches /webhook and is stored as a correction of
exactly its mask."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.labelstudio.bitmask import data_url_to_mask, png_size
from backend.learning.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "label_config" / "bitmask.xml").read_text()
SIZES = [(96, 72), (80, 80), (112, 64), (64, 96)]  # (width, height): one per image, all different


def image(k: int) -> bytes:
    """A noisy background with the common object (a red square) at a seeded place."""
    rng = np.random.default_rng(4242 + k)
    w, h = SIZES[k]
    img = (rng.random((h, w, 3)) * 80 + 90).astype(np.uint8)
    r = min(w, h) // 4
    cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
    img[cy - r : cy + r, cx - r : cx + r] = (220, 20, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def editor_png(alpha: np.ndarray) -> str:
    """What Label Studio's editor saves for a person's strokes: canvas.toDataURL("image/png") of black
    RGBA pixels whose alpha is the stroke (anti-aliased at the edges)."""
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_bitmask_predictions_and_corrections_through_label_studio(
    label_studio: Any, start_backend: Any, tmp_path_factory: pytest.TempPathFactory, e2e: Any
) -> None:
    ls = label_studio
    # Label Studio's own config validation (Settings > Labeling Interface > Save) accepts the config,
    # and the same endpoint refuses a BitmaskLabels that points nowhere
    ok = requests.post(f"{ls.url}/api/projects/validate/", json={"label_config": CONFIG}, timeout=30)
    assert ok.status_code == 204, ok.text
    broken = CONFIG.replace('toName="image"', 'toName="nowhere"')
    bad = requests.post(f"{ls.url}/api/projects/validate/", json={"label_config": broken}, timeout=30)
    assert bad.status_code == 400 and "nowhere" in bad.text, bad.text

    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": "cosod bitmask", "label_config": CONFIG})
    project = project["id"]
    files = {f"f{k}": (f"obj_{k}.png", image(k), "image/png") for k in range(len(SIZES))}
    assert e2e.ls_api(ls, "POST", f"/api/projects/{project}/import", files=files)["task_count"] == 4
    tasks = e2e.ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    size = {t["id"]: SIZES[int(t["data"]["image"].rsplit("_", 1)[1][:-4])] for t in tasks}

    base = tmp_path_factory.mktemp("bitmask")
    with start_backend(ls.url, e2e.TOKEN, base) as backend:
        ml = e2e.connect_backend(ls, project, backend.url, is_interactive=True)
        version = ml["model_version"]
        e2e.retrieve_predictions(ls, project)
        stored = e2e.predictions_by_task(ls, project)
        assert sorted(stored) == sorted(size) and all(len(v) == 1 for v in stored.values())

        # the masks the backend computed: the same tasks asked directly (answered from its group cache)
        direct = requests.post(
            f"{backend.url}/predict",
            json={"tasks": tasks, "project": f"{project}.1795340308", "label_config": CONFIG},
            timeout=120,
        ).json()["results"]
        computed = {t["id"]: item for t, item in zip(tasks, direct, strict=True)}

        li = LabelInterface(CONFIG)
        for tid, (pred,) in stored.items():
            w, h = size[tid]
            assert pred["model_version"] == version and 0.0 <= pred["score"] <= 1.0
            (region,) = pred["result"]
            # what Label Studio keeps is a BitmaskLabels region its editor restores from value.imageDataURL
            assert region["type"] == "bitmasklabels"
            assert (region["from_name"], region["to_name"]) == ("tag", "image")
            assert (region["original_width"], region["original_height"], region["image_rotation"]) == (
                w,
                h,
                0,
            )
            assert sorted(region["value"]) == ["bitmasklabels", "imageDataURL"]
            assert region["value"]["bitmasklabels"] == ["Object"]
            url = region["value"]["imageDataURL"]
            assert url.startswith("data:image/png;base64,") and png_size(url) == (w, h)
            mask = data_url_to_mask(url, h, w)
            assert 0 < mask.sum() < w * h
            # ... exactly the backend's mask, score and version
            want = computed[tid]
            assert (want["model_version"], want["score"]) == (version, pred["score"])
            (want_region,) = want["result"]
            assert np.array_equal(mask, data_url_to_mask(want_region["value"]["imageDataURL"], h, w))
            assert region["score"] == want_region["score"]
            # and the SDK's check (Label Studio's PredictionSerializer, when prediction validation is on)
            assert li.validate_prediction(pred, return_errors=True) == []

        # a person paints a mask with the BitmaskLabels brush and submits: the webhook stores that mask
        tid = tasks[0]["id"]
        w, h = size[tid]
        alpha = np.zeros((h, w), np.uint8)
        alpha[10:30, 20:50] = 255
        alpha[9, 20:50] = 64  # anti-aliased edge: part of the region, as the editor reads it (alpha > 0)
        region = {
            "id": "painted",
            "type": "bitmasklabels",
            "from_name": "tag",
            "to_name": "image",
            "origin": "manual",
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "value": {"imageDataURL": editor_png(alpha), "bitmasklabels": ["Object"]},
        }
        parent = stored[tid][0]["id"]
        ann = e2e.ls_api(
            ls,
            "POST",
            f"/api/tasks/{tid}/annotations",
            json={"result": [region], "parent_prediction": parent},
        )
        assert e2e.ls_api(ls, "GET", f"/api/annotations/{ann['id']}")["result"][0]["value"] == region["value"]
        store = Store(base / "model")
        deadline = time.monotonic() + 30
        while store.count_corrections(project) < 1:
            assert time.monotonic() < deadline, "the annotation was not stored as a correction within 30 s"
            time.sleep(0.2)
        (c,) = store.corrections(project)
        assert (c.annotation_id, c.task_id, c.width, c.height) == (ann["id"], tid, w, h)
        assert c.mask is not None and np.array_equal(c.mask, alpha > 0) and c.mask.sum() == 21 * 30

        # with an annotation in the project, Label Studio still validates the config against it
        e2e.ls_api(ls, "POST", f"/api/projects/{project}/validate/", json={"label_config": CONFIG})
        log_text = Path(backend.log).read_text(errors="replace")
        assert "Traceback" not in log_text


def test_label_studio_editor_draws_a_bitmask_prediction_in_place(label_studio: Any, e2e: Any) -> None:
    """Label Studio's own page (headless Chromium) opens a task whose prediction is one of this backend's
    BitmaskLabels regions and draws the mask over exactly the image pixels it covers."""

    from backend.labelstudio.bitmask import bitmask_region

    webdriver = pytest.importorskip("selenium.webdriver")
    from browser import require_chromium

    browser, driver_bin = require_chromium()
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from skimage import measure

    ls = label_studio
    w, h = 240, 160
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    mask = np.zeros((h, w), bool)
    mask[40:100, 150:220] = True
    project = e2e.ls_api(
        ls, "POST", "/api/projects", json={"title": "cosod bitmask ui", "label_config": CONFIG}
    )
    e2e.ls_api(ls, "POST", f"/api/projects/{project['id']}/import", files={"f": ("grey.png", buf.getvalue())})
    (task,) = e2e.ls_api(ls, "GET", f"/api/tasks?project={project['id']}")["tasks"]
    region = bitmask_region(mask, from_name="tag", to_name="image", label="Object", score=0.9, rid="ui")
    e2e.ls_api(
        ls, "POST", "/api/predictions", json={"task": task["id"], "result": [region], "model_version": "m"}
    )

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        driver.get(f"{ls.url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys("admin@example.com")
        driver.find_element(By.NAME, "password").send_keys("adminpass123")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        deadline = time.monotonic() + 30
        while "/user/login" in driver.current_url:
            assert time.monotonic() < deadline, "the login did not go through"
            time.sleep(0.3)
        driver.get(f"{ls.url}/projects/{project['id']}/data?task={task['id']}")
        # the editor shows the image (a blob: <img>, whose box is the image's place and zoom on the page)
        # and draws the prediction on its stage canvas; wait for the region's colour to appear
        seen = None
        while True:
            boxes = driver.execute_script(
                """
                const img = [...document.querySelectorAll('img')].filter((e) => e.src.startsWith('blob:'));
                return img.map((e) => {
                  const r = e.getBoundingClientRect();
                  return [r.x, r.y, r.width, r.height, window.devicePixelRatio];
                });
                """
            )
            shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(
                int
            )
            # #ff0066 at the region's opacity 0.6 over grey 200: about (233, 80, 141); the largest patch of it
            # is the region (the label's chip under the image is another)
            parts = measure.label((shot[..., 0] > 200) & (shot[..., 1] < 120) & (shot[..., 2] > 100))
            sizes = np.bincount(parts.ravel())[1:]
            if len(boxes) == 1 and sizes.size and sizes.max() > 1000:
                ys, xs = np.nonzero(parts == 1 + int(sizes.argmax()))
                now = (boxes, xs.min(), xs.max(), ys.min(), ys.max())
                if now == seen:  # the same twice in a row: the page has settled
                    break
                seen = now
            assert time.monotonic() < deadline + 60, f"the editor drew no bitmask region: {boxes}"
            time.sleep(1.0)
    finally:
        driver.quit()
    ix, iy, iw, ih, dpr = boxes[0]
    assert dpr == 1, "the screenshot's pixels are not CSS pixels"
    sx, sy = iw / w, ih / h
    # the drawn box, in image pixels: the mask's columns 150..220 and rows 40..100, to half a pixel
    drawn = ((xs.min() - ix) / sx, (xs.max() + 1 - ix) / sx, (ys.min() - iy) / sy, (ys.max() + 1 - iy) / sy)
    print(f"drawn at columns {drawn[0]:.2f}..{drawn[1]:.2f}, rows {drawn[2]:.2f}..{drawn[3]:.2f}")
    assert np.allclose(drawn, (150, 220, 40, 100), atol=0.5), (drawn, boxes)
    assert abs(len(xs) - 70 * sx * 60 * sy) < 0.03 * 70 * sx * 60 * sy  # a filled box
