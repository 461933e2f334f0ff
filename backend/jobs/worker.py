"""``cosod-worker``: an RQ worker for the ``cosod`` queue that loads the pipeline once per process.

Run one per GPU: ``CUDA_VISIBLE_DEVICES=0 COSOD_DEVICE=cuda REDIS_URL=redis://... cosod-worker``. The
process sees only the GPUs ``CUDA_VISIBLE_DEVICES`` names (torch honours it), so ``cuda`` is that GPU.
Replicas of one service (``docker compose up --scale worker=N``) run with ``COSOD_WORKER_GPU=auto``
instead: each claims a free GPU of its machine in Redis and sets ``CUDA_VISIBLE_DEVICES`` to it before the
pipeline loads (``backend/gpu.py``).

**No fork.** The worker class is a subclass of RQ's ``SimpleWorker``: jobs run in the worker process itself,
never in a forked child. The pipeline (and CUDA, with ``COSOD_DEVICE=cuda``) is loaded once at start, before
the first job, and is reused by every job; no CUDA context ever crosses a ``fork()``, and RQ's scheduler
(which forks) is not started.

**Dead workers.** ``SimpleWorker`` alone would take ``job timeout + 60 s`` to notice a killed worker. This one
sends a heartbeat every ``COSOD_WORKER_HEARTBEAT`` s while a job runs (the job's entry in the started
registry expires ``2 * COSOD_WORKER_HEARTBEAT + 1`` s after the last one), and every worker runs a reaper that
moves expired entries back to the queue (or to failed when the job has no retries left); a Redis lock lets
only one worker reap at a time. Several workers share ``COSOD_CACHE_DIR``: the feature cache writes with
atomic renames.

**A death is not a failure.** A job re-queued because its worker died gets its retry back (``deaths`` in its
meta counts these), so ``COSOD_JOB_RETRIES`` counts only the runs that failed on their own; after
:data:`MAX_DEATHS` deaths a job is treated as the cause (it may be what kills its workers) and its retries are
no longer given back.

**Redis outages.** The worker's connection waits out an outage of up to ``COSOD_REDIS_OUTAGE_WAIT`` s at any
command (:mod:`backend.jobs.outage`): the job that was running goes on and ends once. The reaper does not
reap until Redis has been back for a heartbeat TTL, so that live workers' heartbeats are renewed first. The
worker exits 0 only when asked to stop (SIGTERM, ``--burst``); any other end of RQ's loop exits 1.

**Liveness.** Every heartbeat, idle or busy, the worker marks itself alive until twice the heartbeat plus
1 s from now (a member of the sorted set ``cosod:alive:<queue>``, scored by that deadline); ``/health``
counts the unexpired marks, so a killed worker drops out within that time and a Redis that restarted empty
has every live worker back after one heartbeat. RQ's own worker record
(what rq-dashboard lists) is written again when a restart lost it.

**Attempts.** ``meta.attempt`` is the number of the job's current (or last) run, ``meta.deaths`` the runs
whose worker died; a run's start clears the previous run's ``error`` and a finished job keeps no
``last_error``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from typing import Any

from ..errors import GPUClaimError, redact_url
from ..prediction.pipelines import PipelineFactory
from ..settings import Settings
from .context import JobContext, install_context
from .finetuning import recover_finetunes
from .gpu import claim_gpu, visible_gpus
from .outage import STATE as OUTAGE
from .outage import patient_connection
from .rqueue import credit_death, credit_deaths, mark_alive, redis_connection, unmark_alive

log = logging.getLogger(__name__)

REAPER_LOCK = "cosod:reaper:{}"


def worker_class(heartbeat: int) -> type:
    """A ``SimpleWorker`` that heartbeats while a job runs, so a killed worker's job is re-queued soon."""
    from rq.worker import SimpleWorker, WorkerStatus

    class CosodWorker(SimpleWorker):
        heartbeat_interval = heartbeat

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.record_lock = threading.Lock()  # register_death against _presence's re-registration
            self.dead = False

        def register_death(self) -> None:
            with self.record_lock:
                self.dead = True
                super().register_death()

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return 2 * int(self.heartbeat_interval) + 1

        def clean_registries(self) -> None:
            """RQ's periodic clean-up (also at start) would fail a dead worker's job without giving back
            its retry, and right after an outage would take live workers for dead: reap first, our way,
            and leave RQ's clean-up for the next round when that could not happen now."""
            if OUTAGE.quiet_for() <= 2 * self.heartbeat_interval + 1:
                return
            for queue in self.queues:
                credit_deaths(self.connection, queue)
            super().clean_registries()

        def handle_job_success(self, job: Any, *args: Any, **kwargs: Any) -> Any:
            # before RQ marks it finished: whoever sees it finished must not see it running, nor an
            # earlier run's error
            _end_run_safely(job, finished=True)
            return super().handle_job_success(job, *args, **kwargs)

        def handle_job_failure(self, job: Any, *args: Any, **kwargs: Any) -> Any:
            # before RQ re-queues it: another worker may start the retry at once, and must not take this
            # (failed, not dead) run for a death, nor have its own run's mark cleared by this one's end
            _end_run_safely(job, finished=False)
            return super().handle_job_failure(job, *args, **kwargs)

        def execute_job(self, job: Any, queue: Any) -> None:
            execution = self.prepare_execution(job)
            stop = threading.Event()

            def beat() -> None:
                while not stop.wait(self.heartbeat_interval):
                    try:
                        self.maintain_heartbeats(job, execution)
                    except Exception as exc:  # Redis briefly away: the next beat tries again
                        log.warning("heartbeat for job %s failed: %s", job.id, exc)

            thread = threading.Thread(target=beat, name="cosod-heartbeat", daemon=True)
            thread.start()
            try:
                begin_run(job)
                self.perform_job(job, queue, execution)  # its success or failure handler ends the run
            finally:
                stop.set()
                thread.join(5)
            self.set_state(WorkerStatus.IDLE)

    return CosodWorker


