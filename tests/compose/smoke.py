"""``make test-compose``: build the image and run the compose stack for real, then tear it all down.

What it does, in order (each step prints its time):

1. Docker: uses the running dockerd, or starts one of its own (``--bridge=none --iptables=false
   --ip6tables=false``: host networking only) and stops it at the end.
2. A base image, ``cosod-base:bookworm``, when absent: Debian bookworm made with debootstrap (python3, venv,
   pip), ``docker import``-ed. No registry is reachable here, so nothing is pulled. The machine's CA
   certificates (``/usr/local/share/ca-certificates``) are trusted inside it so that pip reaches PyPI;
   they live only in this local image, never in the repository.
3. Stand-ins for the images compose pulls, built from that base when absent and named after the compose
   file's pinned images under ``cosod-standin/`` (never in the real image's place): Label Studio 1.23.2
   from ``requirements/label-studio.txt``, Redis from Debian.
4. The project's images, built from the repository's ``Dockerfile`` and ``docker/rq-dashboard.Dockerfile``
   with ``BASE_IMAGE=cosod-base:bookworm``.
5. The repository's ``docker-compose.yml`` with the CPU profile (``--profile cpu --scale worker=0``), changed
   only where this machine needs it: host networking (no bridge may be created here), so each service gets
   a free port and the service names resolve to 127.0.0.1; the stand-ins' names; the tiny backbone (no
   weights can be fetched).
6. Checks: ``/health`` ready with Redis ``ok`` and a live worker; rq-dashboard lists the worker; a project of
   3 groups x 4 uploaded images pre-annotated through ``POST /jobs/prelabel`` by the worker container, one
   prediction per task, images read from Label Studio's volume; ``down`` then ``up`` keeps MODEL_DIR's SQLite
   file byte for byte.
7. ``down -v``: no container, volume or network of the test's is left; the dockerd it started is stopped.

Exit status: 0 passed, 1 a check failed, 2 this machine cannot run it (one line says why).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = "cosod-base:bookworm"
PROJECT = "cosodsmoke"
MIRROR = os.environ.get("COSOD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CERTS = Path("/usr/local/share/ca-certificates")
USER, PASS = "smoke", "smoke-pass"


class Unavailable(Exception):
    """This machine cannot run the test (exit 2)."""


def log(msg: str) -> None:
    print(f"[compose {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*cmd: str, check: bool = True, quiet: bool = False, **kw: Any) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), text=True, capture_output=quiet, **kw)
    if check and res.returncode != 0:
        tail = (res.stderr or res.stdout or "")[-2000:] if quiet else ""
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {res.returncode}\n{tail}")
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Any, timeout: float, every: float = 1.0) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the service is still starting
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


# -- docker ----------------------------------------------------------------------------------------------
# the daemon is what decides: a machine can have a docker client alone (e.g. /usr/local/bin/docker)
APT_TOOLS = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}


def ensure_tools() -> None:
    """Install Debian's docker.io, docker-compose and debootstrap when missing (as root, with apt)."""
    missing = [pkg for exe, pkg in APT_TOOLS.items() if shutil.which(exe) is None]
    if exe_compose_v2():
        missing = [m for m in missing if m != "docker-compose"]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"missing {', '.join(missing)} (apt-get install -y {' '.join(missing)}, as root)")
    log(f"installing {', '.join(missing)} with apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "install", "-y", "--no-install-recommends", *missing, env=env, quiet=True)


def exe_compose_v2() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and run(docker, "compose", "version", check=False, quiet=True).returncode == 0


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and run(docker, "compose", "version", check=False, quiet=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    raise Unavailable(
        "neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)"
    )


def ensure_dockerd() -> subprocess.Popen | None:
    """None when a dockerd answers already; else the one started here."""
    if shutil.which("docker") is None:
        raise Unavailable("docker is not installed (apt-get install -y docker.io debootstrap)")
    if run("docker", "info", check=False, quiet=True).returncode == 0:
        return None
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        raise Unavailable("no dockerd answers, and this user cannot start one")
    proc = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"],
        stdout=subprocess.DEVNULL,
        stderr=open(Path(tempfile.gettempdir()) / "cosod-smoke-dockerd.log", "ab"),  # noqa: SIM115
        start_new_session=True,
    )
    wait_until("dockerd", lambda: run("docker", "info", check=False, quiet=True).returncode == 0, 60)
    return proc


def has_image(tag: str) -> bool:
    return run("docker", "image", "inspect", tag, check=False, quiet=True).returncode == 0


def image_size(tag: str) -> int:
    return int(run("docker", "image", "inspect", "-f", "{{.Size}}", tag, quiet=True).stdout.strip())


def ensure_base(work: Path) -> None:
    if has_image(BASE):
        return
    if shutil.which("debootstrap") is None:
        raise Unavailable("debootstrap is not installed (apt-get install -y debootstrap)")
    root = work / "rootfs"
    packages = "python3,python3-venv,python3-pip,ca-certificates"
    run(
        "debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(root), MIRROR, quiet=True
    )
    if CERTS.is_dir():  # the machine's own CAs (a TLS-inspecting proxy): trusted in this local image only
        for cert in CERTS.glob("*.crt"):
            shutil.copy(cert, root / "usr/local/share/ca-certificates" / cert.name)
        run("chroot", str(root), "update-ca-certificates", quiet=True)
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    (root / "etc/apt/apt.conf.d/99cosod").write_text('APT::Install-Recommends "false";\n')
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    run("docker", "import", "-", BASE, stdin=tar.stdout, quiet=True)
    tar.wait()
    shutil.rmtree(root, ignore_errors=True)


STANDINS = {
    "redis": """FROM {base}
RUN apt-get update && apt-get install -y redis-server && rm -rf /var/lib/apt/lists/* && mkdir -p /data
WORKDIR /data
CMD ["redis-server"]
""",
    "label-studio": """FROM {base}
COPY label-studio.txt /tmp/label-studio.txt
RUN python3 -m venv /opt/ls && /opt/ls/bin/pip install --no-cache-dir --require-hashes --no-deps \\
    -r /tmp/label-studio.txt && mkdir -p /label-studio/data
ENV LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data LS_PORT=8080 LATEST_VERSION_CHECK=false \
    LABEL_STUDIO_LATEST_VERSION_CHECK=false LABEL_STUDIO_COLLECT_ANALYTICS=false
CMD ["sh", "-c", "exec /opt/ls/bin/label-studio start --internal-host 127.0.0.1 --port $LS_PORT \
    --no-browser"]
""",
}


def standin_tag(image: str) -> str:
    """The stand-in's own name, so that it never takes the place of the real image on a host that pulls
    it: ``heartexlabs/label-studio:1.23.2`` -> ``cosod-standin/heartexlabs-label-studio:1.23.2``."""
    return "cosod-standin/" + image.replace("/", "-")


def ensure_standins(images: dict[str, str], work: Path) -> None:
    """``images``: service -> the image the compose file pins."""
    for name, dockerfile in STANDINS.items():
        tag = standin_tag(images[name])
        if has_image(tag):
            continue
        ctx = work / f"standin-{name}"
        ctx.mkdir(parents=True, exist_ok=True)
        (ctx / "Dockerfile").write_text(dockerfile.format(base=BASE))
        shutil.copy(REPO / "requirements/label-studio.txt", ctx / "label-studio.txt")
        log(f"building a stand-in for {tag}")
        run("docker", "build", "--network", "host", "-q", "-t", tag, str(ctx), quiet=True)


# -- the compose file, for this machine --------------------------------------------------------------------
def for_this_machine(compose: dict[str, Any], ports: dict[str, int]) -> dict[str, Any]:
    """Host networking: no ``ports``, the service names resolve to 127.0.0.1, and each service listens on a
    free port (the machine's own Redis has 6379). Nothing else changes."""
    services = compose["services"]
    names = list(services)
    swap = {
        "redis://redis:6379/0": f"redis://redis:{ports['redis']}/0",
        "http://label-studio:8080": f"http://label-studio:{ports['label-studio']}",
    }
    for svc in services.values():
        svc.pop("ports", None)
        svc.pop("build", None)  # built above, with this machine's base image
        svc["network_mode"] = "host"
        svc["extra_hosts"] = [f"{n}:127.0.0.1" for n in names]
        env = svc.get("environment") or {}
        for k, v in list(env.items()):
            if isinstance(v, str):
                for old, new in swap.items():
                    v = v.replace(old, new)
                env[k] = v
    for name in STANDINS:  # the pinned release's stand-in, under its own name
        services[name]["image"] = standin_tag(services[name]["image"])
    services["redis"]["command"] = [*services["redis"]["command"], "--port", str(ports["redis"])]
    services["label-studio"]["environment"].update(
        LS_PORT=str(ports["label-studio"]),
        LABEL_STUDIO_HOST=f"http://127.0.0.1:{ports['label-studio']}",
        LABEL_STUDIO_USERNAME="smoke@example.com",
        LABEL_STUDIO_PASSWORD=PASS,
        LABEL_STUDIO_USER_TOKEN="smoke-token-0123456789",
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
    )
    services["backend"]["environment"]["PORT"] = str(ports["backend"])
    services["rq-dashboard"]["command"] = [
        "rq-dashboard",
        "--bind",
        "127.0.0.1",
        "--port",
        str(ports["rq-dashboard"]),
    ]
    return compose


# -- the checks ------------------------------------------------------------------------------------------
def e2e_helpers() -> Any:
    spec = importlib.util.spec_from_file_location("cosod_e2e_conftest", REPO / "tests/e2e/conftest.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "tests"))
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    t_all = time.monotonic()
    try:
        ensure_tools()
        compose_cmd = compose_command()
        dockerd = ensure_dockerd()
    except Unavailable as exc:
        print(f"test-compose: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cosod-compose-"))
    ports = {n: free_port() for n in ("redis", "label-studio", "backend", "rq-dashboard")}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    pinned = {name: compose["services"][name]["image"] for name in STANDINS}
    file = work / "docker-compose.yml"
    file.write_text(yaml.safe_dump(for_this_machine(compose, ports), sort_keys=False))
    env = {
        **os.environ,
        "BASIC_AUTH_USER": USER,
        "BASIC_AUTH_PASS": PASS,
        "LABEL_STUDIO_API_KEY": "smoke-token-0123456789",
        "COSOD_BACKBONE": "tiny",
    }
    dc = [*compose_cmd, "-p", PROJECT, "-f", str(file), "--profile", "cpu"]
    auth = (USER, PASS)
    api = f"http://127.0.0.1:{ports['backend']}"
    try:
        t0 = time.monotonic()
        ensure_base(work)
        ensure_standins(pinned, work)
        log(f"base and stand-ins ready in {time.monotonic() - t0:.0f} s")
        t0 = time.monotonic()
        for dockerfile, tag in (
            ("Dockerfile", "cosod-ml-backend:latest"),
            ("docker/rq-dashboard.Dockerfile", compose["services"]["rq-dashboard"]["image"]),
        ):
            run("docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}",
                "-f", str(REPO / dockerfile), "-t", tag, str(REPO))  # fmt: skip
        log(
            f"images built in {time.monotonic() - t0:.0f} s; cosod-ml-backend:latest is "
            f"{image_size('cosod-ml-backend:latest') / 1e9:.2f} GB"
        )

        t0 = time.monotonic()
        # what an interrupted earlier run left under the same project name would make `up` recreate
        # containers that no longer exist: start from nothing
        run(*dc, "down", "-v", "--remove-orphans", env=env, check=False, quiet=True)
        run(*dc, "up", "-d", "--scale", "worker=0", env=env)
        health = wait_until(
            "/health ready with a live worker",
            lambda: (
                (h := requests.get(f"{api}/health", auth=auth, timeout=5).json())["ready"]
                and h.get("workers", 0) >= 1
                and h["redis"] == "ok"
                and h
            ),
            300,
        )
        shown = {k: health[k] for k in ("status", "redis", "workers", "batch")}
        log(f"stack up in {time.monotonic() - t0:.0f} s: {json.dumps(shown)}")
        dash = f"http://127.0.0.1:{ports['rq-dashboard']}"
        workers = wait_until(
            "rq-dashboard lists the worker",
            lambda: requests.get(f"{dash}/0/data/workers.json", auth=auth, timeout=5).json().get("workers"),
            60,
        )
        anonymous = requests.get(f"{dash}/0/data/workers.json", timeout=5)
        assert anonymous.status_code == 401, f"rq-dashboard without the pair: {anonymous.status_code}"
        log(f"rq-dashboard asks for the pair and lists {len(workers)} worker(s)")

        helpers = e2e_helpers()
        ls = SimpleNamespace(url=f"http://127.0.0.1:{ports['label-studio']}", token="smoke-token-0123456789")
        wait_until("Label Studio", lambda: requests.get(f"{ls.url}/health", timeout=5).ok, 300)
        project, task_group = helpers.create_grouped_project(
            ls, {"a": 4, "b": 4, "c": 4}, title="compose smoke"
        )
        t0 = time.monotonic()
        r = requests.post(f"{api}/jobs/prelabel", json={"project": project}, auth=auth, timeout=120)
        assert r.status_code == 202, r.text
        ids = r.json()["jobs"]
        jobs = wait_until(
            "the prelabel jobs",
            lambda: (
                (js := [requests.get(f"{api}/jobs/{i}", auth=auth, timeout=10).json() for i in ids])
                and all(j["status"] in ("finished", "failed", "canceled") for j in js)
                and js
            ),
            600,
        )
        assert all(j["status"] == "finished" for j in jobs), jobs
        got = {t: len(p) for t, p in helpers.predictions_by_task(ls, project).items()}
        assert got == {t: 1 for t in task_group}, got
        log(f"{len(ids)} group jobs, {len(got)} predictions (one per task) in {time.monotonic() - t0:.0f} s")

        def model_dir_digest() -> str:
            out = run(
                *dc,
                "exec",
                "-T",
                "backend",
                "sh",
                "-c",
                "ls -la /data/models && sha256sum /data/models/cosod.sqlite3",
                env=env,
                quiet=True,
            )
            return out.stdout.strip().splitlines()[-1].split()[0]

        before = model_dir_digest()
        run(*dc, "down", env=env)
        run(*dc, "up", "-d", "--scale", "worker=0", env=env)
        wait_until(
            "/health after down/up",
            lambda: requests.get(f"{api}/health", auth=auth, timeout=5).json()["ready"],
            300,
        )
        after = model_dir_digest()
        assert before == after, (before, after)
        log("down / up kept MODEL_DIR's SQLite file")
        log(f"PASSED in {time.monotonic() - t_all:.0f} s")
        return 0
    except Exception as exc:
        print(f"test-compose: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        run(*dc, "logs", "--tail", "80", env=env, check=False)
        return 1
    finally:
        run(*dc, "down", "-v", "--remove-orphans", env=env, check=False, quiet=True)
        left = run(
            "docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}", quiet=True
        ).stdout
        if left.strip():
            print(f"test-compose: containers left: {left.split()}", file=sys.stderr)
        if dockerd is not None:
            dockerd.terminate()
            dockerd.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
