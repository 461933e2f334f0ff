"""The opt-in absence decision on the serving path: images judged without the group's object.

Off by default (``COSOD_ABSENCE=0``; per project extra params ``{"absence": true}``): the official method has
no such decision, it always writes a mask. On, every unprompted prediction of the project (``/predict``, the
pre-annotation jobs) and every propagation job runs :mod:`cosod.absence` on the group it computes: an image
whose best region matches the group prototype far worse than the rest of the group (leave-one-out robust
z-score below -3) is judged without the object. Its prediction then has

- no mask region (no brush, bitmask or polygon region),
- score **0.0** (the score of any empty mask: sorted by prediction score, these tasks come first for review),
- and, when the label config has the "no common object" ``<Choice>`` (:mod:`backend.labelstudio.choices`),
  a ``choices`` region selecting it.

Images judged present get their mask as before (the choice is left unset).

**model_version.** A project with the decision on serves ``<the version it would serve>`` + :data:`SUFFIX`
(e.g. ``scosparc-p12-3fa4c2d1-absence``): its predictions differ from the official method's, so Label Studio's
dedup and the group cache must keep them apart, and switching the setting re-predicts. Off, nothing changes:
the version is the official method's, and ``PipelineConfig.absence`` (off) is not part of the hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SUFFIX = "-absence"


class AbsencePipeline:
    """A serving pipeline with the absence decision on: ``predict_group`` and ``masks_from_maps`` run it
    unless told otherwise; everything else is the wrapped pipeline's."""

    absence = True

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_group(
        self, images: Sequence[Any], *, hashes: Sequence[str] | None = None, absence: bool | None = None
    ) -> Any:
        return self.inner.predict_group(images, hashes=hashes, absence=True if absence is None else absence)

    def masks_from_maps(
        self, images: Sequence[Any], maps: Any, *, absence: bool | None = None, **kw: Any
    ) -> Any:
        return self.inner.masks_from_maps(images, maps, absence=True if absence is None else absence, **kw)


def serve(absence: bool, pipeline: Any, version: str) -> tuple[Any, str]:
    """``(pipeline, model_version)`` a project serves: as given with the decision off, else wrapped and
    suffixed (module doc)."""
    return (AbsencePipeline(pipeline) if absence else pipeline), versioned(absence, version)


def versioned(absence: bool, version: str) -> str:
    """The name a project's predictions of ``version`` carry (suffixed with the decision on)."""
    return version + SUFFIX if absence else version
