"""backend.labelstudio.readahead: the store of images read ahead (used once, bounded in bytes and age), and
its filling."""

from __future__ import annotations

import threading
import time

import pytest

from backend.labelstudio.readahead import ImagesAhead


def test_an_image_is_taken_once_then_read_again() -> None:
    store = ImagesAhead()
    store.put("/data/upload/1/a.png", b"abc")
    assert store.holds("/data/upload/1/a.png") and len(store) == 1
    assert store.take("/data/upload/1/a.png") == b"abc"
    assert store.take("/data/upload/1/a.png") is None
    assert (store.hits, store.misses) == (1, 1) and len(store) == 0


def test_the_oldest_go_first_beyond_the_byte_limit() -> None:
    store = ImagesAhead(max_bytes=10)
    store.put("a", b"12345")
    store.put("b", b"12345")
    store.put("c", b"123")  # 13 bytes: a goes
    assert not store.holds("a") and store.holds("b") and store.holds("c")
    store.put("huge", b"x" * 11)  # larger than the whole store: not kept, nothing dropped for it
    assert not store.holds("huge") and store.holds("b")
    store.put("b", b"1")  # replacing an entry counts its new size only
    assert store.take("b") == b"1" and store.take("c") == b"123"


def test_entries_expire() -> None:
    store = ImagesAhead(ttl=0.05)
    store.put("a", b"1")
    time.sleep(0.1)
    assert store.take("a") is None


def test_fill_reads_each_reference_once_and_leaves_failures_to_the_real_read() -> None:
    store = ImagesAhead()
    store.put("held", b"old")
    calls: list[tuple[str, int | None]] = []
    lock = threading.Lock()

    def read(ref: str, task_id: int | None) -> bytes:
        with lock:
            calls.append((ref, task_id))
        if ref == "broken":
            raise OSError("Label Studio answered HTTP 500")
        return ref.encode()

    refs = [("a", 1), ("b", 2), ("a", 1), ("held", 3), ("broken", 4), (None, 5)]
    assert store.fill(refs, read) == 2  # type: ignore[arg-type]
    assert sorted(calls) == [("a", 1), ("b", 2), ("broken", 4)]
    assert store.take("a") == b"a" and store.take("b") == b"b" and store.take("held") == b"old"
    assert not store.holds("broken")
    assert store.fill([], read) == 0


@pytest.mark.parametrize("size", [1, 7])
def test_concurrent_puts_and_takes_keep_the_byte_count(size: int) -> None:
    store = ImagesAhead(max_bytes=1000)

    def churn(k: int) -> None:
        for i in range(200):
            store.put(f"{k}-{i % 5}", b"x" * size)
            store.take(f"{k}-{(i + 2) % 5}")

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = sum(len(store.take(f"{k}-{i}") or b"") for k in range(4) for i in range(5))
    assert store._size == 0 and held <= 1000


def test_bytes_are_kept_per_project() -> None:
    store = ImagesAhead()
    store.put("s3://b/a.png", b"p3", 3)
    assert not store.holds("s3://b/a.png") and not store.holds("s3://b/a.png", 4)
    assert store.take("s3://b/a.png", 4) is None and store.take("s3://b/a.png") is None
    assert store.take("s3://b/a.png", 3) == b"p3"
    seen: list[tuple[str, int | None]] = []
    assert store.fill([("x", 1)], lambda r, t: seen.append((r, t)) or b"x", 5) == 1
    assert store.holds("x", 5) and not store.holds("x")
