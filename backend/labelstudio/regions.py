"""Masks to the region dicts Label Studio stores: BrushLabels RLE, and polygons for PolygonLabels.

The RLE is Label Studio's bit-packed format (see ``label_studio_sdk.converter.brush``): a header (32-bit
element count, 5-bit word size minus one, four 4-bit run-size classes 3/4/8/16), then one token per run
(flag bit, 2-bit class, length minus one in the class's bit width, 8-bit value), runs over 65536 split, and
zero padding to whole bytes (a full zero byte when the stream already ends on a byte boundary). The mask is
expanded to RGBA, every channel holding the mask value, so it encodes ``4*h*w`` elements.

:func:`mask_to_rle` builds the same bytes as ``label_studio_sdk.converter.brush.mask2rle`` with numpy instead
of Python strings; ``tests/test_backend_brush.py`` checks identity on many masks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

_CLASS_BITS = (3, 4, 8, 16)  # run-size classes of the header, in bits of (length - 1)
_HEADER_CLASSES = "".join(f"{b - 1:04b}" for b in _CLASS_BITS)
_MAX_CHUNK = 1 << 16


def _header_bits(count: int) -> np.ndarray:
    bits = f"{count:032b}" + f"{8 - 1:05b}" + _HEADER_CLASSES
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")


def encode_rle(flat: np.ndarray) -> list[int]:
    """Encode a 1-D array of values 0..255 in Label Studio's RLE; returns a list of ints 0..255."""
    arr = np.asarray(flat).ravel()
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"RLE values must lie in 0..255, got the range {arr.min()}..{arr.max()}")
    n = int(arr.size)
    if n >= 1 << 32:
        raise ValueError(f"RLE holds at most 2**32 - 1 elements, got {n}")
    if n == 0:
        stream = _header_bits(0)
    else:
        change = np.flatnonzero(arr[1:] != arr[:-1])
        ends = np.append(change, n - 1)
        lengths = np.diff(np.append(-1, ends)).astype(np.int64)
        values = arr[ends].astype(np.int64)
        # runs longer than 65536 become full 65536-chunks followed by the rest (1..65536), class 3
        full = np.where(lengths > 256, (lengths - 1) // _MAX_CHUNK, 0)
        reps = full + 1
        run_of_token = np.repeat(np.arange(lengths.size), reps)
        first_token = np.cumsum(reps) - reps
        pos = np.arange(run_of_token.size) - first_token[run_of_token]
        is_last = pos == full[run_of_token]
        tok_len = np.where(is_last, lengths[run_of_token] - full[run_of_token] * _MAX_CHUNK, _MAX_CHUNK)
        tok_val = values[run_of_token]
        long_run = lengths[run_of_token] > 256
        cls = np.select([long_run, tok_len > 16, tok_len > 8, tok_len > 1], [3, 2, 1, 0], default=0)
        nbits = np.asarray(_CLASS_BITS, dtype=np.int64)[cls]
        single = (tok_len == 1) & ~long_run
        flag = (~single).astype(np.int64)
        length_field = np.where(single, 0, tok_len - 1)
        code = (flag << (2 + nbits + 8)) | (cls << (nbits + 8)) | (length_field << 8) | tok_val
        width = 1 + 2 + nbits + 8
        # each token's bits, most significant first: left-align in 32 bits, unpack, keep the first `width`
        aligned = (code << (32 - width)).astype(">u4")
        bits = np.unpackbits(aligned.view(np.uint8)).reshape(-1, 32)
        valid = np.arange(32)[None, :] < width[:, None]
        stream = np.concatenate([_header_bits(n), bits[valid]])
    pad = 8 - stream.size % 8  # always 1..8 zero bits, as the reference encoder does
    stream = np.concatenate([stream, np.zeros(pad, dtype=np.uint8)])
    return np.packbits(stream).tolist()


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """HxW mask (bool, or uint8 0..255) -> Label Studio brush RLE; bool True becomes 255."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {m.shape}")
    if m.dtype == bool:
        m = m.astype(np.uint8) * 255
    return encode_rle(np.repeat(m.ravel(), 4))


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode with the SDK's reference decoder -> HxW uint8 (alpha channel of the RGBA layer)."""
    from label_studio_sdk.converter.brush import decode_rle

    return np.asarray(decode_rle(rle)).reshape(height, width, 4)[:, :, 3]


def region_id(*parts: Any) -> str:
    """A short deterministic id, so that re-encoding the same prediction gives the same JSON."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:10]


def brush_region(
    mask: np.ndarray, *, from_name: str, to_name: str, label: str, score: float, rid: str
) -> dict[str, Any]:
    """One BrushLabels region for a bool HxW mask at the image's original size."""
    value = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
    return mask_region(
        "brushlabels", mask.shape, value, from_name=from_name, to_name=to_name, score=score, rid=rid
    )


def mask_region(
    kind: str,
    shape: tuple[int, ...],
    value: dict[str, Any],
    *,
    from_name: str,
    to_name: str,
    score: float,
    rid: str,
) -> dict[str, Any]:
    """A region of control type ``kind`` holding a whole-image mask ``value`` of an HxW image ``shape``."""
    h, w = shape[:2]
    return {
        "id": rid,
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": value,
        "score": float(score),
        "readonly": False,
    }


def mask_to_polygons(
    mask: np.ndarray, *, max_polygons: int = 8, tolerance: float = 1.0, min_area: int = 16
) -> list[list[list[float]]]:
    """Outer contours of the mask's connected parts, largest first, as ``[[x%, y%], ...]`` lists.

    Coordinates are percentages of the image width and height (Label Studio's convention), with pixel
    edges at integer coordinates. Parts smaller than ``min_area`` pixels are dropped.
    """
    from skimage import measure

    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    labels = measure.label(m, connectivity=1)
    parts = sorted(measure.regionprops(labels), key=lambda r: -r.area)
    out: list[list[list[float]]] = []
    for part in parts[:max_polygons]:
        if part.area < min_area:
            break
        r0, c0, r1, c1 = part.bbox
        sub = np.pad(labels[r0:r1, c0:c1] == part.label, 1).astype(np.float32)
        contours = measure.find_contours(sub, 0.5)
        if not contours:
            continue
        contour = max(contours, key=len)
        contour = measure.approximate_polygon(contour, tolerance=tolerance)
        if len(contour) < 4:  # closed: first == last, so a triangle has 4 rows
            continue
        pts = []
        for r, c in contour[:-1]:
            x = min(max(c - 1 + c0 + 0.5, 0.0), w)
            y = min(max(r - 1 + r0 + 0.5, 0.0), h)
            pts.append([round(100.0 * x / w, 4), round(100.0 * y / h, 4)])
        out.append(pts)
    return out


def polygon_regions(
    mask: np.ndarray, *, from_name: str, to_name: str, label: str, score: float, rid: str
) -> list[dict[str, Any]]:
    """PolygonLabels regions, one per connected part of the mask."""
    h, w = mask.shape
    return [
        {
            "id": f"{rid}-{k}",
            "from_name": from_name,
            "to_name": to_name,
            "type": "polygonlabels",
            "original_width": int(w),
            "original_height": int(h),
            "image_rotation": 0,
            "value": {"points": pts, "closed": True, "polygonlabels": [label]},
            "score": float(score),
            "readonly": False,
        }
        for k, pts in enumerate(mask_to_polygons(mask))
    ]


RLE_HEADER_BYTES = 7  # the 53-bit header fits in the first 7 bytes


def rle_header(rle: Any) -> tuple[int, int]:
    """``(element count, word size in bits)`` from an RLE's 53-bit header, reading only its first
    :data:`RLE_HEADER_BYTES` items: what a stream claims before anything is decoded. A brush mask of HxW
    must claim ``4 * H * W`` elements of 8 bits. Raises ValueError when ``rle`` is not a list of ints in
    0..255 at least 7 long."""
    if not isinstance(rle, (list, tuple)):
        raise ValueError(f"an RLE must be a list of ints in 0..255, got {type(rle).__name__}")
    if len(rle) < RLE_HEADER_BYTES:
        raise ValueError(f"an RLE needs a 53-bit header, got {len(rle)} bytes")
    head = rle[:RLE_HEADER_BYTES]
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in head):
        raise ValueError(f"an RLE must be a list of ints in 0..255, got {str(head)[:80]!r}...")
    header = int.from_bytes(bytes(head) + bytes(1), "big")
    return header >> 32, ((header >> 27) & 31) + 1


