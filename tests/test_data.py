"""Tests for cosod.data: the CoSOD folder layouts and the synthetic group generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cosod.data import Group, load_groups, make_synthetic_dataset, synthetic_group
from cosod.errors import DatasetError
from cosod.imageio import read_image, read_mask


def _touch_image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
    Image.fromarray(np.full((4, 5, 3), value, np.uint8)).save(path, format=fmt)


# ---------------------------------------------------------------------------------------------- layouts


def test_cosod_layout_with_stem_matching_and_missing_gt(tmp_path: Path) -> None:
    for name in ["b.JPG", "a.png", "c.jpeg", ".hidden.png"]:
        _touch_image(tmp_path / "images" / "zebra" / name)
    (tmp_path / "images" / "zebra" / "notes.txt").write_text("not an image")
    _touch_image(tmp_path / "images" / "apple" / "x.bmp")
    _touch_image(tmp_path / "gt" / "zebra" / "a.png")
    _touch_image(tmp_path / "gt" / "zebra" / "b.png")
    _touch_image(tmp_path / "gt" / "zebra" / "unrelated.png")

    groups = load_groups(tmp_path)

    assert [g.name for g in groups] == ["apple", "zebra"]
    zebra = groups[1]
    assert [p.name for p in zebra.images] == ["a.png", "b.JPG", "c.jpeg"]
    assert zebra.stems == ("a", "b", "c")
    assert zebra.gts == (tmp_path / "gt/zebra/a.png", tmp_path / "gt/zebra/b.png", None)
    assert groups[0].gts == (None,)  # no gt/apple folder at all
    assert len(zebra) == 3


def test_bare_layout_has_no_gt_and_hidden_folders_are_ignored(tmp_path: Path) -> None:
    _touch_image(tmp_path / "g2" / "img1.webp")
    _touch_image(tmp_path / "g1" / "img2.tif")
    _touch_image(tmp_path / "g1" / "img1.TIFF")
    _touch_image(tmp_path / ".cache" / "img.png")
    (tmp_path / "empty").mkdir()

    groups = load_groups(tmp_path)

    assert [g.name for g in groups] == ["g1", "g2"]
    assert groups[0].stems == ("img1", "img2")
    assert all(gt is None for g in groups for gt in g.gts)


def test_images_directly_in_root_form_one_group_named_after_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "my_set"
    _touch_image(root / "2.png")
    _touch_image(root / "1.jpg")
    groups = load_groups(str(root))
    assert len(groups) == 1
    assert groups[0].name == "my_set"
    assert groups[0].stems == ("1", "2")


def test_missing_root_raises_one_line_dataset_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as info:
        load_groups(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError)
    a_file = tmp_path / "file.png"
    _touch_image(a_file)
    with pytest.raises(DatasetError, match="not a folder"):
        load_groups(a_file)


def test_root_without_groups_raises(tmp_path: Path) -> None:
    (tmp_path / "empty_group").mkdir()
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError, match="no image groups found"):
        load_groups(tmp_path)


def test_two_images_with_one_stem_raise(tmp_path: Path) -> None:
    _touch_image(tmp_path / "g" / "a.jpg")
    _touch_image(tmp_path / "g" / "a.png")
    with pytest.raises(DatasetError, match="share the stem 'a'"):
        load_groups(tmp_path)


def test_group_validates_lengths_and_root_type() -> None:
    with pytest.raises(ValueError, match="2 images but 1 gt"):
        Group("g", (Path("a.png"), Path("b.png")), (None,))
    with pytest.raises(TypeError, match="42"):
        load_groups(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- synthetic


def _colours(image: np.ndarray, mask: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in c) for c in np.unique(image[mask].reshape(-1, 3), axis=0)}


def test_synthetic_group_shapes_dtypes_and_determinism() -> None:
    images, masks = synthetic_group(3, size=(64, 80), seed=7)
    assert len(images) == len(masks) == 3
    for image, mask in zip(images, masks, strict=True):
        assert image.shape == (64, 80, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 80) and mask.dtype == bool
    again_images, again_masks = synthetic_group(3, size=(64, 80), seed=7)
    for a, b in zip(images + masks, again_images + again_masks, strict=True):
        np.testing.assert_array_equal(a, b)
    # images within a group differ (position, scale, distractors)
    assert not np.array_equal(masks[0], masks[1])


def test_mask_is_exactly_the_common_striped_object() -> None:
    images, masks = synthetic_group(4, seed=3)
    common = _colours(images[0], masks[0])
    assert len(common) == 2  # two-colour stripes, no noise, nothing painted over it
    for image, mask in zip(images, masks, strict=True):
        assert 0.10 * mask.size <= mask.sum() <= 0.31 * mask.size
        assert ndimage.label(mask, np.ones((3, 3)))[1] == 1  # one 8-connected object
        assert _colours(image, mask) == common  # the same pattern in every image
        outside = image[~mask].reshape(-1, 3)
        hits = np.zeros(len(outside), bool)
        for colour in common:
            hits |= np.all(outside == np.array(colour, np.uint8), axis=1)
        assert hits.mean() < 0.002  # the object's colours do not occur elsewhere


def _saturated(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(float)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    return (hi - lo) / np.maximum(hi, 1) > 0.45


def test_distractors_are_present_and_never_touch_the_object() -> None:
    images, masks = synthetic_group(4, seed=11, n_distractors=3)
    for image, mask in zip(images, masks, strict=True):
        ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
        assert _saturated(image)[ring].mean() < 0.01  # a background gap around the object (noise aside)
        assert _saturated(image)[~mask].mean() > 0.02  # distractors are there (saturated, outside the mask)
    for image, mask in zip(*synthetic_group(4, seed=11, n_distractors=0), strict=True):
        assert _saturated(image)[~mask].mean() < 0.002  # the background alone is low-saturation
        assert _saturated(image)[mask].all()


def test_different_seeds_give_different_common_objects() -> None:
    colour_sets = []
    for seed in range(5):
        images, masks = synthetic_group(1, seed=seed)
        colour_sets.append(frozenset(_colours(images[0], masks[0])))
    assert len(set(colour_sets)) == 5


def test_absent_images_and_a_recurring_distractor() -> None:
    plain_images, plain_masks = synthetic_group(6, seed=4)
    images, masks = synthetic_group(6, seed=4, absent=[1, 4], recurring=[0, 1, 2])
    common = _colours(plain_images[0], plain_masks[0])
    for i in (3, 5):  # neither absent nor recurring: the same image as without the options
        np.testing.assert_array_equal(images[i], plain_images[i])
        np.testing.assert_array_equal(masks[i], plain_masks[i])
    for i in (1, 4):  # absent: an empty mask and none of the object's colours anywhere
        assert not masks[i].any()
        pixels = images[i].reshape(-1, 3)
        for colour in common:
            assert not np.all(pixels == np.array(colour, np.uint8), axis=1).any()
    recurring_colours = None
    for i in (0, 1, 2):  # the same saturated two-colour distractor, new pixels, off the object
        changed = np.any(images[i] != plain_images[i], axis=2) & ~plain_masks[i]
        assert changed.mean() > 0.03
        ring = ndimage.binary_dilation(masks[i], iterations=2) & ~masks[i]
        assert not (changed & ring).any()
        colours = {tuple(int(v) for v in c) for c in np.unique(images[i][changed], axis=0)}
        colours = {c for c in colours if max(c) - min(c) > 200}  # the fully saturated stripes
        assert len(colours) == 2
        recurring_colours = recurring_colours or colours
        assert colours == recurring_colours


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_images": 0}, "n_images must be an int >= 1, got 0"),
        ({"n_images": 2, "size": (10, 64)}, r"size\[0\] \(H\) must be an int >= 32, got 10"),
        ({"n_images": 2, "size": 64}, "size must be"),
        ({"n_images": 2, "n_distractors": -1}, "n_distractors must be an int >= 0, got -1"),
        ({"n_images": 2, "seed": 1.5}, "seed must be an int >= 0, got 1.5"),
        ({"n_images": 2, "absent": [2]}, "absent: 2 is not an image index of a group of 2"),
        ({"n_images": 2, "recurring": "01"}, "recurring must be a sequence of image indices"),
    ],
)
def test_synthetic_group_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic_group(**kwargs)


def test_make_synthetic_dataset_round_trips(tmp_path: Path) -> None:
    groups = make_synthetic_dataset(tmp_path, n_groups=2, n_images=3, size=(48, 64), seed=1)
    assert [g.name for g in groups] == ["synth_00", "synth_01"]
    assert groups[1].stems == ("synth_01_0", "synth_01_1", "synth_01_2")
    assert all(gt is not None for g in groups for gt in g.gts)
    images, masks = synthetic_group(3, size=(48, 64), seed=1001)
    gt_path = groups[1].gts[2]
    assert gt_path is not None
    np.testing.assert_array_equal(read_image(groups[1].images[2]), images[2])
    gt = read_mask(gt_path)
    assert set(np.unique(gt).tolist()) == {0, 255}
    np.testing.assert_array_equal(gt > 128, masks[2])
