"""Image groups in the CoSOD layout, and a synthetic group generator for tests and demos.

Layouts read by :func:`load_groups`:

- CoSOD layout: ``<root>/images/<group>/<name>.<ext>`` with optional ground truth
  ``<root>/gt/<group>/<name>.png`` (same stem as the image).
- Bare layout (prediction input): ``<root>/<group>/<name>.<ext>``, no ground truth.
- Images directly in ``<root>`` (or ``<root>/images``): one group named after ``<root>``.

Image extensions: jpg, jpeg, png, bmp, tif, tiff, webp (any case). Hidden files and folders (name starting
with ``.``) are ignored. Groups are sorted by folder name and images by file name, so the order never
depends on the file system.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon2mask

from .errors import DatasetError
from .imageio import write_mask

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
SHAPE_KINDS = ("ellipse", "star", "cross", "triangle", "diamond")


@dataclass(frozen=True)
class Group:
    """One image group: ``images[k]`` has ground truth ``gts[k]`` (a PNG path) or ``None``."""

    name: str
    images: tuple[Path, ...]
    gts: tuple[Path | None, ...]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.gts):
            raise ValueError(f"group {self.name!r}: {len(self.images)} images but {len(self.gts)} gt entries")

    @property
    def stems(self) -> tuple[str, ...]:
        """File names without extension, in image order (prediction masks are written as ``<stem>.png``)."""
        return tuple(p.stem for p in self.images)

    def __len__(self) -> int:
        return len(self.images)


def _visible(entries: list[Path]) -> list[Path]:
    return sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    entries = _visible(list(folder.iterdir()))
    return [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _make_group(name: str, folder: Path, gt_folder: Path | None) -> Group | None:
    images = _image_files(folder)
    if not images:
        log.warning("skipping %s: no image files (%s)", folder, ", ".join(sorted(IMAGE_EXTENSIONS)))
        return None
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise DatasetError(f"group {name!r}: {seen[p.stem].name} and {p.name} share the stem {p.stem!r}")
        seen[p.stem] = p
    gt_by_stem: dict[str, Path] = {}
    if gt_folder is not None and gt_folder.is_dir():
        for p in _visible(list(gt_folder.iterdir())):
            if p.is_file() and p.suffix.lower() == ".png":
                gt_by_stem.setdefault(p.stem, p)
    gts = tuple(gt_by_stem.get(p.stem) for p in images)
    missing = sum(g is None for g in gts)
    if gt_folder is not None and 0 < missing < len(gts):
        log.warning("group %r: %d of %d images lack ground truth in %s", name, missing, len(gts), gt_folder)
    return Group(name=name, images=tuple(images), gts=gts)


def load_groups(root: str | os.PathLike[str]) -> list[Group]:
    """The groups under ``root`` (see the module docstring for the layouts), sorted by name.

    Raises :class:`DatasetError` when ``root`` is not a folder or holds no group with at least one image.
    Folders without images are skipped with a warning; two images with the same stem in one group raise.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__} {root!r}")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")
    image_root, gt_root = root, None
    if (root / "images").is_dir():
        image_root, gt_root = root / "images", root / "gt"
    subdirs = [p for p in _visible(list(image_root.iterdir())) if p.is_dir()]
    groups: list[Group] = []
    for folder in subdirs:
        group = _make_group(folder.name, folder, gt_root / folder.name if gt_root is not None else None)
        if group is not None:
            groups.append(group)
    loose = _image_files(image_root)
    if loose and subdirs:
        log.warning("ignoring %d image files directly in %s (beside group folders)", len(loose), image_root)
    elif loose:
        group = _make_group(root.name, image_root, gt_root)
        if group is not None:
            groups.append(group)
    if not groups:
        raise DatasetError(
            f"no image groups found in {root}: expected {root}/images/<group>/<image> "
            f"or {root}/<group>/<image>"
        )
    log.debug("loaded %d groups, %d images from %s", len(groups), sum(len(g) for g in groups), root)
    return groups


# ---------------------------------------------------------------------------------------------- synthetic


def _unit_shape(kind: str, aspect: float) -> np.ndarray:
    """Polygon vertices (K x 2, x/y) of a shape centred on 0 with radius about 1."""
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack([np.cos(t), aspect * np.sin(t)], axis=1)
    if kind == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if kind == "cross":
        a = 0.35
        xs = [-a, a, a, 1, 1, a, a, -a, -a, -1, -1, -a]
        ys = [-1, -1, -a, -a, a, a, 1, 1, a, a, -a, -a]
        return np.array([xs, ys], dtype=float).T
    if kind == "triangle":
        t = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind == "diamond":
        return np.array([[0, -1], [aspect, 0], [0, 1], [-aspect, 0]], dtype=float)
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}")


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _place(rng: np.random.Generator, unit: np.ndarray, frac: float, size: tuple[int, int]) -> np.ndarray:
    """A rotated, scaled, shifted copy of ``unit`` covering about ``frac`` of the image, fully inside it."""
    h, w = size
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    poly = unit @ rot.T
    scale = np.sqrt(frac * h * w / _polygon_area(unit))
    ext = poly.max(axis=0) - poly.min(axis=0)
    scale = min(scale, (w - 4) / ext[0], (h - 4) / ext[1])
    poly = poly * scale
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    cx = rng.uniform(1 - lo[0], w - 2 - hi[0])
    cy = rng.uniform(1 - lo[1], h - 2 - hi[1])
    return poly + np.array([cx, cy])


