"""What this backend fills in a Label Studio labeling config: BrushLabels and/or PolygonLabels on an Image."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import LabelConfigError

SUPPORTED = ("brushlabels", "polygonlabels")
EXAMPLE = (
    '<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels> '
    '(or <PolygonLabels ...>) next to <Image name="image" value="$image"/>'
)


@dataclass(frozen=True)
class Control:
    """One control tag the backend fills: its type, names, the image data key and the label it writes."""

    kind: str  # "brushlabels" | "polygonlabels"
    from_name: str
    to_name: str
    value_key: str  # the task data key of the image, e.g. "image" for value="$image"
    label: str


@dataclass(frozen=True)
class LabelConfig:
    controls: tuple[Control, ...]

    @property
    def image_key(self) -> str:
        return self.controls[0].value_key


def parse_label_config(xml: str, *, label: str | None = None) -> LabelConfig:
    """Find the BrushLabels/PolygonLabels controls on an Image; raises LabelConfigError naming what to add.

    ``label`` picks the label to write (it must be one of the control's labels); by default the first.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError(f"the label config is empty; add {EXAMPLE}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the label config is not valid XML ({exc})") from None
    images = _images(root)
    controls = [_control(el, images, label) for el in root.iter() if el.tag.lower() in SUPPORTED]
    if not controls:
        raise LabelConfigError(f"the label config has no BrushLabels or PolygonLabels control; add {EXAMPLE}")
    # all controls must read the same image: a prediction is made for one image per task
    if len({c.value_key for c in controls}) > 1:
        raise LabelConfigError("the BrushLabels/PolygonLabels controls point to different images; use one")
    return LabelConfig(tuple(controls))


def _images(root: ET.Element) -> dict[str, str]:
    """Image tag name -> the task data key it shows (``value="$image"`` -> ``image``)."""
    images: dict[str, str] = {}
    for el in root.iter():
        if el.tag.lower() == "image" and el.get("name") and (el.get("value") or "").startswith("$"):
            images[el.get("name", "")] = el.get("value", "")[1:]
    return images


def _control(el: ET.Element, images: dict[str, str], label: str | None) -> Control:
    """One BrushLabels/PolygonLabels tag as a :class:`Control`, or the error that says what to fix."""
    name, to_name = el.get("name"), el.get("toName") or el.get("toname")
    if not name or not to_name:
        raise LabelConfigError(f"<{el.tag}> needs both name= and toName= attributes")
    target = to_name.split(",")[0].strip()
    if target not in images:
        raise LabelConfigError(
            f"<{el.tag} name={name!r}> points to toName={to_name!r}, which is not an "
            f'<Image name="{target}" value="$..."/> in the config'
        )
    labels = [v for v in (lab.get("value") or "" for lab in el.iter() if lab.tag.lower() == "label") if v]
    if not labels:
        raise LabelConfigError(
            f'<{el.tag} name={name!r}> has no <Label value="..."/>; add one, e.g. "Object"'
        )
    if label is not None and label not in labels:
        raise LabelConfigError(f"label {label!r} (extra_params) is not one of {labels} in <{el.tag}>")
    return Control(el.tag.lower(), name, target, images[target], label if label is not None else labels[0])
