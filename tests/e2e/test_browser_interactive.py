# ruff: noqa: F811  (the browser fixtures imported from test_browser are redefined as parameters)
"""A real browser on Label Studio 1.23.2's labeling page: a smart keypoint placed with the mouse makes the
editor call the backend (``POST /api/ml/<id>/interactive-annotating`` -> ``/predict`` with
``params.context``), the returned mask becomes the annotation's suggestion, and the group's other tasks are
re-predicted from it.

The project uses label_config/brush_interactive.xml (``smart="true" smartOnly="true"`` KeyPointLabels) and
the backend is connected with ``is_interactive``: what Label Studio's Data Manager needs to subscribe to the
editor's ``regionFinishedDrawing`` event (``web/apps/labelstudio/src/pages/DataManager/DataManager.jsx``).
The keypoint tool is chosen by clicking the keypoint control's label, then the image is clicked on the blue
square. Skips like tests/e2e/test_browser.py without chromium (``make browser``)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.browser import login
from tests.e2e.test_browser import CORNERS, SIDE, SIZE, browser, chrome, squares_project  # noqa: F401
from tests.e2e.test_propagation import finished

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOADED = """
const img = document.querySelector('.lsf-image img[alt="image"]');
const stage = document.querySelector('.konvajs-content');
if (!img || !stage || !img.complete || !img.naturalWidth) return null;
const r = img.getBoundingClientRect(), s = stage.getBoundingClientRect();
return {img: {x: r.left, y: r.top, w: r.width, h: r.height},
        stage: {x: s.left, y: s.top, w: s.width, h: s.height}};
"""
SELECTED = """
const store = window.dataManager && window.dataManager.lsf && window.dataManager.lsf.lsf;
const image = store && store.annotationStore.names.get('image');
const tool = image && image.getToolsManager().findSelectedTool();
return tool ? tool.fullName : null;
"""
STATE = """
const lsf = window.dataManager && window.dataManager.lsf;
const ann = lsf && lsf.currentAnnotation;
if (!ann) return null;
return {suggestions: ann.suggestions ? ann.suggestions.size : -1,
        regions: ann.regions.map((r) => [r.type, r.dynamic === true]),
        result: Array.from(ann.suggestions ? ann.suggestions.values() : []).map((s) => s.type)};
"""


def test_a_smart_keypoint_placed_in_the_editor_calls_the_backend(
    browser: None, label_studio: Any, start_backend: Any, chrome: Any, e2e: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ls = label_studio
    project, tasks, opened = squares_project(e2e, ls, "brush_interactive.xml", "smart")
    others = sorted(t["id"] for t in tasks if t["id"] != opened)
    with start_backend(ls.url, e2e.TOKEN, tmp_path / "backend") as backend:
        ml = e2e.connect_backend(ls, project, backend.url, is_interactive=True)
        assert ml["state"] == "CO" and ml["is_interactive"], ml
        e2e.retrieve_predictions(ls, project)
        first = e2e.predictions_by_task(ls, project)

        login(chrome, ls.url, e2e.USER, e2e.PASSWORD)
        chrome.get(f"{ls.url}/projects/{project}/data?task={opened}")
        geo = WebDriverWait(chrome, 60, poll_frequency=0.3).until(
            lambda d: d.execute_script(LOADED), "the labeling page never showed the task image"
        )
        time.sleep(1.0)
        geo = chrome.execute_script(LOADED)
        # the editor's "Auto-Annotation" toggle shows the smart tools (Toolbar.jsx renders them only then)
        toggle = chrome.find_element(By.XPATH, "//*[normalize-space(text())='Auto-Annotation']")
        toggle.click()
        on = "return window.localStorage.autoAnnotation === 'true'"
        WebDriverWait(chrome, 10).until(lambda d: d.execute_script(on))
        time.sleep(0.5)
        # a keypoint needs its control's label selected (tools/KeyPoint.js): the second <Labels> block's
        blocks = chrome.find_elements(By.CSS_SELECTOR, ".lsf-labels")
        assert len(blocks) >= 2, f"{len(blocks)} label blocks"
        blocks[1].find_element(By.CSS_SELECTOR, ".lsf-label").click()
        time.sleep(0.3)
        # one "Auto-Detect" button holds the smart tools; each click selects the next (Toolbar.jsx SmartTools)
        for _ in range(4):
            if chrome.execute_script(SELECTED) == "KeyPointTool-dynamic":
                break
            chrome.find_element(By.CSS_SELECTOR, ".lsf-tool_smart").click()
            time.sleep(0.3)
        assert chrome.execute_script(SELECTED) == "KeyPointTool-dynamic", chrome.execute_script(SELECTED)
        x, y = CORNERS[0]
        img = geo["img"]
        px = img["x"] + (x + SIDE / 2) * img["w"] / SIZE[0]
        py = img["y"] + (y + SIDE / 2) * img["h"] / SIZE[1]
        stage = chrome.find_element(By.CSS_SELECTOR, ".konvajs-content")
        s = geo["stage"]
        dx, dy = px - (s["x"] + s["w"] / 2), py - (s["y"] + s["h"] / 2)
        t0 = time.monotonic()
        ActionChains(chrome).move_to_element_with_offset(stage, int(dx), int(dy)).click().perform()

        def suggested(d: Any) -> Any:
            state = d.execute_script(STATE)
            return state if state and state["suggestions"] > 0 else None

        try:
            state = WebDriverWait(chrome, 60, poll_frequency=0.2).until(suggested)
        finally:
            path = tmp_path / "smart-keypoint.png"
            Image.open(io.BytesIO(chrome.get_screenshot_as_png())).save(path)
            print(f"\nscreenshot: {path}; editor state {chrome.execute_script(STATE)}")
        seconds = time.monotonic() - t0
        print(f"the suggestion appeared {seconds:.2f} s after the click: {state}")
        assert ["keypointregion", True] in state["regions"] and state["result"] == ["brushregion"]
        log = backend.log.read_text(errors="replace")
        assert f"task {opened}: interactive" in log, log[-2000:]

        # the queued propagation re-predicts the group's other tasks
        from backend.grouping import GroupKey
        from backend.jobs.propagation import propagation_job_id

        job = finished(backend.url, propagation_job_id(project, GroupKey("field:group", "squares")))
        assert job["status"] == "finished" and job["result"]["prompted_tasks"] == [opened], job
        after = e2e.predictions_by_task(ls, project)
        assert all(after[t][0]["updated_at"] != first[t][0]["updated_at"] for t in others)
        assert np.array_equal(sorted(job["result"]["updated"]), others)