def begin_run(job: Any) -> None:
    """A run starts: ``meta.attempt`` is its number; the previous run's ``error`` becomes ``last_error``.

    ``meta.running`` stays set until the run ends (:func:`end_run`, success or failure). Found still set, the
    previous run's worker died and whoever re-queued the job (RQ's own clean-up, run by rq-dashboard's pages
    too) did not count it (:func:`credit_death` clears it): the death is counted and its retry given back
    here."""
    meta = job.get_meta(refresh=True)
    if meta.get("running"):
        credit_death(job.connection, job.id, requeued=True)
        meta = job.get_meta(refresh=True)
        job.retries_left = _stored_retries(job)
    runs = int(meta.get("runs", 0)) + 1
    meta.update(runs=runs, attempt=runs, running=True)
    if meta.get("error"):
        meta["last_error"] = meta.pop("error")
    job.save_meta()


def _stored_retries(job: Any) -> int | None:
    raw = job.connection.hget(job.key, "retries_left")
    return None if raw is None else int(raw)


def end_run(job: Any, finished: bool) -> None:
    """A run ended (its worker lives), called before RQ records the outcome: ``running`` is cleared; a
    finished job keeps no error of an earlier attempt or a retried call. What the job wrote stays even
    when Redis lost it (an empty restart during the run): the meta in this process and the stored one
    are merged, the stored one winning."""
    local = dict(job.meta or {})
    meta = job.meta = {**local, **job.get_meta(refresh=True)}
    meta.pop("running", None)
    if finished:
        meta.pop("last_error", None)
        meta.pop("error", None)
    job.save_meta()


def _end_run_safely(job: Any, finished: bool) -> None:
    try:
        end_run(job, finished)
    except Exception as exc:  # the job's outcome is RQ's to record all the same
        log.warning("job %s: could not clear its running mark: %s", job.id, exc)


def reap_abandoned(connection: Any, queue_name: str, interval: int, quiet: float = float("inf")) -> bool:
    """Re-queue (or fail) jobs of workers that stopped heartbeating; True when this process held the lock.

    ``quiet``: seconds since this process last saw Redis come back from an outage; nothing is reaped until
    it exceeds the heartbeat TTL, so that every live worker renewed its heartbeat after the outage."""
    from rq import Queue
    from rq.registry import StartedJobRegistry
    from rq.utils import current_timestamp

    if quiet <= 2 * interval + 1:
        return False
    if not connection.set(REAPER_LOCK.format(queue_name), os.getpid(), nx=True, ex=max(1, interval)):
        return False
    queue = Queue(queue_name, connection=connection)
    now = current_timestamp()
    credit_deaths(connection, queue, now)
    StartedJobRegistry(queue=queue).cleanup(now)
    return True


