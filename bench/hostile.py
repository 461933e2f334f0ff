"""The hostile-input corpus of ``tests/e2e/test_hostile.py`` outside pytest: one table of the results.

    python bench/hostile.py                       # every configuration: rq, down, auth
    python bench/hostile.py --configs rq --only 1- 3-   # categories 1 and 3 of the Redis configuration
    python bench/hostile.py --list                # the cases, by configuration, without running them

Starts a real Label Studio (``LS_BIN``, default ``.venv-ls/bin/label-studio``, made by ``make ls-venv``; its
migrated data dir is copied from pytest's cache when an e2e run left one, else migrated here, ~25 s) and,
per configuration, the backend under gunicorn with the tiny backbone (``tests/e2e/hostile_kit.py``). Redis
on 127.0.0.1:6379 is needed for ``rq`` (database 14 is flushed). Prints each failing case as it happens,
then the summary table (cases per category, answers by class, time, worst memory growth) and the failures.
Exit status 0 when every case met its expectation, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e import conftest as e2e  # noqa: E402 - after the path is set
from tests.e2e.hostile_kit import Outcome, open_world, run_case, summary  # noqa: E402
from tests.e2e.test_hostile import CASES, ordered  # noqa: E402

CONFIGS = ("rq", "down", "auth")


def template(binary: Path, scratch: Path) -> Path:
    """A migrated Label Studio data dir: pytest's cached one when there is one, else a fresh migration."""
    cached = sorted((REPO / ".pytest_cache" / "d").glob("ls-data-*/.migrated"))
    if cached:
        return cached[-1].parent
    data = scratch / "ls-template"
    data.mkdir(parents=True)
    print("migrating a fresh Label Studio data dir (~25 s) ...", flush=True)
    proc, _ = e2e.start_ls(binary, data, scratch, scratch / "ls-migrate.log")
    e2e.stop(proc)
    return data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--only", nargs="+", default=None, help="category prefixes to run, e.g. 1- 6-")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, SQLite store)")
    args = p.parse_args()

    def wanted(config: str) -> list:
        cases = ordered(config)
        if args.only:
            cases = [c for c in cases if c.category.startswith(tuple(args.only))]
        return cases

    if args.list:
        for config in args.configs:
            for c in wanted(config):
                print(f"{config:5} {c.id}{'  (heavy)' if c.heavy else ''}")
        print(f"{len(CASES)} cases in all")
        return 0
    binary = e2e.ls_bin()
    if binary is None:
        print("Label Studio is not installed: run `make ls-venv` or set LS_BIN", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="cosod-hostile-"))
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    try:
        tpl = e2e.LSTemplate(binary, template(binary, scratch), "bench")
        with e2e.run_label_studio(tpl, scratch / "ls") as ls:
            for config in args.configs:
                cases = wanted(config)
                if not cases:
                    continue
                print(f"[{config}] starting the backend, {len(cases)} cases ...", flush=True)
                with open_world(
                    config, ls, scratch / config, run_worker=e2e.run_worker, basetemp=scratch
                ) as w:
                    for case in cases:
                        outcome = run_case(w, case)
                        outcomes.append(outcome)
                        if outcome.problems:
                            print(f"  FAIL {outcome.message()[:300]}", flush=True)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{len(outcomes)} cases in {time.perf_counter() - t0:.0f} s\n")
    print(summary(outcomes))
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