def _place_free(
    rng: np.random.Generator, unit: np.ndarray, frac: float, keep_out: np.ndarray
) -> np.ndarray | None:
    """A rotated copy of ``unit`` covering about ``frac`` of the image (less, by 5% steps, where that does
    not fit), centred at a random point where its circumscribed circle stays inside the image and off
    ``keep_out``; None where not even a tenth of ``frac`` fits."""
    h, w = keep_out.shape
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    poly = unit @ rot.T
    yy, xx = np.mgrid[0:h, 0:w]
    room = np.minimum.reduce([ndimage.distance_transform_edt(~keep_out), yy, xx, h - 1 - yy, w - 1 - xx])
    for step in range(45):  # 0.95 ** 45 ~ 0.1
        scaled = poly * np.sqrt(frac * 0.95**step * h * w / _polygon_area(unit))
        radius = float(np.linalg.norm(scaled, axis=1).max())
        spots = np.argwhere(room > radius + 1)
        if len(spots):
            cy, cx = spots[int(rng.integers(len(spots)))]
            return scaled + np.array([cx, cy], dtype=float)
    return None


def _rasterise(poly: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return polygon2mask(size, poly[:, ::-1])  # polygon2mask wants (row, col)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in 0..1) -> uint8 RGB triple."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.round(np.array(rgb) * 255).astype(np.uint8)


def _stripes(size: tuple[int, int], centre: np.ndarray, period: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]].astype(float)
    phase = ((xx - centre[0]) * np.cos(angle) + (yy - centre[1]) * np.sin(angle)) / period
    return np.floor(phase).astype(int) % 2 == 0


