"""Time to store one correction, as the webhook does it (target: well under Label Studio's 1 s budget).

    python bench/webhook.py                  # 200 ANNOTATION_CREATED events, 640x480 brush masks
    python bench/webhook.py --events 1000

Runs :func:`backend.learning.corrections.handle_event` on a real SQLite store in a temporary folder, with
RLE-encoded brush masks as Label Studio sends them, and prints the per-event time (max, p95, mean).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from backend.labelstudio.regions import brush_region
from backend.learning.corrections import handle_event
from backend.learning.store import Store
from backend.prediction.projects import ProjectRegistry
from backend.settings import Settings

CONFIG = (
    '<View><Image name="image" value="$img"/><BrushLabels name="tag" toName="image">'
    '<Label value="Object"/></BrushLabels></View>'
)


def payload(k: int, mask: np.ndarray) -> dict[str, object]:
    region = brush_region(mask, from_name="tag", to_name="image", label="Object", score=1.0, rid=f"r{k}")
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1000 + k, "result": [region], "updated_at": "2026-11-22T10:00:00.000000Z"},
        "task": {"id": k + 1, "data": {"img": f"/data/upload/12/{k}.png", "group": f"g{k % 5}"}},
        "project": {"id": 12},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    payloads = []
    for k in range(args.events):
        m = np.zeros((480, 640), bool)
        y, x = rng.integers(0, 300), rng.integers(0, 400)
        m[y : y + 150, x : x + 200] = True
        m |= rng.random((480, 640)) < 0.002  # a few brush specks
        payloads.append(payload(k, m))
    with tempfile.TemporaryDirectory() as tmp:
        ProjectRegistry(Settings(model_dir=tmp)).get(12, CONFIG, {})  # as /setup does: the project is known
        store = Store(tmp)
        times = []
        for body in payloads:
            t0 = time.perf_counter()
            handle_event(store, "ANNOTATION_CREATED", body, train_every=10)
            times.append(time.perf_counter() - t0)
        assert store.count_corrections(12) == args.events
    ms = np.array(times) * 1000
    print(
        f"{args.events} corrections stored: max {ms.max():.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, "
        f"mean {ms.mean():.1f} ms per event"
    )


if __name__ == "__main__":
    main()
