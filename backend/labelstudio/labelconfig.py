"""What this backend fills in a Label Studio labeling config: BrushLabels, BitmaskLabels and/or PolygonLabels
on an Image.

A label config reaches this backend from ``/setup``, ``/predict`` and Label Studio's project, and every
control it fills adds a region to every prediction, so its size is bounded before anything else:

- :data:`MAX_CONFIG_BYTES` (1 MiB of UTF-8) for the whole text;
- :data:`MAX_CONTROLS` (16) BrushLabels/BitmaskLabels/PolygonLabels tags, :data:`MAX_LABELS` (1000)
  ``<Label>`` tags in them together, :data:`MAX_OBJECTS` (64) ``<Image>`` tags;
- :data:`MAX_NAME_CHARS` (256) characters for a name, ``toName``, ``value`` or label, which every region
  repeats.

A config over a cap is refused with :class:`LabelConfigError` naming the cap. A ``<!DOCTYPE`` (a DTD, hence
entities: XXE, "billion laughs") is refused outright; the parser also refuses undefined entities and
entity expansion beyond expat's amplification limit.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import LabelConfigError, quote
from .choices import AbsenceChoice, find_absence_choice

SUPPORTED = ("brushlabels", "bitmasklabels", "polygonlabels")
NAMES = "BrushLabels/BitmaskLabels/PolygonLabels"
EXAMPLE = (
    '<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels> '
    '(or <BitmaskLabels ...> or <PolygonLabels ...>) next to <Image name="image" value="$image"/>'
)
MAX_CONFIG_BYTES = 1 << 20  # the whole config, UTF-8
MAX_CONTROLS = 16  # BrushLabels/BitmaskLabels/PolygonLabels tags; each adds a region to every prediction
MAX_LABELS = 1000  # <Label> tags inside those controls, together
MAX_OBJECTS = 64  # <Image> tags
MAX_NAME_CHARS = 256  # a name, toName, value or label (each region repeats them)


@dataclass(frozen=True)
class Control:
    """One control tag the backend fills: its type, names, the image data key and the label it writes."""

    kind: str  # "brushlabels" | "bitmasklabels" | "polygonlabels"
    from_name: str
    to_name: str
    value_key: str  # the task data key of the image, e.g. "image" for value="$image"
    label: str


@dataclass(frozen=True)
class LabelConfig:
    controls: tuple[Control, ...]
    absence: AbsenceChoice | None = None  # the "no common object" choice (backend.labelstudio.choices)

    @property
    def image_key(self) -> str:
        return self.controls[0].value_key


def parse_label_config(
    xml: str, *, label: str | None = None, absence_choice: str | None = None
) -> LabelConfig:
    """Find the BrushLabels/BitmaskLabels/PolygonLabels controls on an Image; raises LabelConfigError
    naming what to add.

    ``label`` picks the label to write (it must be one of the control's labels); by default the first.
    ``absence_choice``: the value of the "no common object" ``<Choice>`` (None: found by its conventional
    value, if the config has it; see :mod:`backend.labelstudio.choices`).
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError(f"the label config is empty; add {EXAMPLE}")
    root = parse_config_xml(xml)
    tags = [el for el in root.iter() if el.tag.lower() in SUPPORTED]
    _at_most(len(tags), MAX_CONTROLS, f"{NAMES} controls")
    _at_most(sum(1 for el in root.iter() if el.tag.lower() == "image"), MAX_OBJECTS, "<Image> tags")
    _at_most(
        sum(1 for t in tags for el in t.iter() if el.tag.lower() == "label"),
        MAX_LABELS,
        f"<Label> tags in the {NAMES} controls",
    )
    images = _images(root)
    controls = [_control(el, images, label) for el in tags]
    if not controls:
        raise LabelConfigError(
            f"the label config has no BrushLabels, BitmaskLabels or PolygonLabels control; add {EXAMPLE}"
        )
    # all controls must read the same image: a prediction is made for one image per task
    if len({c.value_key for c in controls}) > 1:
        raise LabelConfigError(f"the {NAMES} controls point to different images; use one")
    if absence_choice is not None:
        _name(absence_choice, "absence_choice")
    absence = find_absence_choice(root, images, controls[0].value_key, absence_choice)
    if absence is not None:
        _name(absence.from_name, "<Choices name=...>")
        _name(absence.value, "<Choice value=...>")
    return LabelConfig(tuple(controls), absence)


def parse_config_xml(xml: str) -> ET.Element:
    """The config's root element, once the text is within :data:`MAX_CONFIG_BYTES`, valid Unicode and
    without a DOCTYPE."""
    if len(xml) > MAX_CONFIG_BYTES:  # at least as many bytes as characters: no need to encode it
        raise LabelConfigError(
            f"the label config has {len(xml)} characters, over the limit of {MAX_CONFIG_BYTES} bytes"
        )
    try:
        size = len(xml.encode("utf-8"))
    except UnicodeEncodeError:
        raise LabelConfigError("the label config holds a lone surrogate (not a Unicode character)") from None
    if size > MAX_CONFIG_BYTES:
        raise LabelConfigError(
            f"the label config has {size} bytes, over the limit of {MAX_CONFIG_BYTES} bytes"
        )
    if "<!DOCTYPE" in xml:
        raise LabelConfigError("the label config has a <!DOCTYPE> (DTD, entities); a label config needs none")
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"the label config is not valid XML ({quote(str(exc))})") from None