def _reaper(connection: Any, queue_name: str, interval: int, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            reap_abandoned(connection, queue_name, interval, OUTAGE.quiet_for())
        except Exception as exc:
            log.warning("reaping abandoned jobs failed (retrying in %d s): %s", interval, exc)


def _presence(worker: Any, queue_name: str, interval: int, stop: threading.Event) -> None:
    """Keep this worker's liveness mark (``/health`` counts them) and RQ's worker record alive."""
    from rq.worker_registration import REDIS_WORKER_KEYS

    conn = worker.connection
    while True:
        try:
            mark_alive(conn, queue_name, worker.name, 2 * interval + 1)
            # RQ sets birth_date when its loop registers the worker; a record lost after that (a Redis
            # restarted empty) is written again, so that rq-dashboard lists the worker
            with worker.record_lock:
                if (
                    worker.birth_date is not None
                    and not worker.dead
                    and not conn.sismember(REDIS_WORKER_KEYS, worker.key)
                ):
                    conn.delete(worker.key)  # what RQ's heartbeats wrote back since: a partial record
                    worker.register_birth()
                    log.info("worker record %s written again (Redis lost it)", worker.key)
        except Exception as exc:
            log.warning("could not renew this worker's liveness key: %s", exc)
        if stop.wait(interval):
            break
    try:
        unmark_alive(conn, queue_name, worker.name)
    except Exception:
        pass


def _stop_while_starting(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cosod-worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", help="queue to serve (default: COSOD_QUEUE or 'cosod')")
    p.add_argument("--name", help="worker name (default: <host>.<pid>.<random>)")
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    return p


def main(argv: list[str] | None = None, pipeline_factory: PipelineFactory | None = None) -> int:
    """Load the pipeline, then serve the queue. ``pipeline_factory`` replaces ``Pipeline.build`` (tests)."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"cosod-worker: {exc}", file=sys.stderr)
        return 2
    if not settings.redis_url:
        print("cosod-worker: REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
    )
    queue_name = args.queue or settings.queue_name
    conn = patient_connection(settings.redis_url, settings.redis_outage_wait)
    try:
        redis_connection(settings.redis_url).ping()  # at start, unreachable is a configuration fault
    except Exception as exc:
        where = redact_url(settings.redis_url)
        print(f"cosod-worker: Redis at {where} is unreachable: {redact_url(str(exc))}", file=sys.stderr)
        return 2

    name = args.name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    # Until RQ installs its own handlers (warm shutdown) in ``work()``, a stop request (``docker stop``, a
    # supervisor) must still unwind through the ``finally`` below, so that the GPU slot is released at once
    # rather than after its TTL; Python's default would end the process on the spot.
    signal.signal(signal.SIGTERM, _stop_while_starting)
    slot = None
    if settings.worker_gpu == "auto":  # before anything initialises CUDA
        try:
            slot = claim_gpu(
                conn,
                name,
                visible_gpus(),
                pool=settings.gpu_pool,
                per_gpu=settings.workers_per_gpu,
                ttl=3 * settings.worker_heartbeat,
                wait=3 * settings.worker_heartbeat + 1,
            )
        except GPUClaimError as exc:
            print(f"cosod-worker: {exc}", file=sys.stderr)
            return 2
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
        slot.keep(settings.worker_heartbeat)
        log.info("cosod-worker %s: GPU %s (slot %s)", name, slot.gpu, slot.key)
    try:
        return _serve(settings, queue_name, conn, name, args.burst, pipeline_factory)
    finally:
        if slot is not None:
            try:
                slot.release()
            except Exception as exc:  # Redis gone: the claim expires with its TTL
                log.warning("could not release GPU slot %s: %s", slot.key, exc)


def _serve(
    settings: Settings,
    queue_name: str,
    conn: Any,
    name: str,
    burst: bool,
    pipeline_factory: PipelineFactory | None,
) -> int:
    log.info(
        "cosod-worker: backbone %s on %s (CUDA_VISIBLE_DEVICES=%s), queue %s",
        settings.backbone,
        settings.device,
        os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        queue_name,
    )
    ctx = JobContext.from_settings(settings, pipeline_factory)
    install_context(ctx)
    recover_finetunes(ctx)  # a fine-tune killed with its worker (or forgotten by Redis) is queued again
    if not ctx.loader.wait(timeout=1800.0):
        print(f"cosod-worker: the pipeline could not be loaded: {ctx.loader.error}", file=sys.stderr)
        return 1
    log.info("pipeline loaded in %.2f s", ctx.loader.load_seconds or 0.0)
    ctx.ls.warm()

    from rq import Queue

    cls = worker_class(settings.worker_heartbeat)
    worker = cls([Queue(queue_name, connection=conn)], connection=conn, name=name)
    stop = threading.Event()
    reaper = threading.Thread(
        target=_reaper, args=(conn, queue_name, settings.worker_heartbeat, stop), daemon=True
    )
    reaper.start()
    presence = threading.Thread(
        target=_presence, args=(worker, queue_name, settings.worker_heartbeat, stop), daemon=True
    )
    presence.start()
    import redis

    try:
        worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # RQ's teardown, past the outage deadline
        log.error("Redis is gone (%s)", exc)
    finally:
        stop.set()
        presence.join(5)
    if burst or worker._stop_requested or worker._shutdown_requested_date is not None:
        return 0
    # RQ leaves its loop on its own only after an error it logged (e.g. Redis gone for longer than
    # COSOD_REDIS_OUTAGE_WAIT): a failure, so that a supervisor restarting on failure restarts it.
    print("cosod-worker: the worker loop ended on an error (see the log above); exiting 1", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
