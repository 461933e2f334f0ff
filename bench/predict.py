"""Time of ``/predict`` for one task of a group, cold (the group is computed) and cached (its neighbours).

    python bench/predict.py                                   # tiny and ViT-S/8, a 16-image group
    python bench/predict.py --backbones tiny --group 16 --size 320 240

The backend runs in-process (Flask test client) against a small local HTTP server that plays Label Studio:
it lists the project's tasks and serves their PNGs, so the figures include image download and decoding,
grouping, the pipeline, RLE encoding and JSON. Without a pretrained file the backbone has random weights of
the real architecture (timing only).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import weights_for
from PIL import Image

from backend.api.app import create_app
from backend.settings import Settings
from cosod.data import synthetic_group

CONFIG = (Path(__file__).resolve().parent.parent / "label_config" / "brush_grouped.xml").read_text()
PROJECT = "1.1795340308"  # how Label Studio names project 1: "<id>.<created timestamp>"


def fake_label_studio(n: int, size: tuple[int, int]) -> tuple[ThreadingHTTPServer, list[dict]]:
    images, _ = synthetic_group(n, size=(size[1], size[0]), seed=0)
    files, tasks = {}, []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        files[f"/data/upload/1/img{i}.png"] = buf.getvalue()
        tasks.append(
            {"id": i + 1, "project": 1, "data": {"image": f"/data/upload/1/img{i}.png", "group": "g"}}
        )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path, _, query = self.path.partition("?")
            if path.rstrip("/") == "/api/tasks":
                first = "page=1" in query or "page=" not in query
                body = json.dumps({"tasks": tasks if first else [], "total": n}).encode()
                code = 200 if first else 404
            else:
                body, code = files.get(path, b""), 200 if path in files else 404
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, tasks


def measure(backbone: str, n: int, size: tuple[int, int]) -> dict[str, float]:
    server, tasks = fake_label_studio(n, size)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with tempfile.TemporaryDirectory() as scratch:
        wdir, note = weights_for(backbone, Path(scratch))
        settings = Settings(
            label_studio_url=url,
            label_studio_api_key="bench-token",
            backbone=backbone,
            weights_dir=wdir,
            model_dir=str(Path(scratch) / "model"),
            log_level="WARNING",
        )
        t0 = time.perf_counter()
        app = create_app(settings)
        if not app.extensions["cosod"]["loader"].wait(600):
            raise SystemExit(f"the pipeline did not load: {app.extensions['cosod']['loader'].error}")
        load = time.perf_counter() - t0
        client = app.test_client()
        client.post("/setup", json={"project": PROJECT, "schema": CONFIG})

        def predict(task: dict) -> float:
            t = time.perf_counter()
            r = client.post("/predict", json={"tasks": [task], "project": PROJECT, "label_config": CONFIG})
            assert r.status_code == 200 and "result" in r.get_json()["results"][0], r.get_json()
            return time.perf_counter() - t

        cold = predict(tasks[0])
        cached = [predict(t) for t in tasks[1:]]
    server.shutdown()
    print(
        f"{backbone:28s} group {n:3d} {size[0]}x{size[1]}: load {load:5.1f} s, cold {cold:6.2f} s, "
        f"cached median {1000 * statistics.median(cached):6.1f} ms (max {1000 * max(cached):.1f} ms)"
        f"  [{note}]"
    )
    return {"load": load, "cold": cold, "cached_median": statistics.median(cached), "cached_max": max(cached)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["tiny", "vit_small_patch8_224.dino"])
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--size", nargs=2, type=int, default=[320, 240], metavar=("W", "H"))
    args = p.parse_args()
    logging.disable(logging.INFO)
    print(f"/predict for one task of a {args.group}-image group, CPU")
    for name in args.backbones:
        measure(name, args.group, tuple(args.size))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
