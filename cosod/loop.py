"""The one epoch loop: from-scratch training of every method and fine-tuning on corrections.

An epoch walks a permutation of the groups, ``rng.permutation(n_groups)`` with numpy's default generator
seeded by ``seed`` (``reverse``: walked from its end). For every group of at least ``min_size`` images it
draws the sorted indices of a subset of at most ``max_group`` of them (``rng.choice(n, k, replace=False)``),
asks ``step(batch)`` for the loss of that subset, and takes one optimiser step
(``zero_grad(set_to_none=True)``, ``backward``, ``step``). Smaller groups are skipped without a draw. The RNG
is used in exactly this order, so a run is reproducible from its seed. It stops after ``epochs`` epochs or
``max_steps`` steps, whichever comes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .methods.base import Batch, Loader

Step = Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopHistory:
    """``records``: what ``step`` returned for every step, in order; ``epochs``: per epoch that took a step,
    the mean of every record key; ``steps``: optimiser steps taken; ``seconds``: wall time."""

    steps: int = 0
    records: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def epoch_means(self, key: str) -> list[float]:
        """The per-epoch means of one record key (e.g. ``"loss"``)."""
        return [e[key] for e in self.epochs]

    def metrics(self) -> dict[str, Any]:
        """The training record: ``epoch_loss`` (and ``epoch_<key>`` for every other record key) per epoch,
        the ``last`` step's record, ``steps`` and ``seconds``."""
        keys = list(self.records[0]) if self.records else ["loss"]
        return {
            **{f"epoch_{k}": self.epoch_means(k) for k in keys},
            "last": self.records[-1] if self.records else {},
            "steps": self.steps,
            "seconds": self.seconds,
        }

    def tail_mean(self, n: int = 20) -> dict[str, float]:
        """The mean of every record key over the last ``n`` steps ({} before any step)."""
        tail = self.records[-min(len(self.records), n) :]
        return {k: float(np.mean([r[k] for r in tail])) for k in (tail[0] if tail else {})}


def adam(module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over the parameters of ``module`` that require gradients (every method, every loop)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas)


def _means(records: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def run_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    load: Loader,
    n_groups: int,
    step: Step,
    *,
    seed: int,
    max_group: int,
    epochs: int | None,
    max_steps: int | None,
    min_size: int = 2,
    reverse: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> LoopHistory:
    """Train ``module`` in place (see the module doc); ``load(i)`` gives group i (0 <= i < ``n_groups``),
    ``on_step(step_number, record)`` is called after every step (numbers from 1). ``module`` is in train mode
    during the loop and in eval mode after it. ``epochs`` None: until ``max_steps``."""
    if epochs is None and max_steps is None:
        raise ValueError("run_epochs needs epochs or max_steps, got neither")
    if n_groups < 1:
        raise ValueError(f"run_epochs needs at least one group, got {n_groups}")
    rng = np.random.default_rng(seed)
    hist = LoopHistory()
    t0 = time.perf_counter()
    module.train()
    epoch = 0
    while (epochs is None or epoch < epochs) and (max_steps is None or hist.steps < max_steps):
        epoch += 1
        order = rng.permutation(n_groups)
        records: list[dict[str, float]] = []
        for gi in order[::-1] if reverse else order:
            batch = load(int(gi))
            n = len(batch)
            if n < min_size:
                continue
            pick = np.sort(rng.choice(n, size=min(n, max_group), replace=False)).tolist()
            loss, record = step(batch.select(pick))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hist.steps += 1
            records.append(record)
            if on_step:
                on_step(hist.steps, record)
            if max_steps is not None and hist.steps >= max_steps:
                break
        if records:
            hist.epochs.append(_means(records))
        elif epochs is None:
            raise ValueError(f"no group has {min_size} or more images; nothing to train on")
        hist.records.extend(records)
    module.eval()
    hist.seconds = time.perf_counter() - t0
    return hist
