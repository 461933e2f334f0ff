"""A task's outcome -> the ``result`` list Label Studio stores: one region per control the backend fills
(brush RLE, bitmask PNG or polygons) for a mask; nothing for an empty mask; for an image judged without the
group's object (:mod:`backend.prediction.absence`) no mask region, only the "no common object" choice when
the config has one."""

from __future__ import annotations

from typing import Any

from ..labelstudio import regions as regions_lib
from ..labelstudio.bitmask import bitmask_region
from ..labelstudio.choices import choice_region
from ..labelstudio.labelconfig import LabelConfig
from .groupcache import Outcome


def result_regions(config: LabelConfig, task_id: int, out: Outcome) -> list[dict[str, Any]]:
    """The regions of ``out`` (which has a mask) for ``config``'s controls (module doc)."""
    assert out.mask is not None
    if out.absent:
        return [choice_region(config.absence, task_id)] if config.absence is not None else []
    regions: list[dict[str, Any]] = []
    if not out.mask.any():
        return regions
    for c in config.controls:
        rid = regions_lib.region_id(task_id, c.from_name)
        names = {"from_name": c.from_name, "to_name": c.to_name, "label": c.label}
        if c.kind == "brushlabels":
            regions.append(regions_lib.brush_region(out.mask, **names, score=out.score, rid=rid))
        elif c.kind == "bitmasklabels":
            regions.append(bitmask_region(out.mask, **names, score=out.score, rid=rid))
        else:
            regions.extend(regions_lib.polygon_regions(out.mask, **names, score=out.score, rid=rid))
    return regions
