"""``cosod-backend``: talk to a running backend over its HTTP API (it never opens MODEL_DIR itself).

    cosod-backend [--backend URL] prelabel --project N [--group-by RULE] [--group NAME ...] [--wait]
    cosod-backend [--backend URL] jobs [--project N]
    cosod-backend [--backend URL] cancel JOB_ID
    cosod-backend [--backend URL] versions --project N
    cosod-backend [--backend URL] promote --project N --version NAME

The backend: ``--backend URL``, given before or after the sub-command (``cosod-backend jobs --backend URL``
works too), else the ``COSOD_BACKEND_URL`` environment variable, else ``http://127.0.0.1:9090``. Basic auth
comes from ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``, as for the server.

- ``versions`` (``GET /versions?project=N``): the project's versions with their held-out scores, ``*``
  marking the one that serves.
- ``promote`` (``POST /versions/promote``): makes a version the active one (roll back or forward); every
  backend process serves it from its next request. The base model's name rolls back to the base model.
- ``cancel`` (``DELETE /jobs/<id>``) says what it did in one line: ``canceled job X (was queued)``,
  ``job X is running: asked it to stop at its next progress step``, or ``job X had already finished:
  nothing to cancel``.

Exit codes: 0 done (``cancel``: the job is canceled or stopping); 1 some job failed or was canceled
(``prelabel --wait``, each reason printed), or ``cancel`` found nothing to cancel (the job had already
ended); 2 bad input or nothing to talk to (unknown project, version or job, backend or Redis unreachable),
with one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import requests

from ..errors import UsageError
from ..settings import Settings

FINAL = ("finished", "failed", "canceled", "stopped")


class Api:
    def __init__(self, url: str, auth: tuple[str, str] | None):
        self.url = url.rstrip("/")
        self.auth = auth

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            kw.setdefault("timeout", 120)
            resp = requests.request(method, self.url + path, auth=self.auth, **kw)
        except requests.RequestException as exc:
            raise UsageError(f"the backend at {self.url} is unreachable ({exc.__class__.__name__})") from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:200]}
        if resp.status_code >= 400:
            raise UsageError(f"{method} {path}: HTTP {resp.status_code}: {body.get('error', body)}")
        return body


def _wait(api: Api, ids: list[str], poll: float) -> int:
    from tqdm import tqdm

    final: dict[str, dict[str, Any]] = {}
    with tqdm(total=0, unit="img", desc="pre-annotating", dynamic_ncols=True) as bar:
        while True:
            done = total = 0
            for job_id in ids:
                info = final.get(job_id) or api.call("GET", f"/jobs/{job_id}")
                if info["status"] in FINAL:
                    final[job_id] = info
                prog = info.get("progress") or {}
                done += int(prog.get("done", 0))
                total += int(prog.get("total", 0))
            bar.total = total
            bar.n = done
            bar.set_postfix(jobs=f"{len(final)}/{len(ids)}")
            bar.refresh()
            if len(final) == len(ids):
                break
            time.sleep(poll)
    bad = {i: f for i, f in final.items() if f["status"] != "finished"}
    for job_id, info in bad.items():
        print(f"{job_id}: {info['status']}: {info.get('error')}", file=sys.stderr)
    return 1 if bad else 0


def _parser() -> argparse.ArgumentParser:
    backend_help = "the backend's URL (default: $COSOD_BACKEND_URL, else http://127.0.0.1:9090)"
    p = argparse.ArgumentParser(prog="cosod-backend", description="talk to a running cosod ML backend")
    p.add_argument("--backend", help=backend_help)
    # the same option after the sub-command; SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", default=argparse.SUPPRESS, help=backend_help)
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prelabel", parents=[common], help="pre-annotate a whole project, one job per group")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument(
        "--group-by",
        help="a grouping rule: project, field:<name>, filename:<regex>, similar[:<t>] (default: project's)",
    )
    pre.add_argument("--group", action="append", dest="groups", help="only this group (repeatable)")
    pre.add_argument("--wait", action="store_true", help="show a progress bar until every job ends")
    pre.add_argument("--poll", type=float, default=0.5, help="seconds between status polls (--wait)")
    ls = sub.add_parser("jobs", parents=[common], help="list jobs")
    ls.add_argument("--project", type=int)
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job (exit 1: nothing to cancel)")
    cancel.add_argument("job_id")
    ver = sub.add_parser("versions", parents=[common], help="a project's model versions with their scores")
    ver.add_argument("--project", type=int, required=True)
    pro = sub.add_parser("promote", parents=[common], help="make a version the active one")
    pro.add_argument("--project", type=int, required=True)
    pro.add_argument("--version", required=True)
    return p


def _versions(api: Api, project: int) -> int:
    body = api.call("GET", f"/versions?project={project}")
    found = [p for p in body.get("projects") or [] if p.get("project") == project]
    if not found:
        raise UsageError(
            f"project {project}: the backend at {api.url} lists no version of it (no /setup seen for it, "
            "or its model is still loading: see /health)"
        )
    info = found[0]
    records, active = info.get("versions") or [], info.get("active")
    if not records:
        print(f"project {project}: no fine-tuned version yet; the base model {active} serves")
        return 0
    metrics = ("iou", "max_f", "mae", "hce")
    print(
        f"  {'version':26s} {'status':10s} {'parent':28s} "
        + " ".join(f"{m:>7s}" for m in metrics)
        + "  decision"
    )
    for r in records:
        scores = [(r.get("scores") or {}).get(m) for m in metrics]
        shown = " ".join(f"{v:7.3f}" if isinstance(v, int | float) else f"{'-':>7s}" for v in scores)
        mark = "*" if r["version"] == active else " "
        print(
            f"{mark} {r['version']:26s} {r['status']:10s} {str(r.get('parent') or '-'):28s} {shown}  "
            f"{r.get('decision') or ''}"
        )
    return 0


def _cancel(api: Api, job_id: str) -> int:
    out = api.call("DELETE", f"/jobs/{job_id}")
    was, outcome = out.get("was"), out.get("outcome")
    if outcome == "canceled":
        print(f"canceled job {job_id} (was {was})")
        return 0
    if outcome == "stopping":
        print(f"job {job_id} is running: asked it to stop at its next progress step")
        return 0
    ended = {"finished": "had already finished", "failed": "had already failed"}.get(
        str(was), f"was already {was}"
    )
    print(f"job {job_id} {ended}: nothing to cancel")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        url = args.backend or settings.backend_url
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--backend must be an http:// or https:// URL, got {url!r}")
        auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth else None
        api = Api(url, auth)  # type: ignore[arg-type]
        if args.command == "versions":
            return _versions(api, args.project)
        if args.command == "promote":
            asked = {"project": args.project, "version": args.version}
            out = api.call("POST", "/versions/promote", json=asked)
            now, was = out["active"], out["previous"]
            print(f"project {args.project}: {now} is now the active version (was {was})")
            if out.get("warning"):
                print(f"warning: {out['warning']}", file=sys.stderr)
            return 0
        if args.command == "prelabel":
            body: dict[str, Any] = {"project": args.project}
            if args.group_by:
                body["group_by"] = args.group_by
            if args.groups:
                body["groups"] = args.groups
            out = api.call(
                "POST", "/jobs/prelabel", json=body, timeout=3600
            )  # `similar` groups new tasks first
            print(
                f"project {out['project']}: {len(out['jobs'])} group jobs "
                f"({len(out['created'])} new, {len(out['existing'])} already queued or done)"
            )
            for job_id in out["jobs"]:
                print(job_id)
            return _wait(api, out["jobs"], args.poll) if args.wait else 0
        if args.command == "jobs":
            path = "/jobs" + (f"?project={args.project}" if args.project else "")
            for job in api.call("GET", path)["jobs"]:
                prog = job.get("progress") or {}
                print(f"{job['id']}\t{job['status']}\t{prog.get('done', '-')}/{prog.get('total', '-')}")
            return 0
        return _cancel(api, args.job_id)
    except (UsageError, ValueError) as exc:
        print(f"cosod-backend: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
