"""Interactive prompts: Label Studio's ``params.context`` of a ``/predict`` call, parsed and checked.

Label Studio's interactive-annotating API (``POST /api/ml/<id>/interactive-annotating`` with
``{"task": id, "context": {"result": [...]}}``, which its editor calls when a region of a ``smart="true"``
tool is finished) forwards ``context`` unchanged as ``params.context``. Each region of ``context.result`` is
a prompt on the task's image:

- ``keypointlabels`` / ``keypoint``: ``value.x``, ``value.y`` in percent of the image (0..100);
- ``rectanglelabels`` / ``rectangle``: ``value.x``, ``value.y``, ``value.width``, ``value.height`` in percent,
  unrotated;
- ``brushlabels`` / ``brush``: ``value.rle`` (``format: "rle"``) with ``original_width`` /
  ``original_height``, at most :data:`MAX_PROMPT_RLE_BYTES` bytes of RLE.

``is_positive: false`` makes a prompt negative (what the object is not); missing means positive. Its
``from_name`` must be a tag of that type in the project's label config whose ``toName`` is the image this
backend fills, and ``to_name`` that image. Anything else is refused with :class:`BadRequestError` (400)
naming the region and the problem; a context with no region (``null``, ``{}``, ``{"result": []}``) has no
prompt, and the call is an ordinary prediction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadRequestError, quote
from ..labelstudio.labelconfig import LabelConfig, parse_config_xml
from ..learning.masks import union_brush_mask

KINDS = {
    "keypointlabels": "keypoint",
    "keypoint": "keypoint",
    "rectanglelabels": "rectangle",
    "rectangle": "rectangle",
    "brushlabels": "brush",
    "brush": "brush",
}
MAX_PROMPT_REGIONS = 64  # regions in one context
MAX_PROMPT_RLE_BYTES = 1 << 20  # RLE bytes of all brush prompts of one context
EPS = 1e-6  # percent: a rectangle may end at 100 + EPS


@dataclass(frozen=True)
class Prompt:
    """One checked prompt. ``kind``: keypoint | rectangle | brush; ``box``: (x, y, width, height) in percent
    (a keypoint: width = height = 0); ``region``: the raw region (a brush prompt's RLE is decoded later,
    at the image's size)."""

    index: int
    kind: str
    positive: bool
    from_name: str
    to_name: str
    box: tuple[float, float, float, float] | None
    region: Mapping[str, Any]


def has_prompt(context: Any) -> bool:
    """Whether ``context`` carries regions (checked by :func:`parse_prompts`); False for null, ``{}``,
    ``{"result": null}`` and ``{"result": []}``."""
    if context is None:
        return False
    if not isinstance(context, Mapping):
        raise BadRequestError(f"params.context must be an object, got {type(context).__name__}")
    result = context.get("result")
    return result is not None and result != []


def config_tags(label_config: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Control name -> (its tag in lower case, the object names of its ``toName``), for every named tag with
    a ``toName`` in a label config (read with the label config's own guards; the project's config already
    passed :func:`~backend.labelstudio.labelconfig.parse_label_config`)."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for el in parse_config_xml(label_config).iter():
        name, to = el.get("name"), el.get("toName") or el.get("toname")
        if name and to:
            out[name] = (el.tag.lower(), tuple(t.strip() for t in to.split(",")))
    return out


def parse_prompts(context: Any, label_config: str, config: LabelConfig) -> list[Prompt]:
    """The prompts of ``context`` (module doc); [] when it has none. Raises BadRequestError."""
    if not has_prompt(context):
        return []
    result = context["result"]
    if not isinstance(result, list):
        raise BadRequestError(f"params.context.result must be a list of regions, got {type(result).__name__}")
    if len(result) > MAX_PROMPT_REGIONS:
        raise BadRequestError(
            f"params.context.result has {len(result)} regions, over the limit of {MAX_PROMPT_REGIONS} prompts"
        )
    tags = config_tags(label_config)
    images = sorted({c.to_name.split(",")[0].strip() for c in config.controls})
    prompts = [_prompt(k, r, tags, images) for k, r in enumerate(result)]
    rle_bytes = sum(len(p.region["value"]["rle"]) for p in prompts if p.kind == "brush")
    if rle_bytes > MAX_PROMPT_RLE_BYTES:
        raise BadRequestError(
            f"the brush prompts hold {rle_bytes} bytes of RLE, over the limit of {MAX_PROMPT_RLE_BYTES}"
        )
    return prompts


def _prompt(
    k: int, region: Any, tags: Mapping[str, tuple[str, tuple[str, ...]]], images: list[str]
) -> Prompt:
    where = f"params.context.result[{k}]"
    if not isinstance(region, Mapping):
        raise BadRequestError(f"{where} must be a region object, got {type(region).__name__}")
    rtype = region.get("type")
    if not isinstance(rtype, str) or rtype.lower() not in KINDS:
        raise BadRequestError(
            f"{where}: region type {quote(rtype)} is not a prompt this backend understands "
            f"(one of {', '.join(KINDS)})"
        )
    rtype = rtype.lower()
    from_name, to_name = region.get("from_name"), region.get("to_name")
    if not isinstance(to_name, str) or to_name not in images:
        raise BadRequestError(
            f"{where}: to_name {quote(to_name)} is not the image this backend labels "
            f"({', '.join(map(quote, images))})"
        )
    tag = tags.get(from_name) if isinstance(from_name, str) else None
    if tag is None or tag[0] != rtype or to_name not in tag[1]:
        raise BadRequestError(
            f"{where}: from_name {quote(from_name)} is not a <{rtype}> control on {quote(to_name)} in the "
            "project's label config"
        )
    positive = region.get("is_positive", True)
    if not isinstance(positive, bool):
        raise BadRequestError(f"{where}: is_positive must be true or false, got {quote(positive)}")
    value = region.get("value")
    if not isinstance(value, Mapping):
        raise BadRequestError(f"{where}: 'value' must be an object, got {type(value).__name__}")
    kind = KINDS[rtype]
    box = None
    if kind == "keypoint":
        x, y = _percent(where, value, "x"), _percent(where, value, "y")
        box = (x, y, 0.0, 0.0)
    elif kind == "rectangle":
        x, y = _percent(where, value, "x"), _percent(where, value, "y")
        w, h = _percent(where, value, "width"), _percent(where, value, "height")
        if w <= 0 or h <= 0 or x + w > 100 + EPS or y + h > 100 + EPS:
            raise BadRequestError(
                f"{where}: the rectangle x={x}, y={y}, width={w}, height={h} (percent) is empty or leaves "
                "the image"
            )
        rotation: Any = value.get("rotation", 0)
        if not _number(rotation) or float(rotation) % 360 != 0:
            raise BadRequestError(f"{where}: rotated rectangles are not prompts (rotation {quote(rotation)})")
        box = (x, y, w, h)
    else:
        if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
            raise BadRequestError(f"{where}: a brush prompt needs value.rle, a list of bytes (format 'rle')")
    return Prompt(k, kind, positive, str(from_name), to_name, box, region)


def _number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # a JSON integer of hundreds of digits
        return False


def _percent(where: str, value: Mapping[str, Any], key: str) -> float:
    v: Any = value.get(key)
    if not _number(v) or not 0 <= float(v) <= 100:
        raise BadRequestError(f"{where}: value.{key} must be a number in 0..100 (percent), got {quote(v)}")
    return float(v)


def token_cell(x: float, y: float, shape: tuple[int, int], grid: tuple[int, int]) -> tuple[slice, slice]:
    """The pixels of the backbone token cell that holds the point (``x``, ``y`` in percent) of an image of
    ``shape`` (H, W) squashed to a ``grid`` (h, w) of tokens: rows and columns as slices (at least one
    pixel each)."""
    (H, W), (gh, gw) = shape, grid
    r = min(gh - 1, int(y / 100.0 * gh))
    c = min(gw - 1, int(x / 100.0 * gw))
    r0, r1 = (r * H) // gh, max((r * H) // gh + 1, ((r + 1) * H) // gh)
    c0, c1 = (c * W) // gw, max((c * W) // gw + 1, ((c + 1) * W) // gw)
    return slice(r0, r1), slice(c0, c1)


def box_pixels(box: tuple[float, float, float, float], shape: tuple[int, int]) -> tuple[slice, slice]:
    """A rectangle in percent -> rows and columns of pixels of an image of ``shape`` (at least one each)."""
    H, W = shape
    x, y, w, h = box
    r0 = min(H - 1, int(math.floor(y / 100.0 * H)))
    c0 = min(W - 1, int(math.floor(x / 100.0 * W)))
    r1 = max(r0 + 1, min(H, int(math.ceil((y + h) / 100.0 * H))))
    c1 = max(c0 + 1, min(W, int(math.ceil((x + w) / 100.0 * W))))
    return slice(r0, r1), slice(c0, c1)


def prompt_mask(p: Prompt, shape: tuple[int, int], grid: tuple[int, int], max_pixels: int) -> np.ndarray:
    """bool HxW: the pixels a prompt marks on an image of ``shape``: a keypoint its token cell, a rectangle
    its box, a brush its stroke (which must be at the image's size). Raises BadRequestError."""
    mask = np.zeros(shape, dtype=bool)
    if p.kind == "keypoint":
        assert p.box is not None
        mask[token_cell(p.box[0], p.box[1], shape, grid)] = True
    elif p.kind == "rectangle":
        assert p.box is not None
        mask[box_pixels(p.box, shape)] = True
    else:
        where = f"params.context.result[{p.index}]"
        region = {**p.region, "type": "brushlabels"}
        try:
            stroke = union_brush_mask([region], max_pixels=max_pixels)
        except ValueError as exc:  # BadRequestError and CorrectionRefusedError
            raise BadRequestError(f"{where}: {str(exc).removeprefix('region 0: ')}") from None
        if stroke is None:
            raise BadRequestError(f"{where}: the brush prompt has no RLE")
        if stroke.shape != shape:
            raise BadRequestError(
                f"{where}: the brush prompt is {stroke.shape[0]}x{stroke.shape[1]} (original_height x "
                f"original_width), the task's image is {shape[0]}x{shape[1]}"
            )
        mask = stroke
    return mask


__all__ = ["KINDS", "Prompt", "has_prompt", "parse_prompts", "prompt_mask", "token_cell"]