def _at_most(count: int, cap: int, what: str) -> None:
    if count > cap:
        raise LabelConfigError(f"the label config has {count} {what}, over the limit of {cap}")


def _name(value: str, what: str) -> str:
    """``value`` when it is at most :data:`MAX_NAME_CHARS` characters long."""
    if len(value) > MAX_NAME_CHARS:
        raise LabelConfigError(f"{what} {quote(value)} is over the limit of {MAX_NAME_CHARS} characters")
    return value


def _images(root: ET.Element) -> dict[str, str]:
    """Image tag name -> the task data key it shows (``value="$image"`` -> ``image``)."""
    images: dict[str, str] = {}
    for el in root.iter():
        if el.tag.lower() == "image" and el.get("name") and (el.get("value") or "").startswith("$"):
            name = _name(el.get("name", ""), "<Image name=...>")
            images[name] = _name(el.get("value", ""), "<Image value=...>")[1:]
    return images


def _control(el: ET.Element, images: dict[str, str], label: str | None) -> Control:
    """One BrushLabels/BitmaskLabels/PolygonLabels tag as a :class:`Control`, or the error that says what
    to fix."""
    name, to_name = el.get("name"), el.get("toName") or el.get("toname")
    if not name or not to_name:
        raise LabelConfigError(f"<{el.tag}> needs both name= and toName= attributes")
    name = _name(name, f"<{el.tag} name=...>")
    to_name = _name(to_name, f"<{el.tag} toName=...>")
    target = to_name.split(",")[0].strip()
    if target not in images:
        raise LabelConfigError(
            f"<{el.tag} name={quote(name)}> points to toName={quote(to_name)}, which is not an "
            f'<Image name={quote(target)} value="$..."/> in the config'
        )
    labels = [v for v in (lab.get("value") or "" for lab in el.iter() if lab.tag.lower() == "label") if v]
    if not labels:
        raise LabelConfigError(
            f'<{el.tag} name={quote(name)}> has no <Label value="..."/>; add one, e.g. "Object"'
        )
    for value in labels:
        _name(value, f"<{el.tag} name={quote(name)}> label")
    if label is not None and label not in labels:
        raise LabelConfigError(
            f"label {quote(label)} (extra_params) is not one of {quote(labels)} in <{el.tag}>"
        )
    return Control(el.tag.lower(), name, target, images[target], label if label is not None else labels[0])
