"""Co-salient methods behind one protocol, looked up by name: ``get_method("scosparc")``, ``"ums"``, ...

A method (a :class:`~cosod.methods.base.Method` subclass) provides, with these shapes:

- ``n_backbones`` and ``build(config, make_backbone) -> (head, backbones)``: the frozen backbones it reads
  (their features: ``tokens`` (B, h, w, C) float32 per backbone, same images in the same order) and its
  trained head, from ``config``'s checkpoint or an untrained start; ``new_head(backbones, train_config)`` for
  from-scratch training; ``module(head)``: the ``nn.Module`` that is trained and hashed into model versions.
- ``load_head(path)`` / ``save_head(head, path, record, backbones)``: checkpoints carrying a
  :class:`~cosod.methods.base.HeadRecord` (parent version, config, training data ids, metrics).
- ``maps(head, feats, hashes, max_refs=K, size=S, device=...) -> ModelMaps``: soft maps (B, S, S) in [0, 1]
  for a group, the (B, h, w, C) features RRBE pools into its prototype, optional (B, h, w) grid maps, and the
  reference indices (at most K; every image is compared with the same references).
- ``threshold`` ("group" or "map") and ``bm_bar(head)``: the adaptive threshold's mode and expected mean
  uncertainty B_bar.
- ``loss(module, batch, weights) -> (scalar, record)``: one training step's loss on a
  :class:`~cosod.methods.base.Batch`, used by from-scratch training (``batch.targets`` None or pseudo-labels)
  and by fine-tuning (targets from corrections, ``targets(masks, feats, S)``), both through the one loop of
  :mod:`cosod.loop`; ``train_defaults`` (epochs, weight decay, Adam betas); ``prepare_training`` (encode
  and make targets) and ``finish`` (e.g. re-measure B_bar) around it.

A third method is one new module here and one :func:`register` call (or a line in :data:`METHODS`); the
pipeline, training, fine-tuning, the CLI and the backend look everything up through this registry.
"""

from __future__ import annotations

from ..errors import UnknownMethodError
from .base import Batch, HeadRecord, LossWeights, Method, ModelMaps, TrainDefaults, TrainGroup
from .scosparc import SCoSPARC
from .ums import UMS

METHODS: dict[str, Method] = {m.name: m for m in (SCoSPARC(), UMS())}


def get_method(name: str) -> Method:
    """The method registered as ``name``; raises :class:`~cosod.errors.UnknownMethodError` (a ValueError)
    listing the known names."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(f"unknown model {name!r}; known: {', '.join(METHODS)}") from None


def register(method: Method) -> Method:
    """Add ``method`` under ``method.name`` (replacing one of that name) and return it."""
    if not isinstance(method, Method):
        raise TypeError(f"expected a cosod.methods.Method, got {type(method).__name__}")
    if not getattr(method, "name", ""):
        raise ValueError("a method needs a non-empty name")
    METHODS[method.name] = method
    return method


__all__ = [
    "METHODS",
    "UMS",
    "Batch",
    "HeadRecord",
    "LossWeights",
    "Method",
    "ModelMaps",
    "SCoSPARC",
    "TrainDefaults",
    "TrainGroup",
    "get_method",
    "register",
]
