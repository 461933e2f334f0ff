"""The lock (requirements.txt and requirements/*.txt, made by `make lock`) agrees with pyproject.toml, the
image installs it, and the venv this suite runs in is the lock's."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
# Packages whose internals the code reaches into: a new major release must be a deliberate change.
BOUNDED = ("torch", "timm", "rq", "label-studio-sdk")


def pins(name: str) -> dict[str, str]:
    """``name`` relative to the repository: the lock is requirements.txt, the others live in requirements/."""
    out = {}
    for line in (REPO / name).read_text().splitlines():
        m = PIN.match(line)
        if m:
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs.extend(Requirement(r) for r in extra)
    return reqs


def test_every_declared_dependency_is_locked_within_its_range() -> None:
    lock = pins("requirements.txt")
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is in pyproject.toml but not in the lock: run `make lock`"
        ok = req.specifier.contains(lock[name], prereleases=True)
        assert ok, f"lock has {name}=={lock[name]}, not {req}"


@pytest.mark.parametrize("name", BOUNDED)
def test_packages_whose_internals_we_use_stay_below_their_next_major(name: str) -> None:
    (req,) = [r for r in declared() if canonicalize_name(r.name) == name]
    uppers = [Version(s.version) for s in req.specifier if s.operator == "<"]
    assert uppers, f"{req} has no upper bound"
    locked = Version(pins("requirements.txt")[name])
    assert min(uppers) <= Version(f"{locked.major + 1}"), f"{req} admits the next major release"


def test_every_lock_line_is_hashed() -> None:
    for name in (
        "requirements.txt",
        "requirements/deploy.txt",
        "requirements/label-studio.txt",
        "requirements/rq-dashboard.txt",
    ):
        text = (REPO / name).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
        for entry in entries:
            if PIN.match(entry):
                assert "--hash=sha256:" in entry, f"{name}: {entry.splitlines()[0]} has no hash"


def test_the_image_installs_the_locks_pins() -> None:
    lock, deploy = pins("requirements.txt"), pins("requirements/deploy.txt")
    assert {n: v for n, v in deploy.items() if lock.get(n) != v} == {}
    assert {"torch", "rq", "label-studio-sdk", "gunicorn", "setuptools"} <= deploy.keys()
    assert not {"pytest", "ruff", "mypy"} & deploy.keys()  # the image has no dev tools
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements/deploy.txt" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    # the final stage gets the finished venv, not the compilers; the base image is pinned and replaceable
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    assert "build-essential" not in final and "COPY --from=build /opt/venv /opt/venv" in final
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim-bookworm$", dockerfile, re.M)


def test_the_compose_stack_pins_every_image_and_its_dashboard_runs_the_locks_rq() -> None:
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, svc in services.items():  # what is pulled has a release tag; the project's images are built
        repo, _, tag = svc["image"].partition(":")
        assert re.fullmatch(r"\d+\.\d+\.\d+(-\w+)?", tag) or repo.startswith("cosod-"), (name, tag)
    lock, dashboard = pins("requirements.txt"), pins("requirements/rq-dashboard.txt")
    assert dashboard["rq"] == lock["rq"] and dashboard["redis"] == lock["redis"]
    assert "requirements/rq-dashboard.txt" in (REPO / "docker/rq-dashboard.Dockerfile").read_text()


def test_label_studio_for_the_end_to_end_tests_is_locked() -> None:
    assert pins("requirements/label-studio.txt")["label-studio"] == "1.23.2"


def test_this_venv_has_the_locks_versions() -> None:
    """``make test`` runs in the venv made from the lock; ``make test-latest`` runs in one made without it,
    where this test says which versions differ (and is the only one allowed to fail for that reason)."""
    lock = pins("requirements.txt")
    have = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {n: (v, have[n]) for n, v in lock.items() if n in have and have[n] != v}
    if differ and os.environ.get("COSOD_TEST_UNLOCKED") == "1":
        pytest.skip(f"make test-latest: {len(differ)} packages differ from the lock")
    assert differ == {}, "the venv differs from requirements.txt (lock, installed)"
