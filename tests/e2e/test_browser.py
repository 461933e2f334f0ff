"""A real browser on Label Studio's own labeling page: the backend's predicted mask is drawn where the
prediction says.

Debian's chromium and chromedriver (``make browser`` installs them with apt), driven by Selenium with both
paths given, so Selenium never looks for or downloads a browser or driver of its own. Without them the test
skips naming ``make browser``; with ``COSOD_TEST_BROWSER=required`` (CI) it fails instead.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from tests.browser import login

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1400, 1000)
SIZE = (160, 120)  # (width, height) of the task images
SIDE = 44  # the common object: a blue square of this side, at a different place in each image
CORNERS = [(14, 12), (92, 58), (60, 20), (24, 64)]  # its top-left (x, y) per image; image 0 is the one opened
MASK_RGB = (0xFF, 0x00, 0x66)  # the label's background in brush_grouped.xml


def browser_missing(reason: str) -> None:
    if os.environ.get("COSOD_TEST_BROWSER") == "required":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> None:
    """Skips (CI: fails) before any server starts when the browser, its driver or Selenium is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        browser_missing(
            f"{' and '.join(missing)} missing: run `make browser` (as root it installs Debian's chromium "
            "and chromium-driver with apt)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser_missing("selenium is not installed: run `make install` (it is in the dev extra)")


@pytest.fixture
def chrome(browser: None, tmp_path: Path) -> Any:
    """Headless chromium at 1400x1000 CSS pixels, one device pixel each."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root, in a container
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def square_png(k: int) -> bytes:
    """A flat grey background (a little noise) with a blue square at ``CORNERS[k]``."""
    rng = np.random.default_rng(31 + k)
    w, h = SIZE
    img = (118 + rng.integers(0, 12, (h, w, 1))).repeat(3, axis=2).astype(np.uint8)
    x, y = CORNERS[k]
    img[y : y + SIDE, x : x + SIDE] = (20, 40, 200)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def screen_rect(driver: Any) -> dict[str, Any] | None:
    """Where the labeling page draws the task image, once it is loaded and the prediction's region is listed:
    the image element's on-screen box (CSS pixels; Label Studio may zoom it past the stage) and the stage's
    box that clips it (Konva's container, over which the brush layers are drawn)."""
    return driver.execute_script(
        """
        const img = document.querySelector('.lsf-image img[alt="image"]');
        const stage = document.querySelector('.konvajs-content');
        const regions = document.querySelectorAll('.lsf-outliner-item').length;
        if (!img || !stage || !img.complete || !img.naturalWidth || regions < 1) return null;
        const box = (e) => { const r = e.getBoundingClientRect();
                             return {x: r.left, y: r.top, w: r.width, h: r.height}; };
        return {img: box(img), stage: box(stage), natural: [img.naturalWidth, img.naturalHeight], regions,
                dpr: window.devicePixelRatio};
        """
    )


def settled_screenshot(driver: Any, crop: tuple[int, int, int, int], timeout: float = 30) -> np.ndarray:
    """The viewport's screenshot (RGB) once its ``crop`` (x0, y0, x1, y1) is alike in two shots in a row."""
    x0, y0, x1, y1 = crop
    last = None
    deadline = time.monotonic() + timeout
    while True:
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
        if last is not None and np.array_equal(shot[y0:y1, x0:x1], last[y0:y1, x0:x1]):
            return shot
        assert time.monotonic() < deadline, f"the labeling page kept changing for {timeout:.0f} s"
        last = shot
        time.sleep(0.5)


def visible_box(geo: dict[str, Any]) -> tuple[int, int, int, int]:
    """The screen pixels (x0, y0, x1, y1) where the image shows: its box clipped by the stage's."""
    img, stage = geo["img"], geo["stage"]
    x0, y0 = int(np.ceil(max(img["x"], stage["x"]))), int(np.ceil(max(img["y"], stage["y"])))
    x1 = int(np.floor(min(img["x"] + img["w"], stage["x"] + stage["w"])))
    y1 = int(np.floor(min(img["y"] + img["h"], stage["y"] + stage["h"])))
    return x0, y0, x1, y1


def uncovered(driver: Any, box: tuple[int, int, int, int], step: int = 8) -> np.ndarray:
    """Which pixels of ``box`` show the stage itself: not under a control laid over the image (the zoom slider
    is). The controls are the page's topmost elements, other than Konva's canvases, at points ``step`` apart;
    their whole boxes are left out."""
    boxes = driver.execute_script(
        """
        const [x0, y0, x1, y1, step] = arguments[0];
        const stage = document.querySelector('.konvajs-content');
        const over = new Set();
        for (let y = y0; y < y1; y += step)
          for (let x = x0; x < x1; x += step) {
            const e = document.elementFromPoint(x + 0.5, y + 0.5);
            if (e && !stage.contains(e)) over.add(e);
          }
        return Array.from(over, (e) => { const r = e.getBoundingClientRect();
                                         return [r.left, r.top, r.right, r.bottom]; });
        """,
        [*box, step],
    )
    x0, y0, x1, y1 = box
    visible = np.ones((y1 - y0, x1 - x0), dtype=bool)
    for left, top, right, bottom in boxes:
        c0, r0 = max(int(left) - 1 - x0, 0), max(int(top) - 1 - y0, 0)
        visible[r0 : max(int(np.ceil(bottom)) + 1 - y0, 0), c0 : max(int(np.ceil(right)) + 1 - x0, 0)] = False
    return visible


def mask_alpha(
    shot: np.ndarray, image: np.ndarray, geo: dict[str, Any], box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """For each screen pixel of ``box``: how far its colour is moved from the image's own pixel toward
    ``MASK_RGB`` (0: untouched, 1: pure mask colour; least squares over R, G, B), and which image pixel
    (row, col) it shows."""
    img = geo["img"]
    x0, y0, x1, y1 = box
    h, w = image.shape[:2]
    ys, xs = np.mgrid[y0:y1, x0:x1]
    rows = np.clip(((ys + 0.5 - img["y"]) * h / img["h"]).astype(int), 0, h - 1)
    cols = np.clip(((xs + 0.5 - img["x"]) * w / img["w"]).astype(int), 0, w - 1)
    seen = shot[y0:y1, x0:x1].astype(float)
    own = image[rows, cols].astype(float)
    toward = np.asarray(MASK_RGB, float) - own
    alpha = ((seen - own) * toward).sum(-1) / np.maximum((toward**2).sum(-1), 1.0)
    return alpha, np.stack([rows, cols])


def drawn_fractions(
    alpha: np.ndarray, where: np.ndarray, visible: np.ndarray, mask: np.ndarray
) -> tuple[float, float]:
    """The fraction of mask-coloured screen pixels (alpha > 0.3) among the visible ones over the mask and
    among those over the rest, each shrunk by one image pixel so that resampled edges count for neither."""
    from scipy.ndimage import binary_erosion

    inside, outside = binary_erosion(mask), binary_erosion(~mask)
    coloured = alpha > 0.3
    on_in = inside[where[0], where[1]] & visible
    on_out = outside[where[0], where[1]] & visible
    assert on_in.sum() > 2000 and on_out.sum() > 2000, (on_in.sum(), on_out.sum())
    return float(coloured[on_in].mean()), float(coloured[on_out].mean())


def squares_project(e2e: Any, ls: Any, config: str, title: str) -> tuple[int, list[dict[str, Any]], int]:
    """A project with ``label_config/<config>`` and the square images uploaded, in one group; returns its id,
    its tasks and the id of the task showing ``square_0.png`` (the one the browser opens)."""
    xml = (REPO / "label_config" / config).read_text()
    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": title, "label_config": xml})["id"]
    files = {f"f{k}": (f"square_{k}.png", square_png(k), "image/png") for k in range(len(CORNERS))}
    assert e2e.ls_api(ls, "POST", f"/api/projects/{project}/import", files=files)["task_count"] == len(files)
    tasks = e2e.ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    for t in tasks:
        e2e.ls_api(ls, "PATCH", f"/api/tasks/{t['id']}", json={"data": {**t["data"], "group": "squares"}})
    (opened,) = [t["id"] for t in tasks if t["data"]["image"].endswith("-square_0.png")]
    return project, tasks, opened


def test_the_predicted_mask_is_drawn_where_the_prediction_says(
    browser: None, label_studio: Any, backend: Any, chrome: Any, e2e: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    ls = label_studio
    project, tasks, opened = squares_project(e2e, ls, "brush_grouped.xml", "browser")

    e2e.connect_backend(ls, project, backend.url)
    e2e.retrieve_predictions(ls, project)
    (prediction,) = e2e.predictions_by_task(ls, project)[opened]
    (region,) = prediction["result"]
    w, h = region["original_width"], region["original_height"]
    assert (w, h) == SIZE
    mask = np.asarray(decode_rle(region["value"]["rle"])).reshape(h, w, 4)[:, :, 3] > 0
    mirrored = mask[:, ::-1]
    assert 0.02 < mask.mean() < 0.98 and (mask != mirrored).mean() > 0.05, "a mask a mirror cannot tell apart"

    # Label Studio's own login form, then the task's labeling page in the Data Manager
    login(chrome, ls.url, e2e.USER, e2e.PASSWORD)
    chrome.get(f"{ls.url}/projects/{project}/data?task={opened}")
    for _ in range(3):  # a screenshot between two identical layouts
        geo = WebDriverWait(chrome, 60, poll_frequency=0.3).until(
            screen_rect, "the labeling page never showed the task image with the prediction's region"
        )
        stage = geo["stage"]
        crop = (int(stage["x"]), int(stage["y"]), int(stage["x"] + stage["w"]), int(stage["y"] + stage["h"]))
        shot = settled_screenshot(chrome, crop)
        if screen_rect(chrome) == geo:
            break
    else:
        raise AssertionError("the labeling page's layout kept changing")
    assert geo["natural"] == list(SIZE) and geo["regions"] == 1 and geo["dpr"] == 1, geo
    path = tmp_path / "labeling-page.png"
    Image.fromarray(shot).save(path)
    print(f"\nscreenshot of the labeling page: {path}")

    box = visible_box(geo)
    visible = uncovered(chrome, box)
    image = np.asarray(Image.open(io.BytesIO(square_png(0))).convert("RGB"))
    alpha, where = mask_alpha(shot, image, geo, box)
    inside, outside = drawn_fractions(alpha, where, visible, mask)
    m_inside, m_outside = drawn_fractions(alpha, where, visible, mirrored)
    print(
        f"mask-coloured pixels: {inside:.3f} inside the predicted mask, {outside:.3f} outside "
        f"(against the mirrored mask: {m_inside:.3f} / {m_outside:.3f}); image shown at "
        f"{geo['img']['w']:.0f}x{geo['img']['h']:.0f} px; median alpha inside "
        f"{np.median(alpha[mask[where[0], where[1]]]):.2f}; {1 - visible.mean():.1%} of it under controls; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    assert inside > 0.9, f"the mask colour covers only {inside:.1%} of the predicted region; see {path}"
    assert outside < 0.03, f"the mask colour covers {outside:.1%} outside the predicted region; see {path}"
    # the measure tells places apart: the same screen against the mirrored mask fails it
    assert m_inside < 0.9 or m_outside > 0.03, (m_inside, m_outside)
