"""Hostile and oversized input (issue 13) against the real backend under gunicorn and a real Label Studio.

A table of cases (:data:`CASES`, category / name / requests / expectation) runs against three
configurations of the backend, each started once: ``rq`` (Redis, a local-files root with hostile symlinks,
genuine corrections stored first through Label Studio's own webhook), ``down`` (REDIS_URL with a password,
pointing at a closed port) and ``auth`` (basic auth on). Every answer is judged by
:func:`hostile_kit.run_case`: no 5xx except documented 503s of read routes while Redis is down, no
traceback, server path or credential, bounded answer size, time, peak RSS growth of the gunicorn worker
processes (:data:`hostile_kit.RSS_CASE_MB` per case, :data:`hostile_kit.RSS_TOTAL_MB` per configuration)
and log growth, the worker alive; then the case's own expectation. At the end the genuine corrections must
be stored unchanged (read-only SQLite and ``GET /versions``). A summary table (cases per category,
2xx/4xx/5xx, worst time, worst memory growth) is printed and written to ``<basetemp>/hostile/summary.txt``;
``python bench/hostile.py`` runs the same corpus outside pytest.

Categories 1-10 are the issue's (what was seen); 11-15 are more: bodies, field types, SSRF, HTTP oddities,
and the end-of-configuration integrity checks.

Documented bounds (``tests/e2e/hostile_kit.py``): peak RSS growth of the worker processes <= 300 MB per case
and <= 300 MB over a configuration; an answer <= 64 KiB unless the case says more (a 10,000-task /predict:
400 bytes per task; /metrics: 200 KiB); a case <= 15 s, "fast" webhook cases <= 3 s; the backend log grows
by <= 4 MiB per case (1 MiB where a 20 MB string is sent). Past +2 GB the test kills the worker (to protect
the machine) and the case fails; a request that times out also restarts it, so later cases start clean.
Per-case records (statuses, seconds, peak MB, bytes, problems) go to ``<basetemp>/hostile/cases.tsv``.

Run alone: ``PYTHONPATH=$PWD LS_BIN=.venv-ls/bin/label-studio .venv/bin/python -m pytest -q
tests/e2e/test_hostile.py`` (Redis on 127.0.0.1:6379; database 14 is flushed).
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.hostile_kit import (
    FAST_SECONDS,
    METRICS_MAX_BYTES,
    RSS_TOTAL_MB,
    Case,
    Outcome,
    Reply,
    Req,
    World,
    annotate,
    brush,
    brush_config,
    descendants,
    open_world,
    read_corrections,
    rle_runs,
    rss_mb,
    run_case,
    summary,
    wait_stored,
)
from tests.e2e.hostile_kit import table as per_case

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TS = "1795340308"  # Label Studio's "<id>.<created timestamp>"
MB20 = 20 * 1024 * 1024
BIG_ID = 10**8  # task ids Label Studio does not have
HUGE = 2**63


# -- request builders ----------------------------------------------------------------------------------
def proj(w: World, key: str) -> str:
    return f"{w.pid(key)}.{TS}"


def data_of(w: World, tid: int) -> dict[str, Any]:
    return dict(w.scratch["data"][tid])


def fake_task(k: int, image: Any, group: Any = None, **extra: Any) -> dict[str, Any]:
    return {"id": BIG_ID + k, "data": {"image": image, "group": group or f"hx{k}", **extra}}


def predict(w: World, key: str, tasks: Sequence[Any], **extra: Any) -> Req:
    return Req("POST", "/predict", json={"tasks": list(tasks), "project": proj(w, key), **extra})


def annotation_event(
    w: World,
    *,
    key: str = "A",
    aid: int,
    tid: int | None = None,
    result: Any = None,
    data: Any = None,
    project: Any = None,
    action: str = "ANNOTATION_CREATED",
) -> dict[str, Any]:
    """An annotation event shaped as Label Studio sends it: the project, the task (with the id of the project
    Label Studio has it in, when it has it) and the annotation (default: a new one on task A[3])."""
    tid = w.tasks["A"][3] if tid is None else tid
    project = {"id": w.pid(key)} if project is None else project
    task: dict[str, Any] = {"id": tid, "data": data_of(w, tid) if data is None else data}
    owner = next((w.projects[k] for k, ids in w.tasks.items() if tid in ids), None)
    if owner is not None:
        task["project"] = owner
    annotation = {"id": aid, "task": tid, "result": [] if result is None else result}
    if isinstance(project, dict) and "id" in project:
        annotation["project"] = project["id"]
    return {"action": action, "project": project, "task": task, "annotation": annotation}


def webhook(payload: Any, **kw: Any) -> Req:
    return Req("POST", "/webhook", json=payload, **kw)


# -- checks --------------------------------------------------------------------------------------------
def not_stored(key: str, aid: int) -> Any:
    def check(w: World, replies: Sequence[Reply]) -> list[str]:
        row = w.stored(w.pid(key), aid)
        return [f"annotation {aid} was stored ({row[3]}x{row[4]} mask)"] if row is not None else []

    return check


def stored(key: str, aid: int) -> Any:
    def check(w: World, replies: Sequence[Reply]) -> list[str]:
        return [] if w.stored(w.pid(key), aid) is not None else [f"annotation {aid} was not stored"]

    return check


def refused(*indices: int) -> Any:
    """The last answer is 4xx, or a 2xx whose ``results[i]`` carries no regions (an error item)."""

    def check(w: World, replies: Sequence[Reply]) -> list[str]:
        last = replies[-1]
        if last.status // 100 != 2:
            return []
        body = last.json()
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list):
            return [f"a 2xx without a results list: {last.text[:120]!r}"]
        out = []
        for i in indices or range(len(results)):
            item = results[i] if i < len(results) else None
            items = item if isinstance(item, list) else [item]
            if any(isinstance(x, dict) and x.get("result") for x in items):
                out.append(f"task #{i} was predicted (regions returned) instead of refused")
        return out

    return check


def no_canary(w: World, replies: Sequence[Reply]) -> list[str]:
    seen = w.canary_since_case()
    return [f"the canary server was contacted: {s.method} {s.path[:80]}" for s in seen[:3]]


def canary_clean(w: World, replies: Sequence[Reply]) -> list[str]:
    """The image was fetched from the presigned URL (cloud images still work), without Label Studio's cookie
    or token (the redirect leads to another host)."""
    if not w.canary_since_case():
        return [
            "the presigned URL was never fetched: cloud images of the project's own tasks must still work"
        ]
    out = []
    for s in w.canary_since_case():
        lower = {k.lower(): v for k, v in s.headers.items()}
        if "cookie" in lower:
            out.append(f"Label Studio's cookie reached another host: Cookie: {lower['cookie'][:40]}...")
        if "authorization" in lower and w.ls.token in lower["authorization"]:
            out.append("Label Studio's token reached another host")
    return out


def both(*checks: Any) -> Any:
    def check(w: World, replies: Sequence[Reply]) -> list[str]:
        return [p for c in checks for p in c(w, replies)]

    return check


EXPOSITION_LINE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? [-+0-9.eEinfaINFA]+$")


def metrics_sane(w: World, replies: Sequence[Reply]) -> list[str]:
    """The last answer is /metrics: 200, under METRICS_MAX_BYTES, UTF-8, every line of the text format."""
    last = replies[-1]
    out = []
    if last.status != 200:
        return [f"/metrics answered {last.status}"]
    if len(last.body) > METRICS_MAX_BYTES:
        out.append(f"/metrics is {len(last.body)} bytes > {METRICS_MAX_BYTES}")
    try:
        text = last.body.decode("utf-8")
    except UnicodeDecodeError:
        return [*out, "/metrics is not UTF-8"]
    bad = [ln for ln in text.splitlines() if ln and not ln.startswith("#") and not EXPOSITION_LINE.match(ln)]
    if bad:
        out.append(f"{len(bad)} line(s) of /metrics are not the text format, e.g. {bad[0][:100]!r}")
    return out


def names_setting(setting: str) -> Any:
    def check(w: World, replies: Sequence[Reply]) -> list[str]:
        last = replies[-1]
        return [] if setting in last.text else [f"the answer does not name {setting}: {last.text[:160]!r}"]

    return check


INTERNAL = ("redis", "label_studio", "backbone", "pipeline", "workers", "device", "queue", "127.0.0.1")


def says_nothing_internal(w: World, replies: Sequence[Reply]) -> list[str]:
    text = replies[-1].text.lower()
    return [f"the unauthenticated answer mentions {word!r}" for word in INTERNAL if word in text]


# -- 1. poisoned corrections -----------------------------------------------------------------------------
def poisoned() -> list[Case]:
    c = "1-poisoned-correction"
    side = 16384
    cases: list[Case] = []

    def poison(name: str, aid: int, result: Any, **kw: Any) -> Case:
        return Case(
            c,
            name,
            lambda w: [webhook(annotation_event(w, aid=aid, result=result))],
            check=kw.pop("check", not_stored("A", aid)),
            seconds=kw.pop("seconds", FAST_SECONDS),
            **kw,
        )

    zeros = rle_runs([(0, 4 * side * side)])
    cases += [
        poison("16384x16384-valid-rle-empty", 9_000_001, [brush(zeros, side, side)]),
        poison(
            "16384x16384-valid-rle-full", 9_000_002, [brush(rle_runs([(255, 4 * side * side)]), side, side)]
        ),
        poison(
            "8192x8192-over-the-pixel-limit", 9_000_003, [brush(rle_runs([(0, 4 * 8192**2)]), 8192, 8192)]
        ),
        poison("lying-header-2^30-for-64x48", 9_000_004, [brush(rle_runs([(0, 2**30)]), 64, 48)]),
        poison(
            "lying-header-2^32-1-truncated",
            9_000_005,
            [brush(rle_runs([(0, 12288)], count=2**32 - 1), 64, 48)],
        ),
        poison("word-size-16", 9_000_006, [brush(rle_runs([(0, 12288)], word=16), 64, 48)]),
        poison("count-0-for-64x48", 9_000_007, [brush(rle_runs([(0, 0)]), 64, 48)]),
        poison("rle-values-out-of-range", 9_000_008, [brush([0, 300, -1, 7], 64, 48)]),
        poison("rle-a-string", 9_000_009, [brush("AAAAAAAAAAAA", 64, 48)]),
        poison("rle-an-object", 9_000_010, [brush({"a": 1}, 64, 48)]),
        poison("rle-5M-zeros", 9_000_011, [brush([0] * 5_000_000, 64, 48)], seconds=15.0),
        poison("width-a-float", 9_000_012, [brush(rle_runs([(0, 12288)]), 64.0, 48)]),
        poison("width-a-string", 9_000_013, [brush(rle_runs([(0, 12288)]), "64", 48)]),
        poison("width-2^63", 9_000_014, [brush(rle_runs([(0, 12288)]), HUGE, 48)]),
        poison("width-negative", 9_000_015, [brush(rle_runs([(0, 12288)]), -64, -48)]),
        poison(
            "regions-disagree-on-size",
            9_000_016,
            [brush(rle_runs([(0, 12288)]), 64, 48), brush(rle_runs([(0, 4096)]), 32, 32)],
        ),
        poison("result-a-string", 9_000_017, "not a list"),
        poison(
            "lying-header-trailing-garbage",
            9_000_018,
            [brush(rle_runs([(0, 2**24)], count=12288), 64, 48)],
            status="2xx|4xx",
            check=None,  # the header's count fits the size; what follows it may be ignored, as LS does
        ),
    ]
    # the correction stays refused when it comes again as an update, with the annotation's real task
    cases.append(
        Case(
            c,
            "16384x16384-as-ANNOTATION_UPDATED",
            lambda w: [
                webhook(
                    annotation_event(
                        w, aid=9_000_019, result=[brush(zeros, side, side)], action="ANNOTATION_UPDATED"
                    )
                )
            ],
            check=not_stored("A", 9_000_019),
            seconds=FAST_SECONDS,
        )
    )
    cases.append(
        Case(
            c,
            "100k-non-brush-regions",
            lambda w: [
                webhook(
                    annotation_event(
                        w, aid=9_000_020, result=[{"type": "polygonlabels", "value": {}}] * 100_000
                    )
                )
            ],
            status="2xx|4xx",
            seconds=FAST_SECONDS * 2,
            check=not_stored("A", 9_000_020),
        )
    )
    cases.append(
        Case(
            c,
            "fine-tune-still-works-after-the-poison",
            act=finetune_works,
            seconds=300.0,
            note="START_TRAINING through Label Studio's Train button, a real cosod-worker runs the job",
        )
    )
    return cases


def finetune_works(w: World) -> list[str]:
    """Label Studio's Train button -> START_TRAINING -> the fine-tune job in Redis; a real worker runs it."""
    import requests

    from tests.e2e.conftest import TOKEN

    w.ls_api("POST", f"/api/ml/{w.ml['A']}/train", json={})
    job_id = f"finetune-p{w.pid('A')}"
    env = {
        "REDIS_URL": w.redis_url or "",
        "COSOD_QUEUE": "cosod-hostile-rq",
        "MODEL_DIR": str(w.model_dir),
        "LABEL_STUDIO_URL": w.ls.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "COSOD_FINETUNE_STEPS": "5",
        "XDG_CACHE_HOME": str(w.base / "worker-cache"),
    }
    info: dict[str, Any] = {}
    with w.start_worker(w.base / "worker", env, name="finetune-worker"):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            r = requests.get(f"{w.url}/jobs/{job_id}", auth=w.auth, timeout=30)
            info = (
                r.json()
                if r.status_code == 200
                else {"status": f"HTTP {r.status_code}", "text": r.text[:200]}
            )
            if info.get("status") in ("finished", "failed", "canceled"):
                break
            time.sleep(0.5)
    if info.get("status") != "finished":
        return [f"the fine-tune did not finish: {json.dumps(info)[:400]}"]
    return []


