"""The dense CRF itself, and a pool of processes that runs a group's CRFs side by side.

This module imports numpy only (pydensecrf when a CRF runs), so that the pool's worker processes start light.

Why processes: pydensecrf holds the GIL for the whole inference, so threads run the CRFs of a group one after
the other. The official 224x224 CRF costs about 36 ms an image on one core, a third of the default path's time
with ViT-S/8 on a CPU and most of it on a GPU. :func:`run_crfs` hands the images of a group to
``workers`` processes; the results are the same arrays the inline call gives (same code, same inputs), and the
equivalence test runs through the pool.

The processes are started with ``spawn``, never ``fork``: the caller may hold CUDA state, OpenMP threads and
locks that a forked child would inherit half-taken. They live as long as the process that made them (one pool
per process and worker count; a forked child makes its own). ``spawn`` imports the parent's main script again
(under ``__mp_main__``, so its ``if __name__ == "__main__"`` block does not run); a script without that guard
cannot start the pool, which is then switched off for the process with a warning and the CRFs run inline.

Failures: when the pool has never returned a result in this process, any failure to use it switches it off
and the CRFs run inline. Once it has worked, a worker that dies (a crash inside pydensecrf, a kill) raises
:class:`CRFWorkerError`, which callers treat as a failed CRF (the official code writes the group without CRF);
the next call starts a new pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from .errors import CRFFailed, CRFWorkerError

log = logging.getLogger(__name__)

CRF_REFERENCE_SIDE = 224  # the official CRF runs at 224x224; pairwise sxy values are in pixels at that size
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings of the official code (sxy in pixels at 224x224; scaled to the working size)."""

    gt_prob: float = 0.995
    gaussian_sxy: float = 10.0
    gaussian_compat: float = 10.0
    bilateral_sxy: float = 10.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 10.0
    iterations: int = 10
    max_side: int = 224  # the official CRF works at 224x224 (with aspect="keep": the long side)


OFFICIAL_CRF = CRFParams()


def working_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down so the long side is at most ``max_side`` (never scaled up)."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def dense_crf(image: np.ndarray, mask: np.ndarray, params: CRFParams = OFFICIAL_CRF) -> np.ndarray:
    """Hard-label DenseCRF of ``mask`` on ``image`` at the image's own size.

    image: (H, W, 3) uint8 RGB; mask: (H, W) bool. Returns (H, W) bool. Pairwise sxy values are scaled by
    ``max(H, W) / 224`` so the kernels cover the same share of the picture as the official 224x224 run.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = mask.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} sizes differ")
    scale = max(h, w) / CRF_REFERENCE_SIDE
    crf = dcrf.DenseCRF2D(w, h, 2)
    unary = unary_from_labels(mask.astype(np.int64), 2, gt_prob=params.gt_prob, zero_unsure=False)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(
        sxy=params.gaussian_sxy * scale,
        compat=params.gaussian_compat,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_SYMMETRIC,
    )
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy * scale,
        srgb=params.bilateral_srgb,
        rgbim=np.array(image, dtype=np.uint8, order="C"),  # pydensecrf needs a writable buffer
        compat=params.bilateral_compat,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_SYMMETRIC,
    )
    q = np.asarray(crf.inference(params.iterations)).reshape(2, h, w)
    return q.argmax(axis=0).astype(bool)


def default_workers() -> int:
    """The CPUs this process may use, at most 8: the pool size when none is given."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_AUTO_WORKERS))


class _Pools:
    """The process's pools, one per worker count; forgotten in a forked child, which makes its own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.executors: dict[int, ProcessPoolExecutor] = {}
        self.proven = False  # a pool has returned a result in this process
        self.disabled: str | None = None  # why the pool is off in this process

    def get(self, workers: int) -> ProcessPoolExecutor:
        with self.lock:
            if self.pid != os.getpid():
                self.pid, self.executors, self.proven = os.getpid(), {}, False
            if workers not in self.executors:
                self.executors[workers] = ProcessPoolExecutor(
                    max_workers=workers, mp_context=multiprocessing.get_context("spawn")
                )
            return self.executors[workers]

    def drop(self, workers: int) -> None:
        with self.lock:
            executor = self.executors.pop(workers, None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


_POOLS = _Pools()


def _crf_job(image: np.ndarray, labels: np.ndarray, params: CRFParams) -> np.ndarray | CRFFailed:
    """Runs in a worker. What the CRF raises comes back as a value, so that an exception in the parent means
    the pool itself failed."""
    try:
        return dense_crf(image, labels, params)
    except Exception as exc:  # pydensecrf raises plain Exceptions on bad inputs
        return CRFFailed(f"{type(exc).__name__}: {exc}")


def prestart(workers: int) -> None:
    """Start the pool's processes now, in the background (their imports take a second or two), so that the
    first group does not wait for them. A no-op for ``workers <= 1`` or a pool switched off; failures are
    left for :func:`run_crfs` to handle."""
    if workers <= 1 or _POOLS.disabled is not None:
        return
    try:
        _POOLS.get(workers).submit(os.getpid)
    except Exception as exc:  # run_crfs decides what a pool that cannot start means
        log.debug("CRF pool not started ahead: %s", exc)


def run_crfs(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], params: CRFParams, workers: int
) -> list[np.ndarray]:
    """:func:`dense_crf` of each (image, labels) pair, on up to ``workers`` processes (1: inline, here).

    Raises what :func:`dense_crf` raises (inline) or :class:`CRFFailed` naming it (in the pool), or
    :class:`CRFWorkerError` when a proven pool loses a worker.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label maps")
    workers = min(int(workers), len(images))
    if workers <= 1 or _POOLS.disabled is not None:
        return [dense_crf(im, lab, params) for im, lab in zip(images, labels, strict=True)]
    try:
        executor = _POOLS.get(workers)
        results = list(executor.map(_crf_job, images, labels, [params] * len(images)))
    except (BrokenProcessPool, OSError, RuntimeError) as exc:
        _POOLS.drop(workers)
        if _POOLS.proven:
            raise CRFWorkerError(f"a CRF worker process died: {exc}") from exc
        _POOLS.disabled = f"{type(exc).__name__}: {exc}"
        log.warning("the CRF process pool cannot start (%s); CRFs run one by one in this process", exc)
        return [dense_crf(im, lab, params) for im, lab in zip(images, labels, strict=True)]
    _POOLS.proven = True
    out: list[np.ndarray] = []
    for result in results:
        if isinstance(result, CRFFailed):
            raise result
        out.append(result)
    return out