def _hue_far(rng: np.random.Generator, hue: float, min_dist: float) -> float:
    while True:
        cand = float(rng.uniform(0, 1))
        if min(abs(cand - hue), 1 - abs(cand - hue)) >= min_dist:
            return cand


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Low-saturation clutter: a tinted gradient, a few grey blobs and bars, Gaussian noise (float HxWx3)."""
    h, w = size
    base = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.15), rng.uniform(0.45, 0.7)).astype(float)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    g = rng.uniform(-40, 40, size=2)
    img = base + (g[0] * (xx / w - 0.5) + g[1] * (yy / h - 0.5))[..., None]
    for _ in range(int(rng.integers(4, 9))):
        unit = _unit_shape(str(rng.choice(["ellipse", "diamond"])), rng.uniform(0.2, 1.0))
        blob = _rasterise(_place(rng, unit, rng.uniform(0.01, 0.05), size), size)
        img[blob] = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.85))
    img += rng.normal(0, 8, size=img.shape)
    return img


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_size(size: object) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size must be (H, W), got {size!r}")
    return _check_int("size[0] (H)", size[0], 32), _check_int("size[1] (W)", size[1], 32)


def _check_indices(name: str, value: Iterable[int], n: int) -> frozenset[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a sequence of image indices, got {value!r}")
    out = set()
    for i in value:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise ValueError(f"{name}: {i!r} is not an image index of a group of {n}")
        out.add(int(i))
    return frozenset(out)


def synthetic_group(
    n_images: int,
    *,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    n_distractors: int = 2,
    absent: Iterable[int] = (),
    recurring: Iterable[int] = (),
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A group of ``n_images`` images sharing one common object, with its masks.

    The common object has the same shape kind (ellipse, star, cross, triangle or diamond) and the same
    two-colour stripe texture in a saturated hue in every image, at a random position, rotation and scale
    (about 15-30% of the image area; less where the shape would not fit). Each image also holds
    ``n_distractors`` objects of other shape kinds and other hues (solid or striped, 3-8% of the area),
    never touching the common object, on a noisy low-saturation cluttered background. The common object and
    the distractors are drawn without noise.

    ``absent``: indices of images drawn without the common object (their mask is all False).
    ``recurring``: indices of images that also hold one *recurring distractor*: the same shape kind (not the
    object's) with the same two-colour stripes in a saturated hue far from the object's, fully saturated,
    25-35% of the image area where that fits beside the object, else the largest size that does (in
    practice 4-20%), never touching it. Both are drawn from a random stream of
    their own, so the images of a seed are unchanged where neither applies.

    Returns ``(images, masks)``: lists of ``HxWx3 uint8`` RGB images and ``HxW bool`` masks marking exactly
    the common object's pixels. Deterministic for a ``seed`` (an int >= 0); different seeds give different
    common objects (seeds less than 5 apart always differ in shape kind).
    """
    n_images = _check_int("n_images", n_images, 1)
    n_distractors = _check_int("n_distractors", n_distractors, 0)
    h, w = _check_size(size)
    seed = _check_int("seed", seed, 0)
    absent_set = _check_indices("absent", absent, n_images)
    recurring_set = _check_indices("recurring", recurring, n_images)
    rng = np.random.default_rng(seed)
    rng_r = np.random.default_rng((seed, 1))  # the recurring distractor's own stream
    # kind and hue step through the seeds so that nearby seeds (as make_synthetic_dataset uses) never share
    # both: the kind cycles with period 5 and the hue moves by the golden ratio conjugate.
    kind = SHAPE_KINDS[seed % len(SHAPE_KINDS)]
    hue = float((seed * 0.6180339887 + rng.uniform(-0.02, 0.02)) % 1.0)
    aspect = float(rng.uniform(0.6, 0.85))
    colours = (_hsv(hue, 0.9, 0.95), _hsv(hue, 0.9, 0.45))
    period, stripe_angle = float(rng.uniform(3.0, 6.0)), float(rng.uniform(0, np.pi))
    other_kinds = [k for k in SHAPE_KINDS if k != kind]
    r_unit = _unit_shape(str(rng_r.choice(other_kinds)), float(rng_r.uniform(0.6, 0.9)))
    r_hue = _hue_far(rng_r, hue, 0.3)
    r_colours = (_hsv(r_hue, 1.0, 1.0), _hsv((r_hue + 0.5) % 1.0, 1.0, 0.9))
    r_period, r_angle = float(rng_r.uniform(3.0, 6.0)), float(rng_r.uniform(0, np.pi))
    images, masks = [], []
    for index in range(n_images):
        img = _background(rng, (h, w))
        poly = _place(rng, _unit_shape(kind, aspect), rng.uniform(0.15, 0.30), (h, w))
        mask = _rasterise(poly, (h, w))
        keep_out = ndimage.binary_dilation(mask, iterations=2)
        for _ in range(n_distractors):
            d_unit = _unit_shape(str(rng.choice(other_kinds)), rng.uniform(0.5, 1.0))
            d_hue = _hue_far(rng, hue, 0.2)
            d_col = _hsv(d_hue, rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.95))
            striped = rng.uniform() < 0.5
            d_col2 = _hsv(_hue_far(rng, hue, 0.2), rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.6))
            d_period, d_angle = rng.uniform(3.0, 6.0), rng.uniform(0, np.pi)
            frac = rng.uniform(0.03, 0.08)
            for _attempt in range(50):
                d_poly = _place(rng, d_unit, frac, (h, w))
                d_mask = _rasterise(d_poly, (h, w))
                if not (d_mask & keep_out).any():
                    break
            else:
                log.debug("no room for a distractor next to the common object; leaving it out")
                continue
            img[d_mask] = d_col
            if striped:
                img[d_mask & _stripes((h, w), d_poly.mean(axis=0), d_period, d_angle)] = d_col2
        if index in recurring_set:
            r_poly = _place_free(rng_r, r_unit, float(rng_r.uniform(0.25, 0.35)), keep_out)
            if r_poly is None:
                log.debug("no room for the recurring distractor next to the common object; leaving it out")
            else:
                r_mask = _rasterise(r_poly, (h, w)) & ~keep_out
                r_stripes = _stripes((h, w), r_poly.mean(axis=0), r_period, r_angle)
                img[r_mask & r_stripes] = r_colours[0]
                img[r_mask & ~r_stripes] = r_colours[1]
        if index in absent_set:
            mask = np.zeros((h, w), dtype=bool)
        stripes = _stripes((h, w), poly.mean(axis=0), period, stripe_angle)
        img[mask & stripes] = colours[0]
        img[mask & ~stripes] = colours[1]
        images.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
        masks.append(mask)
    return images, masks


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    *,
    n_groups: int = 2,
    n_images: int = 4,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
) -> list[Group]:
    """Write a synthetic CoSOD dataset under ``root`` and return :func:`load_groups` of it.

    Files: ``<root>/images/<group>/<group>_<k>.png`` (RGB) and ``<root>/gt/<group>/<group>_<k>.png`` (0/255),
    with groups named ``synth_00``, ``synth_01``, ... Group ``g`` is :func:`synthetic_group` with seed
    ``seed * 1000 + g``. Existing files with the same names are overwritten; other files are left alone.
    """
    n_groups = _check_int("n_groups", n_groups, 1)
    seed = _check_int("seed", seed, 0)
    root = Path(root)
    for g in range(n_groups):
        name = f"synth_{g:02d}"
        images, masks = synthetic_group(n_images, size=size, seed=int(seed) * 1000 + g)
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
            stem = f"{name}_{k}"
            Image.fromarray(image).save(root / "images" / name / f"{stem}.png")
            write_mask(root / "gt" / name / f"{stem}.png", mask)
    log.info("wrote %d synthetic groups of %d images to %s", n_groups, n_images, root)
    return load_groups(root)