# -- 2. unbounded /predict ---------------------------------------------------------------------------------
def unbounded_predict() -> list[Case]:
    c = "2-unbounded-predict"
    n = 10_000
    per_task = 400  # bytes of answer per task, at most (a clear per-task error fits)
    return [
        Case(
            c,
            "10k-tasks-one-group-missing-files",
            lambda w: [
                predict(
                    w,
                    "B",
                    [fake_task(k, f"/data/local-files/?d=imgs/missing-{k}.png", "big1") for k in range(n)],
                )
            ],
            status="2xx|4xx",
            max_bytes=n * per_task,
            seconds=60.0,
            check=refused(),
        ),
        Case(
            c,
            "10k-tasks-not-objects",
            lambda w: [predict(w, "B", list(range(n)))],
            seconds=FAST_SECONDS,
        ),
        Case(
            c,
            "1000-copies-of-one-task",
            lambda w: [predict(w, "B", [fake_task(0, "/data/local-files/?d=imgs/a.png", "dup")] * 1000)],
            status="2xx|4xx",
            max_bytes=1000 * 2 * 1024,
            seconds=60.0,
        ),
        Case(
            c,
            "10k-tasks-in-10k-groups",
            lambda w: [
                Req(
                    "POST",
                    "/predict",
                    json={
                        "tasks": [fake_task(k, "/data/local-files/?d=imgs/b.png", f"g{k}") for k in range(n)],
                        "project": proj(w, "B"),
                    },
                    timeout=60,
                )
            ],
            status="2xx|4xx",
            max_bytes=n * per_task,
            seconds=30.0,
            heavy=True,
            note="one Label Studio listing and one pipeline run per group without a cap",
        ),
        Case(
            c,
            "10k-tasks-one-group-real-image",
            lambda w: [
                Req(
                    "POST",
                    "/predict",
                    json={
                        "tasks": [fake_task(k, "/data/local-files/?d=imgs/a.png", "big3") for k in range(n)],
                        "project": proj(w, "B"),
                    },
                    timeout=60,
                )
            ],
            status="2xx|4xx",
            max_bytes=n * per_task,
            seconds=30.0,
            heavy=True,
            note="10,000 images into one predict_group without a cap",
        ),
    ]


