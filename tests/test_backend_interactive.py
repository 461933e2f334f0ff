# ruff: noqa: F811  (pytest fixtures imported from other test modules are redefined as parameters)
"""Interactive calls (backend/prediction/interactive.py, prompts.py; backend/learning/prompts.py): /predict
with Label Studio's ``params.context`` of a smart keypoint, rectangle or brush, on the tiny backbone.

Known answers: on ``cosod.data.synthetic_group`` images a keypoint on the planted object gives a mask that
overlaps it (IoU > 0.6 for seeds 0-2) and a keypoint on a distractor gives the distractor, not the object:
the prompt decides. Through the job (test_backend_propagation's fake Label Studio, images of noise with a
coloured square): a keypoint on one task's square makes the group's other unannotated tasks cover theirs,
as a correction would, without storing any correction; an annotation of the task supersedes it.

No Redis: the in-process queue."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from test_backend_app import BRUSH, POLY, make_client, predict, project_with_groups, setup, spy  # noqa: F401
from test_backend_propagation import PID, env, event, image, iou, mask_of, truth, wait_done  # noqa: F401

from backend.errors import BadRequestError
from backend.grouping import GroupKey
from backend.jobs.propagation import propagation_job_id
from backend.labelstudio.labelconfig import parse_label_config
from backend.labelstudio.regions import mask_to_rle, rle_to_mask, rle_to_mask_fast
from backend.learning.prompts import PromptStore
from backend.prediction.interactive import predict_interactive, segment
from backend.prediction.prompts import parse_prompts, token_cell
from cosod.data import synthetic_group

SIZE = (96, 128)  # H, W of the synthetic images
KP = '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>'
RECT = '<RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>'
SMART = BRUSH.replace("</View>", f"{KP}{RECT}</View>")


def keypoint(x: float, y: float, *, positive: bool | None = True, name: str = "kp") -> dict[str, Any]:
    """A smart keypoint as Label Studio's editor serializes it (percent coordinates)."""
    r: dict[str, Any] = {
        "id": "k1",
        "type": "keypointlabels",
        "from_name": name,
        "to_name": "image",
        "original_width": SIZE[1],
        "original_height": SIZE[0],
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Object"], "labels": ["Object"]},
    }
    if positive is not None:
        r["is_positive"] = positive
    return r


def rect(x: float, y: float, w: float, h: float) -> dict[str, Any]:
    return {
        "id": "r1",
        "type": "rectanglelabels",
        "from_name": "rect",
        "to_name": "image",
        "original_width": SIZE[1],
        "original_height": SIZE[0],
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["Object"]},
    }


def centre(mask: np.ndarray) -> tuple[float, float]:
    """A pixel well inside ``mask`` as (x, y) in percent."""
    inner = ndimage.binary_erosion(mask, iterations=2)
    ys, xs = np.nonzero(inner if inner.any() else mask)
    k = len(ys) // 2
    return 100 * (xs[k] + 0.5) / mask.shape[1], 100 * (ys[k] + 0.5) / mask.shape[0]


