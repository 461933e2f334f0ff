"""Hostile inputs built cheaply, for the tests of issue 13: what a client can send (or an older backend left
stored) in a few kilobytes that would cost gigabytes to decode."""

from __future__ import annotations

import struct
import zlib


def zero_rle(n: int) -> list[int]:
    """A valid brush RLE of ``n`` zero values, built token by token (runs of 65536, class 3) without
    materialising the ``n`` values: what a client can send for a huge region in a few kilobytes."""
    bits = [f"{n:032b}", f"{7:05b}", "".join(f"{b - 1:04b}" for b in (3, 4, 8, 16))]
    left = n
    while left:
        run = min(left, 1 << 16)
        bits.append("1" + "11" + f"{run - 1:016b}" + "00000000")
        left -= run
    stream = "".join(bits)
    stream += "0" * (8 - len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big"))


def big_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width x height``, written chunk by chunk (no image in memory): what
    the old webhook stored for a 16384x16384 brush region, a few tens of kilobytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    parts = [z.compress(row * 1024) for _ in range(height // 1024)]
    parts += [z.compress(row * (height % 1024)), z.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