# -- 3. forged deletions -----------------------------------------------------------------------------------
def forged_deletions() -> list[Case]:
    c = "3-forged-deletions"
    n = 10_000

    def forged(w: World) -> range:
        if w.forged_range is None:  # the next annotation ids Label Studio will hand out
            top = max(w.genuine) if w.genuine else 1
            w.forged_range = (top + 1, top + n)
        lo, hi = w.forged_range
        return range(lo, hi + 1)

    def deleted(key: str) -> Any:
        return lambda w: [
            webhook(
                {
                    "action": "ANNOTATIONS_DELETED",
                    "project": {"id": w.pid(key)},
                    "annotations": [{"id": i} for i in forged(w)],
                }
            )
        ]

    def genuine_after(key: str) -> Any:
        def act(w: World) -> list[str]:
            if key == "C" and "C" not in w.ml:  # Label Studio connects the backend: /setup, then webhooks
                ml = w.ls_api(
                    "POST", "/api/ml", json={"url": w.url, "project": w.pid("C"), "title": "cosod hostile C"}
                )
                w.ml["C"] = int(ml["id"])
            tid = w.tasks[key][-1]
            aid = annotate(w, tid, seed=77 + tid)
            out = []
            if w.forged_range and not w.forged_range[0] <= aid <= w.forged_range[1]:
                out.append(
                    f"annotation {aid} fell outside the forged ids {w.forged_range}: nothing was tested"
                )
            if not wait_stored(w, w.pid(key), aid):
                out.insert(0, f"Label Studio's genuine annotation {aid} (project {key}) was not stored")
            return out

        return act

    return [
        Case(
            c,
            "10k-ids-for-a-project-never-set-up",
            deleted("C"),
            status="2xx|4xx",
            seconds=FAST_SECONDS,
            log_bytes=64 * 1024,
        ),
        Case(
            c,
            "10k-future-ids-of-a-real-project",
            deleted("A"),
            status="2xx|4xx",
            seconds=FAST_SECONDS,
            log_bytes=64 * 1024,
        ),
        Case(
            c,
            "10k-odd-ids",
            lambda w: [
                webhook(
                    {
                        "action": "ANNOTATIONS_DELETED",
                        "project": {"id": w.pid("A")},
                        "annotations": ["987654321", HUGE, {"id": {"id": 987654322}}, None, -5] * 2000,
                    }
                )
            ],
            status="2xx|4xx",
            seconds=FAST_SECONDS,
        ),
        Case(
            c,
            "annotations-a-string",
            lambda w: [
                webhook(
                    {"action": "ANNOTATIONS_DELETED", "project": {"id": w.pid("A")}, "annotations": "all"}
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "genuine-ids-under-another-project",
            lambda w: [
                webhook(
                    {
                        "action": "ANNOTATIONS_DELETED",
                        "project": {"id": w.pid("B")},
                        "annotations": [{"id": i} for i in w.genuine],
                    }
                )
            ],
            status="2xx|4xx",
        ),
        Case(c, "genuine-create-after-forged-deletes-known-project", act=genuine_after("A"), seconds=30.0),
        Case(c, "genuine-create-after-forged-deletes-new-project", act=genuine_after("C"), seconds=30.0),
    ]


# -- 4. /metrics label injection ----------------------------------------------------------------------------
def metrics_injection() -> list[Case]:
    c = "4-metrics-injection"
    metrics = Req("GET", "/metrics", status="200")

    def actions(values: Sequence[Any]) -> Any:
        return lambda w: [
            *[webhook({"action": v, "project": {"id": w.pid("B")}}, status="2xx|4xx") for v in values],
            metrics,
        ]

    def methods(w: World) -> list[Req]:
        names = ["X" + "".join(chr(65 + (k // 26**i) % 26) for i in range(4)) + "Q" * 14 for k in range(3000)]
        return [*[Req(m, "/", status="4xx") for m in names], metrics]

    kw: dict[str, Any] = {"check": metrics_sane, "max_bytes": METRICS_MAX_BYTES, "status": "2xx|4xx"}
    return [
        Case(
            c,
            "500-distinct-unknown-paths",
            lambda w: [*[Req("GET", f"/nope/{k}", status="4xx") for k in range(500)], metrics],
            seconds=30.0,
            **kw,
        ),
        Case(
            c,
            "2000-distinct-actions",
            actions([f"HOSTILE_{k:06d}_" + "x" * 50 for k in range(2000)]),
            seconds=60.0,
            **kw,
        ),
        Case(c, "3000-distinct-http-methods", methods, seconds=60.0, **kw),
        Case(c, "action-exposition-injection", actions(['x"} 1\nevil_metric{a="1"} 666\n# HELP']), **kw),
        Case(c, "action-NUL-and-controls", actions(["\x00\x01\x1b[31m\r\n"]), **kw),
        Case(c, "action-20MB", actions(["A" * MB20]), seconds=30.0, **kw),
        *[
            Case(c, f"action-{name}", lambda w, v=v: [webhook({"action": v, "project": {"id": w.pid("B")}})])
            for name, v in (
                ("number", 123),
                ("null", None),
                ("list", ["ANNOTATION_CREATED"]),
                ("object", {"a": 1}),
                ("empty", ""),
            )
        ],
    ]


# -- 5. credentials echoed (Redis down, REDIS_URL with a password) -------------------------------------------
def credentials_echoed() -> list[Case]:
    c = "5-credentials-redis-down"
    read = {"config": "down", "allow_503": True}
    return [
        Case(c, "health", lambda w: [Req("GET", "/health")], status="200|503", **read),
        Case(c, "root", lambda w: [Req("GET", "/")], status="200|503", **read),
        Case(c, "list-jobs", lambda w: [Req("GET", "/jobs")], status="503", **read),
        Case(
            c,
            "list-jobs-of-a-project",
            lambda w: [Req("GET", f"/jobs?project={w.pid('B')}")],
            status="503",
            **read,
        ),
        Case(
            c, "get-job", lambda w: [Req("GET", "/jobs/prelabel-p1-0123456789ab-x")], status="503|404", **read
        ),
        Case(
            c,
            "delete-job",
            lambda w: [Req("DELETE", "/jobs/prelabel-p1-0123456789ab-x")],
            status="503|404",
            **read,
        ),
        Case(
            c,
            "prelabel",
            lambda w: [Req("POST", "/jobs/prelabel", json={"project": w.pid("B")})],
            status="503",
            **read,
        ),
        Case(
            c,
            "prelabel-unknown-project",
            lambda w: [Req("POST", "/jobs/prelabel", json={"project": 770_001})],
            status="4xx|503",
            **read,
        ),
        Case(c, "odd-job-id", lambda w: [Req("GET", "/jobs/%00")], status="4xx|503", **read),
        Case(c, "metrics", lambda w: [Req("GET", "/metrics")], status="200", config="down"),
        Case(c, "versions", lambda w: [Req("GET", "/versions")], status="200", config="down"),
        Case(
            c,
            "setup",
            lambda w: [Req("POST", "/setup", json={"project": proj(w, "B"), "schema": w.configs["B"]})],
            status="200",
            config="down",
        ),
        Case(
            c,
            "predict",
            lambda w: [predict(w, "B", [{"id": w.tasks["B"][0], "data": data_of(w, w.tasks["B"][0])}])],
            status="200",
            config="down",
        ),
        Case(
            c,
            "correction-enqueues-into-a-dead-redis",
            lambda w: [
                webhook(
                    annotation_event(
                        w,
                        key="B",
                        aid=8_000_001,
                        tid=w.tasks["B"][1],
                        result=[brush(rle_runs([(0, 12288)]), 64, 48)],
                    )
                )
            ],
            status="2xx",
            config="down",
            check=stored("B", 8_000_001),
            note="COSOD_TRAIN_EVERY=1 here: the stored correction asks for a fine-tune",
        ),
        Case(
            c,
            "start-training-enqueues-into-a-dead-redis",
            lambda w: [webhook({"action": "START_TRAINING", "project": {"id": w.pid("B")}})],
            status="2xx",
            config="down",
            note="category 6 too: Redis down during a webhook that enqueues a fine-tune (after the "
            "correction above: COSOD_FINETUNE_MIN_CORRECTIONS=1 here)",
        ),
    ]


# -- 6. what gave 500s --------------------------------------------------------------------------------------
def deep(kind: str) -> bytes:
    return b"[" * 10_000 + b"]" * 10_000 if kind == "array" else b'{"a":' * 10_000 + b"1" + b"}" * 10_000


ODD_IDS: dict[str, tuple[Any, str]] = {  # name -> (value, allowed status)
    "superscript-2": ("²", "4xx"),
    "5000-digit-string": ("9" * 5000, "4xx"),
    "5000-digit-number": (int("9" * 4000), "4xx"),
    "fullwidth-3": ("３", "2xx|4xx"),
    "arabic-indic-3": ("٣", "2xx|4xx"),
    "string-3.9": ("3.9", "2xx|4xx"),
    "number-3.9": (3.9, "4xx"),
    "2^63": (HUGE, "2xx|4xx"),
    "2^64": (2**64, "2xx|4xx"),
    "negative": (-1, "4xx"),
    "zero": (0, "4xx"),
    "true": (True, "4xx"),
    "NaN": (math.nan, "4xx"),
    "Infinity": (math.inf, "4xx"),
    "lone-surrogate": ("\ud800", "4xx"),
    "a-list": ([1], "4xx"),
    "hex": ("0x10", "4xx"),
    "underscored": ("1_000", "4xx"),
    "NUL": ("1\x00", "2xx|4xx"),
}


def five_hundreds() -> list[Case]:
    c = "6-500s"
    cases: list[Case] = []
    for route in ("/setup", "/predict", "/webhook", "/jobs/prelabel"):
        for kind in ("array", "object"):
            cases.append(
                Case(c, f"10k-deep-{kind}-{route}", lambda w, r=route, k=kind: [Req("POST", r, body=deep(k))])
            )
    cases.append(
        Case(
            c,
            "10k-deep-body-on-GET-versions",
            lambda w: [Req("GET", "/versions", body=deep("array"))],
            status="2xx|4xx",
        )
    )

    for name, (value, spec) in ODD_IDS.items():
        as_query = value if isinstance(value, str) else json.dumps(value)
        cases += [
            Case(
                c,
                f"project-{name}-setup",
                lambda w, v=value: [Req("POST", "/setup", json={"project": v, "schema": w.configs["B"]})],
                status=spec,
            ),
            Case(
                c,
                f"project-{name}-predict",
                lambda w, v=value: [
                    Req(
                        "POST",
                        "/predict",
                        json={"project": v, "tasks": [fake_task(1, "/data/local-files/?d=imgs/a.png")]},
                    )
                ],
                status=spec,
            ),
            Case(
                c,
                f"project-{name}-webhook",
                lambda w, v=value: [
                    webhook(annotation_event(w, aid=9_100_001, project={"id": v}, result=[]))
                ],
                status=spec,
            ),
            Case(
                c,
                f"project-{name}-prelabel",
                lambda w, v=value: [Req("POST", "/jobs/prelabel", json={"project": v})],
                status=spec + "|404",
            ),
            # in a query string every value is a string ("3.9" names project 3): only "no 5xx" is asked
            Case(
                c,
                f"project-{name}-versions",
                lambda w, v=as_query: [Req("GET", f"/versions?project={_q(v)}")],
                status="2xx|4xx",
            ),
            Case(
                c,
                f"project-{name}-list-jobs",
                lambda w, v=as_query: [Req("GET", f"/jobs?project={_q(v)}")],
                status="2xx|4xx",
            ),
        ]
    for name, value in (("2^63", HUGE), ("superscript-2", "²"), ("5000-digits", "9" * 5000)):
        cases += [
            Case(
                c,
                f"annotation-id-{name}",
                lambda w, v=value: [webhook(annotation_event(w, aid=v, result=[]))],
                status="2xx|4xx",
            ),
            Case(
                c,
                f"task-id-{name}",
                lambda w, v=value: [
                    webhook(annotation_event(w, aid=9_100_002, tid=v, data={"image": "/data/upload/1/x.png"}))
                ],
                status="2xx|4xx",
            ),
            Case(
                c,
                f"predict-task-id-{name}",
                lambda w, v=value: [
                    predict(w, "B", [{"id": v, "data": {"image": "/data/local-files/?d=imgs/a.png"}}])
                ],
                status="2xx|4xx",
            ),
        ]
    surrogate = "\udc80"
    cases += [
        Case(
            c,
            "lone-surrogate-in-data-group",
            lambda w: [predict(w, "B", [fake_task(2, "/data/local-files/?d=imgs/a.png", surrogate)])],
            status="2xx|4xx",
        ),
        Case(
            c,
            "lone-surrogate-in-data-image",
            lambda w: [predict(w, "B", [fake_task(3, "/data/local-files/?d=imgs/" + surrogate + ".png")])],
            status="2xx|4xx",
            check=refused(),
        ),
        Case(
            c,
            "lone-surrogate-in-a-data-key",
            lambda w: [
                predict(
                    w,
                    "B",
                    [{"id": BIG_ID + 4, "data": {"image": "/data/local-files/?d=imgs/a.png", surrogate: 1}}],
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "lone-surrogate-in-webhook-image",
            lambda w: [
                webhook(
                    annotation_event(
                        w, aid=9_100_003, data={"image": "/data/upload/" + surrogate, "group": "g"}
                    )
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "lone-surrogate-in-webhook-group",
            lambda w: [
                webhook(
                    annotation_event(
                        w, aid=9_100_004, data={**data_of(w, w.tasks["A"][3]), "group": surrogate}
                    )
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "lone-surrogate-in-schema",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={
                        "project": "880001.1795340308",
                        "schema": w.configs["B"].replace("Object", surrogate),
                    },
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "lone-surrogate-in-extra-params",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={
                        "project": "880002.1795340308",
                        "schema": w.configs["B"],
                        "extra_params": {"group_by": "field:" + surrogate},
                    },
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "lone-surrogate-in-prelabel-groups",
            lambda w: [Req("POST", "/jobs/prelabel", json={"project": w.pid("B"), "groups": [surrogate]})],
            status="2xx|4xx",
        ),
    ]
    odd_jobs = {
        "NUL": "%00",
        "snowman": "%E2%98%83",
        "4000-chars": "j" * 4000,
        "dot-dot-slash": "%2e%2e%2f%2e%2e",
        "rq-key-prefix": "rq:job:x",
        "invalid-utf8": "%ff%fe",
        "CRLF": "a%0d%0aSet-Cookie:%20x=1",
        "space": "a%20b",
    }
    for name, jid in odd_jobs.items():
        cases += [
            Case(c, f"job-id-{name}-GET", lambda w, j=jid: [Req("GET", f"/jobs/{j}")], status="4xx"),
            Case(c, f"job-id-{name}-DELETE", lambda w, j=jid: [Req("DELETE", f"/jobs/{j}")], status="4xx"),
        ]

    def junk(w: World) -> None:
        import redis

        r = redis.Redis.from_url(w.redis_url or "")
        r.set("rq:job:hx-string", "not a hash")
        r.delete("rq:job:hx-list")
        r.rpush("rq:job:hx-list", "a", "b")
        r.hset(
            "rq:job:hx-hash",
            mapping={"status": "weird", "data": b"\x80\x04garbage", "created_at": "yesterday"},
        )
        for jid in ("hx-string", "hx-list", "hx-hash"):
            r.rpush("rq:queue:cosod-hostile-rq", jid)
            r.zadd("rq:wip:cosod-hostile-rq", {jid: 9e9})  # rq 2: the started registry
            r.zadd("rq:finished:cosod-hostile-rq", {jid: 9e9})

    def with_junk(req: Req) -> Any:
        def build(w: World) -> list[Req]:
            junk(w)
            return [req]

        return build

    cases += [
        Case(c, "non-hash-rq-job-key-GET", with_junk(Req("GET", "/jobs/hx-string")), status="4xx"),
        Case(c, "non-hash-rq-job-key-DELETE", with_junk(Req("DELETE", "/jobs/hx-string")), status="4xx"),
        Case(c, "list-rq-job-key-GET", with_junk(Req("GET", "/jobs/hx-list")), status="4xx"),
        Case(c, "garbage-hash-rq-job-GET", with_junk(Req("GET", "/jobs/hx-hash")), status="2xx|4xx"),
        Case(c, "garbage-hash-rq-job-DELETE", with_junk(Req("DELETE", "/jobs/hx-hash")), status="2xx|4xx"),
        Case(c, "list-jobs-with-junk-in-the-queue", with_junk(Req("GET", "/jobs")), status="2xx"),
        Case(
            c,
            "list-project-jobs-with-junk",
            lambda w: [Req("GET", f"/jobs?project={w.pid('B')}")],
            status="2xx",
        ),
    ]
    ums = {"project": "880003.1795340308", "extra_params": {"model": "ums"}}
    cases += [
        Case(
            c,
            "setup-model-ums-without-a-checkpoint",
            lambda w: [Req("POST", "/setup", json={**ums, "schema": w.configs["B"]})],
            check=names_setting("COSOD_UMS_CHECKPOINT"),
        ),
        Case(
            c,
            "setup-model-ums-as-a-json-string",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={
                        **ums,
                        "project": "880004.1795340308",
                        "schema": w.configs["B"],
                        "extra_params": '{"model": "ums"}',
                    },
                )
            ],
            check=names_setting("COSOD_UMS_CHECKPOINT"),
        ),
        Case(
            c,
            "setup-model-unknown",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={
                        "project": "880005.1795340308",
                        "schema": w.configs["B"],
                        "extra_params": {"model": "sam"},
                    },
                )
            ],
        ),
        # after all of the above (some of which the backend may have remembered), every project's versions
        Case(c, "versions-of-every-project-afterwards", lambda w: [Req("GET", "/versions")], status="2xx"),
    ]
    return cases


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="", errors="surrogatepass")


# -- 7. amplification -------------------------------------------------------------------------------------
def amplification() -> list[Case]:
    c = "7-amplification"
    small_log = 1024 * 1024
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lollollollollollollollollollol">'
        + "".join(
            f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
        )
        + ']><View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="&lol9;"/></BrushLabels></View>'
    )
    return [
        Case(
            c,
            "task-image-20MB-upload-path",
            lambda w: [predict(w, "B", [fake_task(10, "/data/upload/" + "A" * MB20)])],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
            check=refused(),
        ),
        Case(
            c,
            "task-image-20MB-foreign-url",
            lambda w: [predict(w, "B", [fake_task(11, "https://evil.example/" + "A" * MB20)])],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
            check=refused(),
        ),
        Case(
            c,
            "task-group-20MB",
            lambda w: [predict(w, "B", [fake_task(12, "/data/local-files/?d=imgs/a.png", "G" * MB20)])],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
        ),
        Case(
            c,
            "task-data-10k-keys",
            lambda w: [
                predict(
                    w,
                    "B",
                    [
                        {
                            "id": BIG_ID + 13,
                            "data": {
                                "image": "/data/local-files/?d=imgs/a.png",
                                **{f"k{i}": i for i in range(10_000)},
                            },
                        }
                    ],
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "webhook-image-url-20MB",
            lambda w: [
                webhook(
                    annotation_event(
                        w, aid=9_200_001, data={"image": "/data/upload/" + "A" * MB20, "group": "g"}
                    )
                )
            ],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
        ),
        Case(
            c,
            "20k-brushlabels-controls-setup-and-predict",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={"project": proj(w, "E"), "schema": brush_config(n_controls=20_000)},
                    status="2xx|4xx",
                ),
                predict(
                    w,
                    "E",
                    [{"id": w.tasks["E"][0], "data": data_of(w, w.tasks["E"][0])}],
                    label_config=brush_config(n_controls=20_000),
                ),
            ],
            status="2xx|4xx",
            max_bytes=1024 * 1024,
            seconds=30.0,
        ),
        Case(
            c,
            "20k-labels-in-one-control",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={"project": "880010.1795340308", "schema": brush_config(n_labels=20_000)},
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "schema-billion-laughs",
            lambda w: [Req("POST", "/setup", json={"project": "880011.1795340308", "schema": bomb})],
            seconds=FAST_SECONDS,
        ),
        Case(
            c,
            "schema-100k-deep-xml",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={
                        "project": "880012.1795340308",
                        "schema": "<View>" + "<V>" * 100_000 + "</V>" * 100_000 + "</View>",
                    },
                )
            ],
            seconds=FAST_SECONDS,
        ),
        Case(
            c,
            "schema-20MB",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={
                        "project": "880013.1795340308",
                        "schema": w.configs["B"].replace("<View>", "<View><!--" + "x" * MB20 + "-->"),
                    },
                )
            ],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
        ),
        Case(
            c,
            "access-token-20MB",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={"project": proj(w, "B"), "schema": w.configs["B"], "access_token": "T" * MB20},
                )
            ],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
        ),
        Case(
            c,
            "predict-context-20MB",
            lambda w: [
                predict(
                    w,
                    "B",
                    [fake_task(14, "/data/local-files/?d=imgs/a.png")],
                    params={"context": {"x": "C" * MB20}},
                )
            ],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
        ),
        Case(
            c,
            "prelabel-100k-unknown-groups",
            lambda w: [
                Req(
                    "POST",
                    "/jobs/prelabel",
                    json={"project": w.pid("B"), "groups": [f"nope-{k}" for k in range(100_000)]},
                )
            ],
            status="4xx",
            seconds=30.0,
        ),
        Case(
            c,
            "prelabel-group-name-20MB",
            lambda w: [Req("POST", "/jobs/prelabel", json={"project": w.pid("B"), "groups": ["N" * MB20]})],
            status="4xx",
            log_bytes=small_log,
            seconds=30.0,
        ),
        Case(
            c,
            "prelabel-group-by-20MB",
            lambda w: [
                Req("POST", "/jobs/prelabel", json={"project": w.pid("B"), "group_by": "field:" + "F" * MB20})
            ],
            status="2xx|4xx",
            log_bytes=small_log,
            seconds=30.0,
        ),
    ]


