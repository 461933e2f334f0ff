"""On-disk cache of backbone features per (image content, backbone, input size).

Layout: ``<root>/<backbone id>/<hash[:2]>/<hash>.npz`` holding ``tokens``, ``keys`` (h x w x C) and
``cls_attention`` (h x w). Writes go to a temp file in the same folder and are renamed into place, so readers
in other processes only ever see complete files; two processes writing the same entry write the same bytes,
and the last rename wins. An unreadable entry is treated as a miss and replaced.

**Precision.** Features are float32 by default, as the official SCoSPARC code feeds them into stage 1:
rounding them to float16 moves the group confidence by up to 4e-4 and flips thresholded pixels (15 of the 32
images of the equivalence set). ``precision="float16"`` is the named option that halves the cache's disk; it
rounds the features to float16 with or without a cache (so a hit returns exactly what a miss computes) and is
**not** bit-exact with the official code. A float16 entry read at float32 is a miss (computed again and
replaced by a float32 one); a float32 entry read at float16 is rounded, which is what a miss would give.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .backbones import Backbone, BackboneFeatures

log = logging.getLogger(__name__)


def image_hash(image: np.ndarray) -> str:
    """sha256 of an image's pixels and shape (the same picture saved as PNG or JPEG-decoded differs)."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{arr.dtype}:{arr.shape}:".encode())
    h.update(arr.data)
    return h.hexdigest()


PRECISIONS = ("float32", "float16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"feature precision must be 'float32' or 'float16', got {precision!r}")
    return precision


def _at(feats: BackboneFeatures, precision: str) -> BackboneFeatures:
    """``feats`` as float32 tensors holding values of ``precision`` (float16 rounds them)."""
    if precision == "float32":
        return BackboneFeatures(feats.tokens.float(), feats.keys.float(), feats.cls_attention.float())
    return BackboneFeatures(
        feats.tokens.half().float(), feats.keys.half().float(), feats.cls_attention.half().float()
    )


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class FeatureCache:
    """Backbone features keyed by image content hash and backbone id, stored under ``root``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.stats = CacheStats()

    def _path(self, digest: str, backbone_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone_id)
        return self.root / safe / digest[:2] / f"{digest}.npz"

    def get(self, digest: str, backbone_id: str, precision: str = "float32") -> BackboneFeatures | None:
        """Features of one image (batch dim 1) at ``precision``, or None on a miss (also for an entry
        stored at a lower precision than asked)."""
        path = self._path(digest, backbone_id)
        try:
            with np.load(path) as data:
                if precision == "float32" and data["tokens"].dtype != np.float32:
                    self.stats.misses += 1
                    return None
                feats = _at(
                    BackboneFeatures(
                        torch.from_numpy(data["tokens"].astype(np.float32))[None],
                        torch.from_numpy(data["keys"].astype(np.float32))[None],
                        torch.from_numpy(data["cls_attention"].astype(np.float32))[None],
                    ),
                    precision,
                )
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("feature cache entry %s is unreadable (%s); recomputing", path, exc)
            path.unlink(missing_ok=True)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return feats

    def put(self, digest: str, backbone_id: str, feats: BackboneFeatures, precision: str = "float32") -> None:
        """Store the features of one image (batch dim 1) at ``precision``."""
        path = self._path(digest, backbone_id)
        dtype = np.float16 if check_precision(precision) == "float16" else np.float32
        atomic_write(
            path,
            lambda f: np.savez(
                f,
                tokens=feats.tokens[0].numpy().astype(dtype),
                keys=feats.keys[0].numpy().astype(dtype),
                cls_attention=feats.cls_attention[0].numpy().astype(dtype),
            ),
        )


def encode_images(
    backbone: Backbone,
    images: Sequence[np.ndarray],
    *,
    cache: FeatureCache | None = None,
    hashes: Sequence[str] | None = None,
    batch_size: int = 8,
    precision: str = "float32",
) -> BackboneFeatures:
    """Features of ``images`` (list of HxWx3 uint8 RGB), from the cache where present; the backbone runs only
    on the misses, in chunks of ``batch_size``. Results are float32 tensors holding values of ``precision``
    (float16: rounded; see the module docstring)."""
    check_precision(precision)
    if hashes is not None and len(hashes) != len(images):
        raise ValueError(f"{len(hashes)} hashes for {len(images)} images")
    if cache is None:
        return _at(backbone.encode(images, batch_size=batch_size), precision)
    digests = list(hashes) if hashes is not None else [image_hash(im) for im in images]
    found: dict[int, BackboneFeatures] = {}
    missing: list[int] = []
    for i, d in enumerate(digests):
        hit = cache.get(d, backbone.id, precision)
        if hit is None:
            missing.append(i)
        else:
            found[i] = hit
    if missing:
        fresh = _at(backbone.encode([images[i] for i in missing], batch_size=batch_size), precision)
        for row, i in enumerate(missing):
            one = fresh.select([row])
            cache.put(digests[i], backbone.id, one, precision)
            found[i] = one
    return BackboneFeatures.concat([found[i] for i in range(len(images))])
