"""One GPU per worker when workers are started as identical replicas (``docker compose up --scale worker=N``).

Compose gives every replica of a service the same device reservation, so with ``count: 1`` all replicas
would share the first GPU. Instead the worker service reserves all GPUs and each ``cosod-worker`` started
with ``COSOD_WORKER_GPU=auto`` claims a free slot in Redis and sets ``CUDA_VISIBLE_DEVICES`` to that GPU
before anything initialises CUDA.

- The GPUs are those ``CUDA_VISIBLE_DEVICES`` lists, else the UUIDs ``nvidia-smi`` reports (asked in a
  subprocess, so this process never touches the CUDA driver before the choice; a UUID names the same GPU
  whatever order CUDA numbers them in, and no two machines share one). In a container, ``nvidia-smi`` is
  there when the device reservation asks for the ``utility`` capability.
- A slot is the key ``cosod:gpu:<pool>:<gpu>:<k>`` (``k`` < ``COSOD_WORKERS_PER_GPU``), set with NX and a
  TTL that the worker renews on every heartbeat: a worker that dies frees its GPU after the TTL. Slots are
  taken GPU by GPU before a second worker goes on any GPU.
- ``COSOD_GPU_POOL`` names the machine: workers of several machines that share one Redis need one pool
  each (default ``default``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import GPUClaimError

log = logging.getLogger(__name__)

SLOT_KEY = "cosod:gpu:{pool}:{gpu}:{k}"


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi``'s UUIDs."""
    e = os.environ if env is None else env
    listed = e.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [g.strip() for g in listed.split(",") if g.strip()]
    smi = shutil.which("nvidia-smi", path=e.get("PATH"))
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass
class GPUClaim:
    """A held slot; :meth:`renew` on every heartbeat, :meth:`release` on exit."""

    connection: Any
    key: str
    gpu: str
    owner: str
    ttl: int
    _stop: threading.Event = field(default_factory=threading.Event)

    def renew(self) -> bool:
        """Extend the slot's TTL; False (and a logged error) when it expired and another worker took it."""
        held = self.connection.get(self.key)
        if held is not None and held.decode() != self.owner:
            log.error(
                "GPU %s: slot %s now belongs to %s; two workers share this GPU", self.gpu, self.key, held
            )
            return False
        self.connection.set(self.key, self.owner, ex=self.ttl)
        return True

    def keep(self, every: float) -> threading.Thread:
        """Renew every ``every`` seconds in a daemon thread until :meth:`release`."""

        def run() -> None:
            while not self._stop.wait(every):
                try:
                    self.renew()
                except Exception as exc:  # Redis briefly away: the next round tries again
                    log.warning("renewing GPU slot %s failed: %s", self.key, exc)

        thread = threading.Thread(target=run, name="cosod-gpu-slot", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        self._stop.set()
        try:
            if (self.connection.get(self.key) or b"").decode() == self.owner:
                self.connection.delete(self.key)
        except Exception as exc:
            log.warning("releasing GPU slot %s failed: %s", self.key, exc)


def claim_gpu(
    connection: Any,
    owner: str,
    gpus: list[str],
    *,
    pool: str = "default",
    per_gpu: int = 1,
    ttl: int = 30,
    wait: float = 0.0,
) -> GPUClaim:
    """Take the first free slot (every GPU's first slot, then every GPU's second...), waiting up to ``wait``
    seconds for one to free up (a replaced worker's slot lives until its TTL ends)."""
    if not gpus:
        raise GPUClaimError(
            "COSOD_WORKER_GPU=auto found no GPU: CUDA_VISIBLE_DEVICES is empty and nvidia-smi lists none"
        )
    if per_gpu < 1:
        raise GPUClaimError(f"COSOD_WORKERS_PER_GPU must be >= 1, got {per_gpu!r}")
    deadline = time.monotonic() + wait
    while True:
        for k in range(per_gpu):
            for gpu in gpus:
                key = SLOT_KEY.format(pool=pool, gpu=gpu, k=k)
                if connection.set(key, owner, nx=True, ex=ttl):
                    return GPUClaim(connection, key, gpu, owner, ttl)
        if time.monotonic() >= deadline:
            raise GPUClaimError(
                f"all {len(gpus) * per_gpu} GPU slots of pool {pool!r} are taken ({len(gpus)} GPUs "
                f"[{', '.join(gpus)}] x COSOD_WORKERS_PER_GPU={per_gpu}); run fewer workers, raise "
                "COSOD_WORKERS_PER_GPU, or give each machine its own COSOD_GPU_POOL"
            )
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