# -- 8. presign across projects, and the redirect -----------------------------------------------------------
def presign() -> list[Case]:
    c = "8-presign"

    def task_of_a(w: World, image: str | None = None, tid: int | None = None) -> dict[str, Any]:
        tid = w.s3_task if tid is None else tid
        return {"id": tid, "data": {"image": image or "s3://canary/a.png", "group": "cloud"}}

    return [
        Case(
            c,
            "project-B-names-a-cloud-task-of-A",
            lambda w: [predict(w, "B", [task_of_a(w)])],
            status="2xx|4xx",
            check=both(refused(), no_canary),
        ),
        Case(
            c,
            "project-B-names-an-upload-task-of-A",
            lambda w: [predict(w, "B", [{"id": w.tasks["A"][0], "data": data_of(w, w.tasks["A"][0])}])],
            status="2xx|4xx",
            check=refused(),
        ),
        Case(
            c,
            "project-A-own-cloud-task-redirect-carries-no-cookie",
            lambda w: [predict(w, "A", [task_of_a(w)])],
            status="2xx|4xx",
            check=canary_clean,
        ),
        Case(
            c,
            "cloud-uri-of-an-unknown-bucket",
            lambda w: [predict(w, "A", [task_of_a(w, "s3://not-ours/x.png")])],
            status="2xx|4xx",
            check=both(refused(), no_canary),
        ),
        Case(
            c,
            "cloud-uri-on-a-task-Label-Studio-lacks",
            lambda w: [predict(w, "B", [task_of_a(w, tid=BIG_ID + 20)])],
            status="2xx|4xx",
            check=both(refused(), no_canary),
        ),
        Case(
            c,
            "presign-path-as-the-image",
            lambda w: [
                predict(
                    w, "B", [fake_task(21, f"/tasks/{w.s3_task}/presign/?fileuri=czM6Ly9jYW5hcnkvYS5wbmc=")]
                )
            ],
            status="2xx|4xx",
            check=both(refused(), no_canary),
        ),
        Case(
            c,
            "resolve-path-of-another-project",
            lambda w: [
                predict(
                    w, "B", [fake_task(22, f"/tasks/{w.s3_task}/resolve/?fileuri=czM6Ly9jYW5hcnkvYS5wbmc=")]
                )
            ],
            status="2xx|4xx",
            check=both(refused(), no_canary),
        ),
    ]