def distractor(img: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """The largest saturated blob away from the object: a distractor of synthetic_group."""
    sat = np.asarray(Image.fromarray(img).convert("HSV"))[..., 1] > 150
    sat &= ~ndimage.binary_dilation(obj, iterations=2)
    labels, n = ndimage.label(sat)
    sizes = ndimage.sum(sat, labels, range(1, n + 1))
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def prompts_of(*regions: dict[str, Any], config: str = SMART) -> list[Any]:
    return parse_prompts({"result": list(regions)}, config, parse_label_config(config))


# -- the mask a prompt gives --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_keypoint_on_the_object_gives_the_object(tiny_pipeline, seed: int) -> None:
    imgs, masks = synthetic_group(3, seed=seed, size=SIZE)
    seg = segment(tiny_pipeline, imgs[0], prompts_of(keypoint(*centre(masks[0]))), 10**8)
    assert seg.from_pipeline and 0 < seg.score <= 1
    assert iou(seg.mask, masks[0]) > 0.6, iou(seg.mask, masks[0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_keypoint_on_a_distractor_gives_the_distractor(tiny_pipeline, seed: int) -> None:
    imgs, masks = synthetic_group(3, seed=seed, size=SIZE)
    d = distractor(imgs[0], masks[0])
    seg = segment(tiny_pipeline, imgs[0], prompts_of(keypoint(*centre(d))), 10**8)
    assert (seg.mask & masks[0]).sum() == 0  # not the group's object
    assert (seg.mask & d).sum() > 0.8 * d.sum() and seg.mask.sum() < 1.3 * d.sum()


def test_a_rectangle_clips_and_a_negative_keypoint_removes(tiny_pipeline) -> None:
    imgs, masks = synthetic_group(3, seed=0, size=SIZE)
    ys, xs = np.nonzero(masks[0])
    box = (100 * xs.min() / SIZE[1], 100 * ys.min() / SIZE[0])
    wh = (100 * (xs.max() + 1 - xs.min()) / SIZE[1], 100 * (ys.max() + 1 - ys.min()) / SIZE[0])
    seg = segment(tiny_pipeline, imgs[0], prompts_of(rect(*box, *wh)), 10**8)
    inside = np.zeros(SIZE, bool)
    inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    assert not (seg.mask & ~inside).any() and iou(seg.mask, masks[0]) > 0.6
    # a negative keypoint: its token cell never in the answer
    x, y = centre(masks[0])
    neg = keypoint(x, y, positive=False)
    seg2 = segment(tiny_pipeline, imgs[0], prompts_of(rect(*box, *wh), neg), 10**8)
    assert not seg2.mask[token_cell(x, y, SIZE, (28, 28))].any()
    with pytest.raises(BadRequestError, match="no positive prompt"):
        segment(tiny_pipeline, imgs[0], prompts_of(neg), 10**8)


def test_a_brush_stroke_is_part_of_the_answer(tiny_pipeline) -> None:
    imgs, masks = synthetic_group(3, seed=1, size=SIZE)
    stroke = ndimage.binary_erosion(masks[0], iterations=4)
    region = {
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": SIZE[1],
        "original_height": SIZE[0],
        "value": {"format": "rle", "rle": mask_to_rle(stroke), "brushlabels": ["Object"]},
    }
    seg = segment(tiny_pipeline, imgs[0], prompts_of(region), 10**8)
    assert not (stroke & ~seg.mask).any() and iou(seg.mask, masks[0]) > 0.6


# -- hostile contexts: 400 naming the problem -----------------------------------------------------------
def bad(**change: Any) -> dict[str, Any]:
    r = keypoint(50, 50)
    for k, v in change.items():
        if k.startswith("value_"):
            r["value"][k[6:]] = v
        else:
            r[k] = v
    return r


HOSTILE = [
    ([bad(type="ellipselabels")], "region type 'ellipselabels' is not a prompt"),
    ([bad(type=None)], "region type None is not a prompt"),
    ([bad(value_x="50")], "value.x must be a number in 0..100"),
    ([bad(value_x=100.5)], "value.x must be a number in 0..100"),
    ([bad(value_y=-1)], "value.y must be a number in 0..100"),
    ([bad(value_y=True)], "value.y must be a number in 0..100"),
    ([bad(value_x=10**400)], "value.x must be a number in 0..100"),  # float() of it overflows
    ([bad(value=[1, 2])], "'value' must be an object"),
    ([bad(is_positive="yes")], "is_positive must be true or false"),
    ([bad(from_name="nope")], "from_name 'nope' is not a <keypointlabels> control"),
    ([bad(from_name="rect")], "from_name 'rect' is not a <keypointlabels> control"),
    ([bad(to_name="other")], "to_name 'other' is not the image"),
    ([rect(60, 10, 50, 10)], "leaves the image"),
    ([rect(10, 10, 0, 10)], "is empty"),
    ([{**rect(10, 10, 10, 10), "value": {**rect(10, 10, 10, 10)["value"], "rotation": 30}}], "rotated"),
    ([keypoint(50, 50)] * 65, "over the limit of 64 prompts"),
    (["kp"], "must be a region object"),
]


@pytest.mark.parametrize("result, message", HOSTILE, ids=[m for _, m in HOSTILE])
def test_bad_prompts_are_400_naming_the_problem(make_client, result: Any, message: str) -> None:
    client = make_client(propagate=False)
    assert setup(client, schema=SMART).status_code == 200
    r = client.post(
        "/predict",
        json={
            "tasks": [{"id": 1, "data": {"image": "/data/upload/12/a.png"}}],
            "project": "12.1795340308",
            "label_config": SMART,
            "params": {"context": {"result": result}},
        },
    )
    assert r.status_code == 400, r.get_json()
    assert message in r.get_json()["error"], r.get_json()


def test_more_hostile_contexts(make_client, fake_ls, tiny_pipeline) -> None:
    client = make_client(lambda s: tiny_pipeline, propagate=False)
    tasks = project_with_groups(fake_ls, {"a": 2}, size=(128, 96))
    assert setup(client, schema=SMART).status_code == 200

    def call(ts: list[Any], context: Any) -> Any:
        return predict(client, ts, SMART, params={"context": context})

    # several tasks, a context that is not an object, a result that is not a list
    r = call(tasks, {"result": [keypoint(50, 50)]})
    assert r.status_code == 400 and "one task, but the request has 2 tasks" in r.get_json()["error"]
    r = call(tasks[:1], "kp")
    assert r.status_code == 400 and "params.context must be an object" in r.get_json()["error"]
    r = call(tasks[:1], {"result": {"x": 1}})
    assert r.status_code == 400 and "must be a list of regions" in r.get_json()["error"]
    # a brush prompt whose RLE is huge, or not at the image's size, or not an RLE
    big = {**bad(type="brushlabels", from_name="tag"), "value": {"format": "rle", "rle": [0] * (1 << 20)}}
    r = call(tasks[:1], {"result": [big, big]})
    assert r.status_code == 400 and "bytes of RLE, over the limit" in r.get_json()["error"]
    other = np.zeros((10, 10), bool)
    small = {**big, "original_width": 10, "original_height": 10, "value": {"rle": mask_to_rle(other)}}
    r = call(tasks[:1], {"result": [small]})
    assert r.status_code == 400 and "the task's image is 96x128" in r.get_json()["error"]
    r = call(tasks[:1], {"result": [{**big, "value": {"rle": [1, 2, 3]}}]})
    assert r.status_code == 400 and "53-bit header" in r.get_json()["error"]
    # no prompt at all: an ordinary prediction (Label Studio also sends these)
    for context in (None, {}, {"result": []}, {"result": None}, {"project_credentials_login": None}):
        r = call(tasks[:1], context)
        assert r.status_code == 200 and "interactive" not in r.get_json(), context
        assert r.get_json()["results"][0]["result"] is not None


def test_the_answer_has_the_projects_format_score_and_version(make_client, fake_ls, tiny_pipeline) -> None:
    client = make_client(lambda s: tiny_pipeline, propagate=False)
    tasks = project_with_groups(fake_ls, {"a": 3}, size=(128, 96))
    config = POLY.replace("</View>", f"{KP}</View>")
    version = setup(client, schema=config).get_json()["model_version"]
    plain = predict(client, tasks[:1], config).get_json()["results"][0]
    png = fake_ls.routes[tasks[0]["data"]["image"]][2]
    red = np.all(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) == (220, 30, 30), axis=2)
    kp = keypoint(*centre(red))
    r = predict(client, tasks[:1], config, params={"context": {"result": [kp]}})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    (item,) = body["results"]
    assert item["model_version"] == version and 0 < item["score"] <= 1
    assert item["result"] and {g["type"] for g in item["result"]} == {"polygonlabels"}
    assert {g["from_name"] for g in item["result"]} == {"poly"}  # the project's own control, not the prompt's
    assert not {g["id"] for g in item["result"]} & {g["id"] for g in plain["result"]}
    info = body["interactive"]
    assert info["task"] == tasks[0]["id"] and info["prompts"] == ["keypoint"]
    assert info["propagation_job"] is None and "off for this project" in info["propagation"]
    # brush config: one brushlabels region decoding to an image-sized mask
    version = setup(client, schema=SMART).get_json()["model_version"]
    r = predict(client, tasks[:1], SMART, params={"context": {"result": [kp]}}).get_json()
    (region,) = r["results"][0]["result"]
    assert region["type"] == "brushlabels" and r["results"][0]["model_version"] == version
    got = rle_to_mask(region["value"]["rle"], 96, 128) > 0
    assert iou(got, red) > 0.6, iou(got, red)


# -- the group's propagation with the prompt as provisional exemplar ---------------------------------------
def test_a_keypoint_propagates_to_the_group_and_is_never_a_correction(env) -> None:
    model, ls, s, version = env()
    model.ls = ls  # the interactive call reads its task and the group through the same fake
    project = model.project(PID)
    config = project.label_config.replace("</View>", f"{KP}</View>")
    project = model.project(PID, config)
    t1 = next(t for t in ls.tasks if t.id == 1)
    x, y = centre(truth(0, 0))
    kp = {**keypoint(x, y), "original_width": 64, "original_height": 48}
    answer = predict_interactive(
        model, [{"id": 1, "data": dict(t1.data), "project": PID}], project=project, context={"result": [kp]}
    )
    assert answer is not None
    (item,) = answer["results"]
    assert iou(mask_of(item), truth(0, 0)) > 0.6 and item["model_version"] == version
    job = propagation_job_id(PID, GroupKey("field:group", "a"))
    assert answer["interactive"]["propagation_job"] == job
    r = wait_done(s, job).result
    assert r["status"] == "propagated" and r["prompted_tasks"] == [1] and r["corrected_tasks"] == []
    assert r["updated"] == [2, 3, 4, 5] and r["created"] == [6]
    for t in (2, 3, 4, 5, 6):
        (p,) = [p for p in ls.preds[t] if p["model_version"] == version]
        assert iou(mask_of(p), truth(0, t - 1)) > 0.5, t
    assert ls.preds[1][0]["updates"] == 0  # the prompted task's own prediction: left alone
    assert model.store.load_corrections(PID)[0] == []  # never a fine-tune correction
    # an annotation of the task supersedes the prompt: the job drops it and uses the correction
    model.fit("ANNOTATION_CREATED", event(ls, 1, truth(0, 0)))
    r = wait_done(s, job).result
    assert r["corrected_tasks"] == [1] and r["prompted_tasks"] == []
    assert PromptStore(s.model_dir, s.prompt_ttl).load(PID, [1]) == {}


def test_prompts_expire_and_round_trip(tmp_path) -> None:
    store = PromptStore(tmp_path, ttl=60)
    mask = np.zeros((7, 13), bool)
    mask[2:5, 3:11] = True
    store.put(3, 42, mask, now=1000.0)
    (got,) = store.load(3, [41, 42], now=1059.0).values()
    assert got.task_id == 42 and got.created == 1000.0 and np.array_equal(got.mask, mask)
    assert store.load(4, [42], now=1001.0) == {}  # another project's task
    assert store.load(3, [42], now=1061.0) == {}  # expired: deleted
    assert not (tmp_path / "prompts" / "3" / "42.npz").exists()
    (tmp_path / "prompts" / "3").mkdir(parents=True, exist_ok=True)
    (tmp_path / "prompts" / "3" / "7.npz").write_bytes(b"not a zip")
    assert store.load(3, [7]) == {} and not (tmp_path / "prompts" / "3" / "7.npz").exists()
    store.put(3, 8, mask)
    assert store.drop(3, [8, 9]) == 1 and store.load(3, [8]) == {}
    # a new prompt deletes the project's expired files, even those no job reads again
    import os
    import time

    store.put(3, 5, mask)
    old = time.time() - 61
    os.utime(tmp_path / "prompts" / "3" / "5.npz", (old, old))
    store.put(4, 5, mask)  # another project: not swept
    assert (tmp_path / "prompts" / "3" / "5.npz").exists()
    store.put(3, 6, mask)
    assert not (tmp_path / "prompts" / "3" / "5.npz").exists()
    assert (tmp_path / "prompts" / "3" / "6.npz").exists() and (tmp_path / "prompts" / "4" / "5.npz").exists()


def test_the_keypoint_cell_is_the_token_cell_of_the_point() -> None:
    rows, cols = token_cell(50.0, 0.0, (96, 128), (28, 28))
    assert (rows.start, rows.stop) == (0, 3) and (cols.start, cols.stop) == (64, 68)
    rows, cols = token_cell(100.0, 100.0, (10, 10), (28, 28))
    assert rows.stop == 10 and cols.stop == 10 and rows.stop > rows.start


def test_brush_prompt_rle_helpers_agree() -> None:  # the stroke decodes as Label Studio's brush RLE
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    assert np.array_equal(rle_to_mask_fast(mask_to_rle(m), 5, 6) > 0, m)


def test_an_unreadable_image_is_an_error_the_editor_shows(make_client, fake_ls, tiny_pipeline) -> None:
    """Label Studio relays an error answer as ``{"errors": [...]}``; a 200 without a result would show
    nothing. Not fetched: 502; not an image: 422; both name the task."""
    client = make_client(lambda s: tiny_pipeline, propagate=False)
    tasks = project_with_groups(fake_ls, {"a": 2}, size=(128, 96))
    assert setup(client, schema=SMART).status_code == 200
    fake_ls.add_bytes(tasks[0]["data"]["image"], b"not an image")
    r = predict(client, tasks[:1], SMART, params={"context": {"result": [keypoint(50, 50)]}})
    assert r.status_code == 422, r.get_json()
    assert f"task {tasks[0]['id']}: the image was not read" in r.get_json()["error"]
    fake_ls.routes.pop(tasks[1]["data"]["image"])
    r = predict(client, tasks[1:], SMART, params={"context": {"result": [keypoint(50, 50)]}})
    assert r.status_code == 502, r.get_json()
    assert f"task {tasks[1]['id']}: the image was not read" in r.get_json()["error"]