def decode_rle(rle: Any) -> np.ndarray:
    """Decode Label Studio's brush RLE into a flat uint8 array; the same output as
    ``label_studio_sdk.converter.brush.decode_rle`` (a test compares them), several times faster.

    The stream is read token by token from 64-bit windows of the packed bytes (instead of a Python string of
    bits); repeat tokens are expanded with ``np.repeat`` and literal tokens are gathered from the unpacked
    bits at the end. Raises ValueError on a value outside 0..255, a word size over 8 bits or a truncated
    stream.
    """
    try:
        raw = bytes(rle)
    except (TypeError, ValueError):
        raise ValueError(f"an RLE must be a list of ints in 0..255, got {str(rle)[:80]!r}") from None
    nbits_total = len(raw) * 8
    if nbits_total < 53:
        raise ValueError(f"an RLE needs a 53-bit header, got {len(raw)} bytes")
    data = raw + bytes(8)
    header = int.from_bytes(data[:8], "big")
    num = header >> 32
    word = ((header >> 27) & 31) + 1
    if word > 8:
        raise ValueError(f"RLE word size {word} is not supported (uint8 masks use 8)")
    sizes = [((header >> (23 - 4 * k)) & 15) + 1 for k in range(4)]
    wmask = (1 << word) - 1
    full = (1 << 64) - 1
    run_len: list[int] = []
    run_val: list[int] = []  # -1 marks a literal token
    lit_bitpos: list[int] = []
    lit_count: list[int] = []
    lit_start: list[int] = []
    pos, i = 53, 0
    while i < num:
        if pos + 3 > nbits_total:
            raise ValueError(f"truncated RLE: {i} of {num} values decoded")
        window = (int.from_bytes(data[pos >> 3 : (pos >> 3) + 8], "big") << (pos & 7)) & full
        cls = (window >> 61) & 3
        nb = sizes[cls]
        length = ((window >> (61 - nb)) & ((1 << nb) - 1)) + 1
        pos += 3 + nb
        if window >> 63:
            run_val.append((window >> (61 - nb - word)) & wmask)
            pos += word
        else:
            run_val.append(-1)
            lit_bitpos.append(pos)
            lit_count.append(length)
            lit_start.append(i)
            pos += word * length
        run_len.append(length)
        i += length
    if pos > nbits_total:
        raise ValueError(f"truncated RLE: the stream ends inside its last token ({pos} > {nbits_total} bits)")
    values = np.asarray(run_val, dtype=np.int64)
    out = np.repeat(np.maximum(values, 0).astype(np.uint8), np.asarray(run_len, dtype=np.int64))[:num]
    if lit_count:
        counts = np.asarray(lit_count, dtype=np.int64)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        k = np.arange(int(counts.sum()), dtype=np.int64) - first
        starts = np.repeat(np.asarray(lit_bitpos, dtype=np.int64), counts) + k * word
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)).astype(np.int64)
        vals = np.zeros(starts.size, dtype=np.int64)
        for b in range(word):
            vals = (vals << 1) | bits[starts + b]
        idx = np.repeat(np.asarray(lit_start, dtype=np.int64), counts) + k
        keep = idx < num
        out[idx[keep]] = vals[keep].astype(np.uint8)
    return out.astype(np.uint8, copy=False)


def rle_to_mask_fast(rle: Any, height: int, width: int) -> np.ndarray:
    """:func:`decode_rle` -> HxW uint8 (alpha channel of the RGBA layer); ValueError when the element count
    is not ``4 * height * width``."""
    flat = decode_rle(rle)
    if flat.size != 4 * height * width:
        raise ValueError(
            f"RLE holds {flat.size} values, expected 4*{height}*{width} = {4 * height * width} "
            "(original_height/original_width do not match the mask)"
        )
    return flat.reshape(height, width, 4)[:, :, 3]
