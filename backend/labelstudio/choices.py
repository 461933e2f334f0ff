"""The "no common object" choice: a ``<Choice>`` of a ``<Choices>`` control on the task's image that says
"this image does not contain the group's object".

Which choice it is (:func:`find_absence_choice`):

- named: extra params ``{"absence_choice": "<value>"}`` name the ``<Choice>`` by its ``value`` (or its
  ``alias``); the config must then have a ``<Choices toName="<the image>">`` holding it, else the config is
  refused (400 naming the value and the choices it has);
- otherwise found by convention: the first ``<Choice value="No common object"/>`` (:data:`ABSENCE_VALUE`;
  compared without regard to case or surrounding spaces) of a ``<Choices>`` on the image;
- none: the config has no such choice (nothing is refused: an image judged without the object then simply
  gets no region).

A prediction for an image judged without the object carries :func:`choice_region`; an annotation whose
result selects the choice (:func:`selects_absence`) is read as "no common object", brush or not.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import LabelConfigError, quote
from .regions import region_id

ABSENCE_VALUE = "No common object"  # the Choice value found by convention
MAX_RESULT_REGIONS = 10_000  # an annotation with more regions is left to the mask parser (which refuses it)


@dataclass(frozen=True)
class AbsenceChoice:
    """The ``<Choices name=from_name toName=to_name>`` control and the value its result carries."""

    from_name: str
    to_name: str
    value: str


def find_absence_choice(
    root: ET.Element, images: Mapping[str, str], image_key: str, wanted: str | None
) -> AbsenceChoice | None:
    """The absence choice of a parsed config (module doc). ``images``: Image name -> data key; only
    ``<Choices>`` whose ``toName`` is an Image showing ``image_key`` count. ``wanted``: the value named in
    extra params (None: the convention). Raises :class:`LabelConfigError` when ``wanted`` is not there."""
    seen: list[str] = []
    for el in root.iter():
        if el.tag.lower() != "choices":
            continue
        name = el.get("name")
        target = (el.get("toName") or el.get("toname") or "").split(",")[0].strip()
        if not name or images.get(target) != image_key:
            continue
        for choice in el.iter():
            if choice.tag.lower() != "choice":
                continue
            value, alias = choice.get("value") or "", choice.get("alias") or ""
            stored = alias or value  # Label Studio stores the alias when a choice has one
            seen.append(value)
            if wanted is None:
                if value.strip().lower() == ABSENCE_VALUE.lower():
                    return AbsenceChoice(name, target, stored)
            elif wanted in (value, alias) and stored:
                return AbsenceChoice(name, target, stored)
    if wanted is None:
        return None
    where = f"its choices on the image are {quote(seen)}" if seen else "it has no <Choices> on the image"
    raise LabelConfigError(
        f"absence_choice {quote(wanted)} (extra_params) is not a <Choice value=...> of a <Choices "
        f'toName="..."> on the image in the label config; {where}. Add <Choices name="absence" '
        f'toName="image"><Choice value={quote(wanted)}/></Choices> or name one of its choices'
    )


def choice_region(choice: AbsenceChoice, task_id: int) -> dict[str, Any]:
    """The result region of a prediction that selects the absence choice."""
    return {
        "id": region_id(task_id, choice.from_name),
        "from_name": choice.from_name,
        "to_name": choice.to_name,
        "type": "choices",
        "value": {"choices": [choice.value]},
    }


def selects_absence(result: Any, choice: AbsenceChoice | None) -> bool:
    """Whether an annotation ``result`` (a list of regions) selects the absence choice; False for anything
    malformed (the mask parser then says what is wrong with it)."""
    if choice is None or not isinstance(result, list) or len(result) > MAX_RESULT_REGIONS:
        return False
    for region in result:
        if not isinstance(region, Mapping) or str(region.get("type", "")).lower() != "choices":
            continue
        if region.get("from_name") != choice.from_name:
            continue
        value = region.get("value")
        picked = value.get("choices") if isinstance(value, Mapping) else None
        if isinstance(picked, list) and choice.value in picked:
            return True
    return False