# -- 9. basic auth ------------------------------------------------------------------------------------------
def auth() -> list[Case]:
    c = "9-auth"

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    def routes(w: World) -> list[Req]:
        return [
            Req("GET", "/"),
            Req("GET", "/health"),
            Req("POST", "/setup", json={"project": proj(w, "B"), "schema": w.configs["B"]}),
            predict(w, "B", [{"id": w.tasks["B"][0], "data": data_of(w, w.tasks["B"][0])}]),
            webhook({"action": "START_TRAINING", "project": {"id": w.pid("B")}}),
            Req("GET", "/versions"),
            Req("GET", "/metrics"),
            Req("POST", "/jobs/prelabel", json={"project": w.pid("B")}),
            Req("GET", "/jobs"),
            Req("GET", "/jobs/prelabel-p1-x"),
            Req("DELETE", "/jobs/prelabel-p1-x"),
            Req("GET", "/no-such-route"),
        ]

    names = [
        "root",
        "health",
        "setup",
        "predict",
        "webhook",
        "versions",
        "metrics",
        "prelabel",
        "list-jobs",
        "get-job",
        "delete-job",
        "unknown-route",
    ]
    creds = {
        "no-credentials": {},
        "wrong-password": {"Authorization": "Basic " + b64(b"hostile-user:guess")},
    }
    cases: list[Case] = []
    for cred, headers in creds.items():
        for k, name in enumerate(names):

            def build(w: World, k: int = k, headers: dict[str, str] = headers) -> list[Req]:
                r = routes(w)[k]
                return [Req(r.method, r.path, json=r.json, headers=headers, auth="none")]

            if name in ("root", "health"):
                cases.append(
                    Case(
                        c,
                        f"{name}-{cred}",
                        build,
                        status="200|401|503",
                        allow_503=True,
                        check=says_nothing_internal,
                        config="auth",
                    )
                )
            else:
                cases.append(
                    Case(
                        c,
                        f"{name}-{cred}",
                        build,
                        status="401|404" if name == "unknown-route" else "401",
                        config="auth",
                    )
                )
    odd = {
        "label-studio-token-scheme": "Token 0123456789abcdef0123456789abcdef01234567",
        "bearer": "Bearer " + "a" * 40,
        "basic-not-base64": "Basic !!!not-base64!!!",
        "basic-without-colon": "Basic " + b64(b"hostile-user"),
        "basic-non-utf8": "Basic " + b64(b"\xff\xfe:\xff"),
        "basic-empty-password": "Basic " + b64(b"hostile-user:"),
        "basic-user-in-upper-case": "Basic " + b64(b"HOSTILE-USER:hostile-pass-7d41a0"),
        "basic-8KB": "Basic " + b64(b"hostile-user:" + b"x" * 6000),
        "basic-lowercase-scheme-wrong": "basic " + b64(b"hostile-user:nope"),
        "two-authorization-values": "Basic "
        + b64(b"x:y")
        + ", Basic "
        + b64(b"hostile-user:hostile-pass-7d41a0"),
    }
    for name, value in odd.items():
        cases.append(
            Case(
                c,
                f"predict-{name}",
                lambda w, v=value: [
                    Req(
                        "POST",
                        "/predict",
                        json={
                            "project": proj(w, "B"),
                            "tasks": [{"id": w.tasks["B"][0], "data": data_of(w, w.tasks["B"][0])}],
                        },
                        headers={"Authorization": v},
                        auth="none",
                    )
                ],
                status="401|400|431",
                config="auth",
            )
        )
    cases.append(
        Case(c, "health-with-credentials", lambda w: [Req("GET", "/health")], status="200", config="auth")
    )
    return cases


