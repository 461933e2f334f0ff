"""backend.labelstudio.labelconfig and the shipped configs in label_config/."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.errors import LabelConfigError
from backend.labelstudio.labelconfig import parse_label_config

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"


@pytest.mark.parametrize(
    ("name", "kind", "from_name"),
    [
        ("brush.xml", "brushlabels", "tag"),
        ("brush_grouped.xml", "brushlabels", "tag"),
        ("polygon.xml", "polygonlabels", "poly"),
    ],
)
def test_shipped_configs(name: str, kind: str, from_name: str) -> None:
    cfg = parse_label_config((CONFIGS / name).read_text())
    (c,) = cfg.controls
    assert (c.kind, c.from_name, c.to_name, c.value_key, c.label) == (
        kind,
        from_name,
        "image",
        "image",
        "Object",
    )


def test_grouped_config_shows_the_group_field() -> None:
    assert "$group" in (CONFIGS / "brush_grouped.xml").read_text()


def test_both_controls_and_label_choice() -> None:
    xml = (
        '<View><Image name="img" value="$photo"/><BrushLabels name="b" toName="img"><Label value="A"/>'
        '<Label value="B"/></BrushLabels><PolygonLabels name="p" toName="img"><Label value="B"/>'
        "</PolygonLabels></View>"
    )
    cfg = parse_label_config(xml, label="B")
    assert [(c.kind, c.label) for c in cfg.controls] == [("brushlabels", "B"), ("polygonlabels", "B")]
    assert cfg.image_key == "photo"
    with pytest.raises(LabelConfigError, match="'C'"):
        parse_label_config(xml, label="C")


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (
            '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image">'
            '<Label value="A"/></RectangleLabels></View>',
            "no BrushLabels or PolygonLabels.*<BrushLabels",
        ),
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        (
            '<View><Image name="image" value="$image"/><BrushLabels name="b" toName="other">'
            '<Label value="A"/>'
            "</BrushLabels></View>",
            "toName='other'",
        ),
        (
            '<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image"/></View>',
            "no <Label",
        ),
    ],
)
def test_bad_configs_name_the_fix(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)
