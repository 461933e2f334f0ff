"""Content sha256 of files: streamed in bounded chunks, cached in a sidecar trusted only while fresh."""

import errno
import hashlib
import json
import logging
import os
import shutil

import pytest

from cosod import checksums
from cosod.checksums import CHUNK, cached_sha256, copy_with_sha256, file_sha256, read_sidecar, sidecar_path


@pytest.fixture
def hashed(monkeypatch):
    """Counts the files really hashed (as opposed to read from a sidecar)."""
    calls = []
    real = checksums.file_sha256

    def counting(path, chunk=CHUNK):
        calls.append(str(path))
        return real(path, chunk)

    monkeypatch.setattr(checksums, "file_sha256", counting)
    return calls


def aged_file(path, data, age_s=100):
    """Write ``data`` and date the file ``age_s`` seconds back, as a file that was not just written."""
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - age_s * 10**9))
    return path


def test_a_file_larger_than_the_chunk_is_hashed_in_bounded_reads(tmp_path, monkeypatch):
    data = os.urandom(3 * CHUNK + 12345)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    sizes = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            sizes.append(n)
            return self.f.read(n)

    monkeypatch.setattr(checksums, "open", lambda p, mode="r": Spy(real_open(p, mode)), raising=False)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert sizes and all(0 < n <= CHUNK for n in sizes)  # never read(-1): the file is not loaded whole
    assert len(sizes) == 5  # 3 full chunks, the rest, and the empty read at the end


def test_the_sidecar_is_used_when_fresh_and_ignored_when_stale(tmp_path, hashed):
    path = aged_file(tmp_path / "w.pth", b"weights v1")
    digest = hashlib.sha256(b"weights v1").hexdigest()
    assert cached_sha256(path) == digest and len(hashed) == 1
    record = json.loads(sidecar_path(path).read_text())
    st = path.stat()
    assert record == {
        "sha256": digest,
        "name": "w.pth",
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
    }
    assert cached_sha256(path) == digest and len(hashed) == 1  # from the sidecar: not hashed again

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: the sidecar is stale
    assert cached_sha256(path) == digest and len(hashed) == 2

    aged_file(path, b"weights v2")  # same size, rewritten: the content decides
    assert cached_sha256(path) == hashlib.sha256(b"weights v2").hexdigest() and len(hashed) == 3

    sidecar_path(path).write_text("{not json")
    assert cached_sha256(path) == hashlib.sha256(b"weights v2").hexdigest() and len(hashed) == 4


def test_a_sidecar_no_newer_than_its_file_is_not_trusted(tmp_path):
    # A file rewritten in the same clock tick as its sidecar keeps size and mtime: such a sidecar is racy.
    path = aged_file(tmp_path / "w.pth", b"abc")
    cached_sha256(path)
    assert read_sidecar(path) is not None
    mtime = path.stat().st_mtime_ns
    os.utime(sidecar_path(path), ns=(mtime, mtime))
    assert read_sidecar(path) is None


def test_a_copied_file_is_rehashed_to_the_same_digest(tmp_path, hashed):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = aged_file(tmp_path / "a" / "w.pth", b"same bytes")
    digest = cached_sha256(src)
    dst = tmp_path / "b" / "w.pth"
    shutil.copy2(src, dst)  # same mtime, new inode
    shutil.copy2(sidecar_path(src), sidecar_path(dst))  # even with the sidecar copied along
    assert dst.stat().st_ino != src.stat().st_ino
    assert cached_sha256(dst) == digest and len(hashed) == 2


def test_an_unwritable_folder_hashes_every_time_and_logs_once(tmp_path, monkeypatch, caplog, hashed):
    def read_only(dest, write):
        raise OSError(errno.EROFS, "Read-only file system", str(dest))

    monkeypatch.setattr(checksums, "atomic_write", read_only)
    monkeypatch.setattr(checksums, "_unwritable_logged", set())
    path = aged_file(tmp_path / "w.pth", b"abc")
    with caplog.at_level(logging.DEBUG, logger="cosod.checksums"):
        assert cached_sha256(path) == cached_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    assert len(hashed) == 2 and not sidecar_path(path).exists()
    logged = [r for r in caplog.records if "cannot write sha256 sidecars" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.DEBUG


def test_copy_with_sha256_hashes_while_copying_and_checks_before_replacing(tmp_path, hashed):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * (CHUNK + 7))
    dest = tmp_path / "out" / "dest.bin"
    digest = copy_with_sha256(src, dest)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest() and dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o644 and sidecar_path(dest).stat().st_mode & 0o777 == 0o644
    assert not hashed  # hashed during the copy, not read again

    def refuse(d):
        raise ValueError(f"refused {d}")

    src.write_bytes(b"other")
    with pytest.raises(ValueError, match="refused"):
        copy_with_sha256(src, dest, refuse)
    assert dest.read_bytes() == b"x" * (CHUNK + 7)  # untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest.bin", "dest.bin.sha256"]  # no temp file