# -- 10. small ones: local files, other projects' tasks, unknown projects ------------------------------------
def small_ones() -> list[Case]:
    c = "10-small"
    files = {
        "symlink-out-of-the-root": "/data/local-files/?d=imgs/link-out.png",
        "symlink-to-etc-passwd": "/data/local-files/?d=imgs/link-passwd",
        "symlink-to-a-dir-outside": "/data/local-files/?d=imgs/link-dir/secret.png",
        "symlink-loop": "/data/local-files/?d=imgs/link-loop",
        "prefix-local-filesX": "/data/local-filesX/?d=imgs/a.png",
        "sibling-dir-sharing-the-prefix": "/data/local-files/?d=../filesX/a.png",
        "absolute-path": "/data/local-files/?d=/etc/passwd",
        "encoded-dot-dot": "/data/local-files/?d=%2e%2e/outside/secret.png",
        "NUL-in-the-name": "/data/local-files/?d=imgs/a.png%00.txt",
        "a-directory": "/data/local-files/?d=imgs",
        "missing-file": "/data/local-files/?d=imgs/missing.png",
        "empty-d": "/data/local-files/?d=",
        "no-d": "/data/local-files/",
    }
    cases = [
        Case(
            c,
            name,
            lambda w, u=url, k=k: [predict(w, "B", [fake_task(30 + k, u)])],
            status="2xx|4xx",
            check=refused(),
        )
        for k, (name, url) in enumerate(files.items())
    ]
    cases += [
        Case(
            c,
            "not-an-image-file",
            lambda w: [predict(w, "B", [fake_task(50, "/data/local-files/?d=imgs/not-an-image.png")])],
            status="2xx|4xx",
            check=refused(),
        ),
        Case(
            c,
            "a-real-local-file-control",
            lambda w: [predict(w, "B", [fake_task(51, "/data/local-files/?d=imgs/a.png")])],
            status="2xx|4xx",
        ),
        Case(
            c,
            "correction-for-a-task-of-another-project",
            lambda w: [
                webhook(
                    annotation_event(
                        w,
                        key="B",
                        aid=9_300_001,
                        tid=w.tasks["A"][0],
                        result=[brush(rle_runs([(0, 12288)]), 64, 48)],
                    )
                )
            ],
            status="2xx|4xx",
            check=not_stored("B", 9_300_001),
        ),
        Case(
            c,
            "correction-for-a-project-never-set-up",
            lambda w: [
                webhook(
                    annotation_event(
                        w,
                        aid=9_300_002,
                        project={"id": 770_002},
                        result=[brush(rle_runs([(0, 12288)]), 64, 48)],
                    )
                )
            ],
            status="2xx|4xx",
            check=lambda w, r: (
                []
                if not read_corrections(w.model_dir, 770_002)
                else ["a correction was stored for project 770002"]
            ),
        ),
        Case(
            c,
            "correction-whose-task-names-another-project",
            lambda w: [
                webhook(
                    {
                        **annotation_event(w, aid=9_300_003, result=[brush(rle_runs([(0, 12288)]), 64, 48)]),
                        "task": {
                            "id": w.tasks["B"][0],
                            "project": w.pid("B"),
                            "data": data_of(w, w.tasks["B"][0]),
                        },
                    }
                )
            ],
            status="2xx|4xx",
            check=not_stored("A", 9_300_003),
        ),
    ]
    return cases


# -- 11. bodies ---------------------------------------------------------------------------------------------
def bodies() -> list[Case]:
    c = "11-bodies"
    cases: list[Case] = []

    def valid(w: World, route: str) -> dict[str, Any]:
        return {
            "/setup": {"project": proj(w, "B"), "schema": w.configs["B"]},
            "/predict": {
                "project": proj(w, "B"),
                "tasks": [fake_task(60, "/data/local-files/?d=imgs/a.png")],
            },
            "/webhook": {"action": "PROJECT_UPDATED", "project": {"id": w.pid("B")}},
            "/jobs/prelabel": {"project": w.pid("B")},
        }[route]

    plain: dict[str, tuple[bytes, str]] = {
        "empty": (b"", "4xx"),
        "null": (b"null", "4xx"),
        "list": (b"[]", "4xx"),
        "number": (b"1", "4xx"),
        "string": (b'"x"', "4xx"),
        "true": (b"true", "4xx"),
        "truncated": (b'{"project": ', "4xx"),
        "invalid-utf8": (b'{"project": "\xff\xfe"}', "4xx"),
        "NaN-project": (b'{"project": NaN}', "4xx"),
        "empty-object": (b"{}", "4xx"),
        "form-encoded": (b"project=1&schema=x", "4xx"),
        "NUL-bytes": (b"\x00" * 64, "4xx"),
    }
    for route in ("/setup", "/predict", "/webhook", "/jobs/prelabel"):
        for name, (body, spec) in plain.items():
            cases.append(
                Case(
                    c,
                    f"{name}{route.replace('/', '-')}",
                    lambda w, r=route, b=body: [Req("POST", r, body=b)],
                    status=spec,
                )
            )
        cases += [
            Case(
                c,
                f"duplicate-keys{route.replace('/', '-')}",
                lambda w, r=route: [Req("POST", r, body=_dup(valid(w, r)))],
                status="2xx|4xx",
            ),
            Case(
                c,
                f"utf8-bom{route.replace('/', '-')}",
                lambda w, r=route: [Req("POST", r, body=b"\xef\xbb\xbf" + json.dumps(valid(w, r)).encode())],
                status="2xx|4xx",
            ),
            Case(
                c,
                f"utf16{route.replace('/', '-')}",
                lambda w, r=route: [Req("POST", r, body=json.dumps(valid(w, r)).encode("utf-16"))],
                status="2xx|4xx",
            ),
            Case(
                c,
                f"text-plain{route.replace('/', '-')}",
                lambda w, r=route: [
                    Req(
                        "POST",
                        r,
                        body=json.dumps(valid(w, r)).encode(),
                        headers={"Content-Type": "text/plain"},
                    )
                ],
                status="2xx|4xx",
            ),
            Case(
                c,
                f"null-everywhere{route.replace('/', '-')}",
                lambda w, r=route: [Req("POST", r, json=dict.fromkeys(valid(w, r)))],
                status="4xx",
            ),
        ]
    cases += [
        Case(
            c,
            "declared-257MiB-sent-1MiB",
            lambda w: [Req("POST", "/webhook", stream=(257 * 1024 * 1024, 1024 * 1024))],
            seconds=FAST_SECONDS * 2,
        ),
        Case(
            c,
            "declared-10^20-bytes",
            lambda w: [Req("POST", "/predict", stream=(10**20, 0))],
            seconds=FAST_SECONDS,
        ),
        Case(
            c,
            "200MiB-body-under-the-limit",
            lambda w: [
                Req(
                    "POST",
                    "/webhook",
                    json={"action": "PROJECT_UPDATED", "project": {"id": w.pid("B")}},
                    stream=(200 * 1024 * 1024, 200 * 1024 * 1024),
                )
            ],
            status="2xx|4xx",
            seconds=60.0,
            note="whitespace then a valid event: the body is read and parsed whole",
        ),
        Case(
            c,
            "webhook-rle-of-a-1024x1024-noise-mask",
            lambda w: [
                webhook(annotation_event(w, aid=9_400_001, result=[brush(_noise_rle(1024), 1024, 1024)]))
            ],
            status="2xx|4xx",
            seconds=15.0,
            note="the largest honest correction (4 MB of RLE): must still be handled",
        ),
    ]
    return cases


def _dup(obj: dict[str, Any]) -> bytes:
    first = next(iter(obj))
    text = json.dumps(obj)
    return ("{" + json.dumps(first) + ": [1, 2, 3], " + text[1:]).encode()


def _noise_rle(side: int) -> list[int]:
    import numpy as np

    from backend.labelstudio.regions import mask_to_rle

    return mask_to_rle(np.random.default_rng(5).random((side, side)) < 0.5)


