"""``cosod-backend``: talk to a running backend's /jobs API.

    cosod-backend prelabel --project N [--group-by RULE] [--group NAME ...] [--wait] [--backend URL]
    cosod-backend jobs [--project N] [--backend URL]
    cosod-backend cancel JOB_ID [--backend URL]

Exit codes: 0 done; 1 some job failed or was canceled (each reason printed); 2 bad input or nothing to talk
to (unknown project, backend or Redis unreachable), with one line on stderr. Basic auth comes from
``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``, as for the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import requests

from ..errors import UsageError
from ..settings import Settings

DEFAULT_BACKEND = "http://127.0.0.1:9090"
FINAL = ("finished", "failed", "canceled", "stopped")


class Api:
    def __init__(self, url: str, auth: tuple[str, str] | None):
        self.url = url.rstrip("/")
        self.auth = auth

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = requests.request(method, self.url + path, auth=self.auth, timeout=120, **kw)
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
    p = argparse.ArgumentParser(prog="cosod-backend", description="batch jobs of the cosod ML backend")
    p.add_argument("--backend", default=DEFAULT_BACKEND, help=f"backend URL (default {DEFAULT_BACKEND})")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prelabel", help="pre-annotate a whole project, one job per group")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--group-by", help="'project' or 'field:<name>' (default: the project's rule)")
    pre.add_argument("--group", action="append", dest="groups", help="only this group (repeatable)")
    pre.add_argument("--wait", action="store_true", help="show a progress bar until every job ends")
    pre.add_argument("--poll", type=float, default=0.5, help="seconds between status polls (--wait)")
    ls = sub.add_parser("jobs", help="list jobs")
    ls.add_argument("--project", type=int)
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    ver = sub.add_parser("versions", help="a project's model versions with their held-out scores (MODEL_DIR)")
    ver.add_argument("--project", type=int, required=True)
    pro = sub.add_parser("promote", help="make a version the active one: roll back or forward (MODEL_DIR)")
    pro.add_argument("--project", type=int, required=True)
    pro.add_argument("--version", required=True)
    return p


def _registry(settings: Settings) -> Any:
    from ..learning.store import Store
    from ..learning.versions import Registry

    return Registry(Store(settings.model_dir))


def _versions(settings: Settings, project: int) -> int:
    registry = _registry(settings)
    records = registry.list_versions(project)
    if not records:
        print(f"project {project}: no fine-tuned version yet in {settings.model_dir} (the base model serves)")
        return 0
    active = registry.active_name(project)
    metrics = ("iou", "max_f", "mae", "hce")
    print(
        f"  {'version':26s} {'status':10s} {'parent':28s} "
        + " ".join(f"{m:>7s}" for m in metrics)
        + "  decision"
    )
    for r in records:
        scores = [(r.scores or {}).get(m) for m in metrics]
        shown = " ".join(f"{v:7.3f}" if isinstance(v, int | float) else f"{'-':>7s}" for v in scores)
        mark = "*" if r.version == active else " "
        print(f"{mark} {r.version:26s} {r.status:10s} {str(r.parent or '-'):28s} {shown}  {r.decision}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "versions":
            return _versions(settings, args.project)
        if args.command == "promote":
            rec = _registry(settings).promote(args.project, args.version)
            print(f"project {args.project}: {rec.version} is now the active version")
            return 0
        auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth else None
        api = Api(args.backend, auth)  # type: ignore[arg-type]
        if args.command == "prelabel":
            body: dict[str, Any] = {"project": args.project}
            if args.group_by:
                body["group_by"] = args.group_by
            if args.groups:
                body["groups"] = args.groups
            out = api.call("POST", "/jobs/prelabel", json=body)
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
        print(json.dumps(api.call("DELETE", f"/jobs/{args.job_id}"), indent=2))
        return 0
    except (UsageError, ValueError) as exc:
        print(f"cosod-backend: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
