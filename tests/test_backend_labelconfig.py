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
        ("brush_interactive.xml", "brushlabels", "tag"),
        ("polygon.xml", "polygonlabels", "poly"),
        ("bitmask.xml", "bitmasklabels", "tag"),
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


def test_no_config_shows_a_data_field_that_a_task_may_lack() -> None:
    """Label Studio renders ``$name`` of a task without that field as "undefined": the configs show only
    ``$image``, which every task has."""
    import re

    for path in sorted(CONFIGS.glob("*.xml")):
        body = re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.S)
        assert set(re.findall(r"\$(\w+)", body)) <= {"image"}, path.name


def test_bitmask_config_shows_only_fields_every_task_has() -> None:
    # a Header over a data field a task lacks shows "undefined"; every task has data.image
    import re

    text = (CONFIGS / "bitmask.xml").read_text()
    assert set(re.findall(r"\$\w+", text)) == {"$image"}
    assert '<Header value="$image"/>' in text and 'smoothing="false"' in text


def test_bitmask_next_to_brush_and_polygon() -> None:
    xml = (
        '<View><Image name="img" value="$photo"/><BitmaskLabels name="m" toName="img"><Label value="A"/>'
        '<Label value="B"/></BitmaskLabels><BrushLabels name="b" toName="img"><Label value="B"/>'
        '</BrushLabels><PolygonLabels name="p" toName="img"><Label value="B"/></PolygonLabels></View>'
    )
    cfg = parse_label_config(xml, label="B")
    assert [(c.kind, c.from_name, c.label) for c in cfg.controls] == [
        ("bitmasklabels", "m", "B"),
        ("brushlabels", "b", "B"),
        ("polygonlabels", "p", "B"),
    ]
    assert parse_label_config(xml).controls[0].label == "A"
    with pytest.raises(LabelConfigError, match="<BitmaskLabels name='m'> has no <Label"):
        parse_label_config('<View><Image name="i" value="$i"/><BitmaskLabels name="m" toName="i"/></View>')


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
            "no BrushLabels, BitmaskLabels or PolygonLabels.*<BrushLabels",
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


# -- hostile and oversized configs (issue 13) -----------------------------------------------------------

IMAGE = '<Image name="image" value="$image"/>'


def brush(name: str = "tag", labels: int = 1, label: str = "Object") -> str:
    body = "".join(f'<Label value="{label}{i or ""}"/>' for i in range(labels))
    return f'<BrushLabels name="{name}" toName="image">{body}</BrushLabels>'


def test_the_caps_are_inclusive() -> None:
    from backend.labelstudio.labelconfig import MAX_CONTROLS, MAX_LABELS

    xml = f"<View>{IMAGE}{''.join(brush(f't{i}') for i in range(MAX_CONTROLS))}</View>"
    assert len(parse_label_config(xml).controls) == MAX_CONTROLS
    assert parse_label_config(f"<View>{IMAGE}{brush(labels=MAX_LABELS)}</View>").controls[0].label == "Object"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (
            f"<View>{IMAGE}{brush() * 17}</View>",
            "17 BrushLabels/BitmaskLabels/PolygonLabels controls, over the limit of 16",
        ),
        (f"<View>{IMAGE}{brush(labels=1001)}</View>", "1001 <Label> tags .* over the limit of 1000"),
        (f"<View>{IMAGE * 65}{brush()}</View>", "65 <Image> tags, over the limit of 64"),
        (f"<View>{IMAGE}{brush(name='n' * 257)}</View>", "over the limit of 256 characters"),
        (f"<View>{IMAGE}{brush(label='L' * 257)}</View>", "label 'L.*over the limit of 256 characters"),
        (f'<View><Image name="image" value="${"v" * 300}"/>{brush()}</View>', "over the limit of 256"),
    ],
)
def test_configs_over_a_cap_name_it(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message) as info:
        parse_label_config(xml)
    assert len(str(info.value)) < 400


def test_thousands_of_controls_are_refused_at_once() -> None:
    # 20,000 BrushLabels once turned a 116-byte /predict into a 28 MB answer
    with pytest.raises(LabelConfigError, match="over the limit of 1048576 bytes"):
        parse_label_config(f"<View>{IMAGE}{brush() * 20_000}</View>")
    with pytest.raises(
        LabelConfigError, match="5000 BrushLabels/BitmaskLabels/PolygonLabels controls, over the limit of 16"
    ):
        parse_label_config(f"<View>{IMAGE}{brush() * 5_000}</View>")


def test_the_config_size_is_capped_in_bytes() -> None:
    from backend.labelstudio.labelconfig import MAX_CONFIG_BYTES

    filler = f"<!-- {'é' * (MAX_CONFIG_BYTES // 2 + 10)} -->"  # fewer characters than bytes
    assert len(filler) < MAX_CONFIG_BYTES < len(filler.encode())
    with pytest.raises(LabelConfigError, match=f"bytes, over the limit of {MAX_CONFIG_BYTES} bytes"):
        parse_label_config(f"<View>{IMAGE}{brush()}{filler}</View>")
    with pytest.raises(LabelConfigError, match="characters, over the limit"):
        parse_label_config(" " * (MAX_CONFIG_BYTES + 1) + f"<View>{IMAGE}{brush()}</View>")


def test_a_lone_surrogate_is_refused_not_crashed() -> None:
    with pytest.raises(LabelConfigError, match="lone surrogate"):
        parse_label_config("<View>" + IMAGE + brush(label="\ud800") + "</View>")


def test_untrusted_names_in_messages_are_quoted_and_cut() -> None:
    xml = f"<View>{IMAGE}{brush(labels=900, label='x' * 200)}</View>"
    with pytest.raises(LabelConfigError, match="is not one of") as info:
        parse_label_config(xml, label="\x1b[31m" + "y" * 5000)
    assert len(str(info.value)) < 600 and "\x1b" not in str(info.value)


XXE = (
    '<?xml version="1.0"?><!DOCTYPE View [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    f'<View>{IMAGE}<BrushLabels name="tag" toName="image"><Label value="&x;"/></BrushLabels></View>'
)
LAUGHS = (
    '<!DOCTYPE View [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {n} "{("&" + p + ";") * 10}">' for p, n in zip("abcdefgh", "bcdefghi", strict=True))
    + f']><View>{IMAGE}<BrushLabels name="tag" toName="image"><Label value="&i;"/></BrushLabels></View>'
)


@pytest.mark.parametrize("xml", [XXE, LAUGHS])
def test_dtds_are_refused(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="DOCTYPE"):
        parse_label_config(xml)


@pytest.mark.parametrize(("xml", "message"), [(XXE, "external entity"), (LAUGHS, "amplification")])
def test_the_parser_refuses_entities_as_well(xml: str, message: str) -> None:
    import xml.etree.ElementTree as ET

    with pytest.raises(ET.ParseError, match=message):  # the second line of defence behind the DOCTYPE check
        ET.fromstring(xml)