# -- 12. wrong types for every field -------------------------------------------------------------------------
def types() -> list[Case]:
    c = "12-types"
    cases: list[Case] = []
    setup_fields = {
        "schema-number": {"schema": 1},
        "schema-list": {"schema": []},
        "schema-object": {"schema": {}},
        "schema-empty": {"schema": ""},
        "schema-not-xml": {"schema": "<View"},
        "schema-wrong-root-only": {"schema": "<View/>"},
        "extra-params-number": {"extra_params": 1},
        "extra-params-list": {"extra_params": []},
        "extra-params-bad-json-string": {"extra_params": "{not json"},
        "extra-params-group-by-number": {"extra_params": {"group_by": 5}},
        "extra-params-group-by-empty-field": {"extra_params": {"group_by": "field:"}},
        "extra-params-label-object": {"extra_params": {"label": {}}},
        "extra-params-label-unknown": {"extra_params": {"label": "NoSuchLabel"}},
        "extra-params-model-null": {"extra_params": {"model": None}},
    }
    for k, (name, fields) in enumerate(setup_fields.items()):
        cases.append(
            Case(
                c,
                f"setup-{name}",
                lambda w, f=fields, k=k: [
                    Req(
                        "POST",
                        "/setup",
                        json={"project": f"{880100 + k}.1795340308", "schema": w.configs["B"], **f},
                    )
                ],
            )
        )
    cases += [
        Case(
            c,
            "setup-access-token-types",
            lambda w: [
                Req(
                    "POST",
                    "/setup",
                    json={"project": proj(w, "B"), "schema": w.configs["B"], "access_token": [1]},
                )
            ],
            status="2xx|4xx",
        ),
        Case(c, "setup-without-project", lambda w: [Req("POST", "/setup", json={"schema": w.configs["B"]})]),
    ]
    predict_tasks: dict[str, Any] = {
        "tasks-object": {},
        "tasks-string": "x",
        "tasks-empty": [],
        "tasks-null-item": [None],
        "tasks-nested-list": [[]],
        "task-without-data": [{"id": BIG_ID + 70}],
        "task-data-a-list": [{"id": BIG_ID + 71, "data": []}],
        "task-without-id": [{"data": {"image": "/data/local-files/?d=imgs/a.png"}}],
        "task-id-a-word": [{"id": "abc", "data": {"image": "/data/local-files/?d=imgs/a.png"}}],
        "task-id-an-object-of-an-object": [{"id": {"id": {"id": 1}}, "data": {}}],
    }
    for name, tasks in predict_tasks.items():
        cases.append(
            Case(
                c,
                f"predict-{name}",
                lambda w, t=tasks: [Req("POST", "/predict", json={"project": proj(w, "B"), "tasks": t})],
            )
        )
    image_types = {
        "image-number": 5,
        "image-null": None,
        "image-object": {"url": "/data/local-files/?d=imgs/a.png"},
        "image-list": ["/data/local-files/?d=imgs/a.png"],
        "image-empty": "",
    }
    for k, (name, image) in enumerate(image_types.items()):
        cases.append(
            Case(
                c,
                f"predict-{name}",
                lambda w, i=image, k=k: [predict(w, "B", [fake_task(80 + k, i)])],
                status="2xx|4xx",
                check=refused(),
            )
        )
    cases += [
        Case(
            c,
            "predict-label-config-number",
            lambda w: [predict(w, "B", [fake_task(90, "/data/local-files/?d=imgs/a.png")], label_config=5)],
        ),
        Case(
            c,
            "predict-label-config-without-a-brush",
            lambda w: [
                Req(
                    "POST",
                    "/predict",
                    json={
                        "project": "880200.1795340308",
                        "label_config": "<View><Image name='i' value='$image'/></View>",
                        "tasks": [fake_task(91, "/data/local-files/?d=imgs/a.png")],
                    },
                )
            ],
        ),
        Case(
            c,
            "predict-params-a-string",
            lambda w: [predict(w, "B", [fake_task(92, "/data/local-files/?d=imgs/a.png")], params="x")],
            status="2xx|4xx",
        ),
        Case(
            c,
            "predict-context-a-list",
            lambda w: [
                predict(
                    w, "B", [fake_task(93, "/data/local-files/?d=imgs/a.png")], params={"context": [1, 2]}
                )
            ],
            status="2xx|4xx",
        ),
        Case(
            c,
            "predict-unknown-project-no-config",
            lambda w: [
                Req(
                    "POST",
                    "/predict",
                    json={
                        "project": "880201.1795340308",
                        "tasks": [fake_task(94, "/data/local-files/?d=imgs/a.png")],
                    },
                )
            ],
        ),
    ]
    webhook_shapes: dict[str, Any] = {
        "annotation-a-string": lambda w: {**annotation_event(w, aid=1), "annotation": "x"},
        "annotation-a-list": lambda w: {**annotation_event(w, aid=1), "annotation": []},
        "annotation-without-id": lambda w: {**annotation_event(w, aid=1), "annotation": {"result": []}},
        "task-a-string": lambda w: {**annotation_event(w, aid=9_500_001), "task": "x"},
        "task-data-a-string": lambda w: {
            **annotation_event(w, aid=9_500_002),
            "task": {"id": w.tasks["A"][3], "data": "x"},
        },
        "task-data-without-an-image": lambda w: {**annotation_event(w, aid=9_500_003, data={"foo": 1})},
        "project-a-string": lambda w: {**annotation_event(w, aid=9_500_004), "project": "abc"},
        "project-a-list": lambda w: {**annotation_event(w, aid=9_500_005), "project": []},
        "project-id-an-object": lambda w: {**annotation_event(w, aid=9_500_006), "project": {"id": {}}},
        "result-an-object": lambda w: annotation_event(w, aid=9_500_007, result={"type": "brushlabels"}),
        "result-list-of-strings": lambda w: annotation_event(w, aid=9_500_008, result=["x", 1, None]),
        "region-value-a-list": lambda w: annotation_event(
            w, aid=9_500_009, result=[{"type": "brushlabels", "value": []}]
        ),
        "region-type-a-list": lambda w: annotation_event(
            w, aid=9_500_010, result=[{"type": ["brushlabels"], "value": {}}]
        ),
        "was-cancelled-a-string": lambda w: {
            **annotation_event(w, aid=9_500_011),
            "annotation": {"id": 9_500_011, "task": w.tasks["A"][3], "was_cancelled": "no", "result": []},
        },
        "updated-at-an-object": lambda w: {
            **annotation_event(w, aid=9_500_012),
            "annotation": {"id": 9_500_012, "task": w.tasks["A"][3], "updated_at": {"x": 1}, "result": []},
        },
        "start-training-without-project": lambda w: {"action": "START_TRAINING"},
        "start-training-project-a-word": lambda w: {"action": "START_TRAINING", "project": {"id": "abc"}},
    }
    for name, make in webhook_shapes.items():
        cases.append(Case(c, f"webhook-{name}", lambda w, m=make: [webhook(m(w))], status="2xx|4xx"))
    prelabel_fields = {
        "group-by-number": {"group_by": 5},
        "group-by-empty-field": {"group_by": "field:"},
        "group-by-nonsense": {"group_by": "by-magic"},
        "groups-a-string": {"groups": "x"},
        "groups-numbers": {"groups": [1, 2]},
        "groups-nested": {"groups": [[]]},
        "unknown-field": {"priority": "high"},
    }
    for name, fields in prelabel_fields.items():
        cases.append(
            Case(
                c,
                f"prelabel-{name}",
                lambda w, f=fields: [Req("POST", "/jobs/prelabel", json={"project": w.pid("B"), **f})],
            )
        )
    return cases


# -- 13. server-side request forgery through task URLs -------------------------------------------------------
def ssrf() -> list[Case]:
    c = "13-ssrf"

    def urls(w: World) -> dict[str, str]:
        cp = w.canary.port
        ls = w.ls.url.split("://", 1)[1]
        return {
            "file-scheme": "file:///etc/passwd",
            "gopher-to-redis": "gopher://127.0.0.1:6379/_FLUSHALL",
            "cloud-metadata": "http://169.254.169.254/latest/meta-data/",
            "loopback": f"http://127.0.0.1:{cp}/x.png",
            "localhost": f"http://localhost:{cp}/x.png",
            "decimal-ip": f"http://2130706433:{cp}/x.png",
            "hex-ip": f"http://0x7f000001:{cp}/x.png",
            "short-ip": f"http://127.1:{cp}/x.png",
            "ipv6-loopback": f"http://[::1]:{cp}/x.png",
            "ipv4-mapped-ipv6": f"http://[::ffff:127.0.0.1]:{cp}/x.png",
            "userinfo-ls-then-canary": f"http://{ls}@127.0.0.1:{cp}/x.png",
            "backslash-userinfo": f"http://127.0.0.1:{cp}\\@{ls}/data/upload/x.png",
            "fragment-at": f"http://{ls}#@127.0.0.1:{cp}/x.png",
            "scheme-relative": f"//127.0.0.1:{cp}/x.png",
            "slash-backslash": f"/\\127.0.0.1:{cp}/x.png",
            "upper-case-scheme": f"HTTP://127.0.0.1:{cp}/x.png",
            "leading-spaces": f"   http://127.0.0.1:{cp}/x.png",
            "data-uri": "data:image/png;base64,iVBORw0KGgo=",
            "encoded-traversal-to-the-api": "/data/upload/%2e%2e/%2e%2e/api/projects",
            "double-encoded-traversal": "/data/upload/%252e%252e/%252e%252e/api/projects",
            "traversal-to-the-api": "/data/upload/../../api/projects",
            "ls-host-api-path": f"http://{ls}/api/projects",
            "storage-data-traversal": "/storage-data/uploaded/?filepath=../../../../etc/passwd",
            "upload-prefix-without-slash": "upload/../../api/current-user/whoami",
        }

    names = [
        "file-scheme",
        "gopher-to-redis",
        "cloud-metadata",
        "loopback",
        "localhost",
        "decimal-ip",
        "hex-ip",
        "short-ip",
        "ipv6-loopback",
        "ipv4-mapped-ipv6",
        "userinfo-ls-then-canary",
        "backslash-userinfo",
        "fragment-at",
        "scheme-relative",
        "slash-backslash",
        "upper-case-scheme",
        "leading-spaces",
        "data-uri",
        "encoded-traversal-to-the-api",
        "double-encoded-traversal",
        "traversal-to-the-api",
        "ls-host-api-path",
        "storage-data-traversal",
        "upload-prefix-without-slash",
    ]
    return [
        Case(
            c,
            name,
            lambda w, n=name, k=k: [predict(w, "B", [fake_task(100 + k, urls(w)[n])])],
            status="2xx|4xx",
            check=both(refused(), no_canary),
            seconds=20.0,
        )
        for k, name in enumerate(names)
    ]


# -- 14. HTTP oddities ---------------------------------------------------------------------------------------
def http_oddities() -> list[Case]:
    c = "14-http"
    return [
        Case(c, "OPTIONS-predict", lambda w: [Req("OPTIONS", "/predict")], status="2xx|4xx"),
        Case(c, "TRACE-root", lambda w: [Req("TRACE", "/")], status="4xx"),
        Case(c, "PUT-setup", lambda w: [Req("PUT", "/setup", json={})], status="4xx"),
        Case(c, "PATCH-webhook", lambda w: [Req("PATCH", "/webhook", json={})], status="4xx"),
        Case(c, "GET-predict", lambda w: [Req("GET", "/predict")], status="4xx"),
        Case(c, "POST-health", lambda w: [Req("POST", "/health", json={})], status="4xx"),
        Case(c, "POST-versions", lambda w: [Req("POST", "/versions", json={"project": 1})], status="4xx"),
        Case(c, "HEAD-metrics", lambda w: [Req("HEAD", "/metrics")], status="2xx"),
        Case(
            c,
            "header-64KB",
            lambda w: [Req("GET", "/health", headers={"X-Hostile": "h" * 65536})],
            status="4xx",
        ),
        Case(
            c,
            "200-headers",
            lambda w: [Req("GET", "/health", headers={f"X-H{k}": "v" for k in range(200)})],
            status="2xx|4xx",
        ),
        Case(c, "malformed-percent-escape", lambda w: [Req("GET", "/jobs/%zz")], status="4xx"),
        Case(c, "encoded-traversal-path", lambda w: [Req("GET", "/..%2f..%2fetc/passwd")], status="4xx"),
        Case(c, "double-slash", lambda w: [Req("GET", "//health")], status="2xx|4xx"),
        Case(c, "trailing-slash", lambda w: [Req("GET", "/health/")], status="2xx|4xx"),
        Case(c, "long-query-string", lambda w: [Req("GET", "/health?" + "a=1&" * 900)], status="2xx|4xx"),
        Case(
            c,
            "versions-repeated-project",
            lambda w: [Req("GET", f"/versions?project={w.pid('A')}&project=abc")],
            status="2xx|4xx",
        ),
        Case(
            c,
            "content-type-xml",
            lambda w: [Req("POST", "/setup", body=b"<View/>", headers={"Content-Type": "application/xml"})],
            status="4xx",
        ),
        Case(
            c,
            "multipart-body",
            lambda w: [
                Req(
                    "POST",
                    "/predict",
                    body=b'--b\r\nContent-Disposition: form-data; name="tasks"\r\n\r\nx\r\n--b--\r\n',
                    headers={"Content-Type": "multipart/form-data; boundary=b"},
                )
            ],
            status="4xx",
        ),
    ]


def metrics_breaker() -> list[Case]:
    """Run after every other case of its configuration: on a backend that lets a lone surrogate into a label
    value, /metrics answers 500 from then on (and HEAD /metrics with it)."""
    metrics = Req("GET", "/metrics", status="200")
    return [
        Case(
            "4-metrics-injection",
            "action-lone-surrogate",
            lambda w: [
                webhook({"action": "\ud800", "project": {"id": w.pid("B")}}, status="2xx|4xx"),
                metrics,
            ],
            check=metrics_sane,
            max_bytes=METRICS_MAX_BYTES,
            status="2xx|4xx",
        )
    ]


# -- 15. integrity at the end of a configuration -------------------------------------------------------------
def integrity() -> list[Case]:
    c = "15-integrity"

    def intact(w: World) -> list[str]:
        import requests

        now = read_corrections(w.model_dir, w.pid("A"))
        out = []
        for aid, row in w.genuine.items():
            if aid not in now:
                out.append(f"genuine correction {aid} is gone")
            elif now[aid] != row:
                out.append(f"genuine correction {aid} changed: {row[:6]} -> {now[aid][:6]}")
        r = requests.get(f"{w.url}/versions?project={w.pid('A')}", auth=w.auth, timeout=60)
        if r.status_code != 200 or not r.json().get("projects"):
            out.append(f"GET /versions?project=A answered {r.status_code}: {r.text[:200]}")
        return out

    def total_rss(w: World) -> list[str]:
        if w.restarts:
            return [
                f"the test had to restart the worker (after {', '.join(w.restarts)}): growth not measurable"
            ]
        grown = rss_mb(descendants(w.master)) - w.start_rss
        if grown > RSS_TOTAL_MB:
            return [f"worker RSS grew by {grown:.0f} MB over the configuration > {RSS_TOTAL_MB:.0f} MB"]
        return []

    cases = [Case(c, "genuine-corrections-intact", act=intact, seconds=60.0)]
    for config in ("rq", "down", "auth"):
        cases.append(Case(c, f"total-rss-growth-{config}", act=total_rss, config=config))
    return cases


CASES: list[Case] = [
    *poisoned(),
    *unbounded_predict(),
    *forged_deletions(),
    *metrics_injection(),
    *credentials_echoed(),
    *five_hundreds(),
    *amplification(),
    *presign(),
    *auth(),
    *small_ones(),
    *bodies(),
    *types(),
    *ssrf(),
    *http_oddities(),
    *metrics_breaker(),
    *integrity(),
]


def ordered(config: str) -> list[Case]:
    """A configuration's cases in run order: the table's, heavy ones last, the integrity checks after them."""
    mine = [c for c in CASES if c.config == config]
    last = [c for c in mine if c.category.startswith("15-")]
    heavy = [c for c in mine if c.heavy]
    rest = [c for c in mine if c not in last and c not in heavy]
    return rest + heavy + last


# -- pytest glue ---------------------------------------------------------------------------------------------
OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="class")
def world(request: pytest.FixtureRequest, label_studio: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.e2e.conftest import run_worker

    config = request.cls.CONFIG
    if config == "rq":
        import redis

        try:
            redis.Redis(socket_connect_timeout=2).ping()
        except redis.RedisError as exc:
            pytest.skip(f"no Redis on 127.0.0.1:6379 ({exc})")
    base = tmp_path_factory.mktemp(f"hostile-{config}")
    with open_world(
        config,
        label_studio,
        base,
        run_worker=run_worker,
        basetemp=tmp_path_factory.getbasetemp(),
    ) as w:
        yield w


def _run(w: World, case: Case) -> None:
    outcome = run_case(w, case)
    OUTCOMES.append(outcome)
    if outcome.problems:
        pytest.fail(outcome.message(), pytrace=False)


class TestRedis:
    """Redis up (RQ mode): categories 1-4 and 6-15."""

    CONFIG = "rq"

    @pytest.mark.parametrize("case", ordered("rq"), ids=lambda c: c.id)
    def test_case(self, world: World, case: Case) -> None:
        _run(world, case)


class TestRedisDown:
    """REDIS_URL with a password, nothing listening: category 5."""

    CONFIG = "down"

    @pytest.mark.parametrize("case", ordered("down"), ids=lambda c: c.id)
    def test_case(self, world: World, case: Case) -> None:
        _run(world, case)


class TestBasicAuth:
    """BASIC_AUTH_USER/BASIC_AUTH_PASS set: category 9."""

    CONFIG = "auth"

    @pytest.mark.parametrize("case", ordered("auth"), ids=lambda c: c.id)
    def test_case(self, world: World, case: Case) -> None:
        _run(world, case)


def test_corpus_size() -> None:
    """At least 150 cases and every category of the issue present."""
    assert len(CASES) >= 150, len(CASES)
    assert {c.category.split("-")[0] for c in CASES} >= {str(k) for k in range(1, 11)}


def test_summary(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """The summary table of whatever ran (printed, and written under the pytest tmp dir)."""
    if not OUTCOMES:
        pytest.skip("no hostile case ran")
    table = summary(OUTCOMES)
    out = Path(tmp_path_factory.getbasetemp()) / "hostile" / "summary.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    (out.parent / "cases.tsv").write_text(per_case(OUTCOMES))
    with capsys.disabled():
        print(f"\nhostile input: {len(OUTCOMES)} cases (summary in {out})\n{table}")
