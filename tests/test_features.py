"""The on-disk feature cache."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

from cosod.backbones import BackboneFeatures, build_backbone
from cosod.features import FeatureCache, encode_images, image_hash


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny")


def imgs(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n)]


class CountingBackbone:
    """Wraps a backbone and counts how many images reach it."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0
        self.id = inner.id

    def encode(self, images, batch_size=8):
        self.seen += len(images)
        return self.inner.encode(images, batch_size=batch_size)


def test_image_hash_depends_on_pixels_and_shape_only():
    a = np.zeros((4, 6, 3), np.uint8)
    assert image_hash(a) == image_hash(a.copy())
    assert image_hash(a) != image_hash(np.zeros((6, 4, 3), np.uint8))
    b = a.copy()
    b[0, 0, 0] = 1
    assert image_hash(a) != image_hash(b)


def test_a_hit_skips_the_backbone_and_equals_the_miss(tmp_path, backbone):
    cache = FeatureCache(tmp_path)
    counting = CountingBackbone(backbone)
    first = encode_images(counting, imgs(3), cache=cache)
    assert counting.seen == 3 and cache.stats.misses == 3
    second = encode_images(counting, imgs(3), cache=cache)
    assert counting.seen == 3 and cache.stats.hits == 3  # no image went through the backbone again
    for a, b in [
        (first.tokens, second.tokens),
        (first.keys, second.keys),
        (first.cls_attention, second.cls_attention),
    ]:
        assert torch.equal(a, b)
    # without any cache the same (float32) values come out
    assert torch.equal(encode_images(backbone, imgs(3)).tokens, first.tokens)
    # a partially cached group only encodes the new image
    encode_images(counting, imgs(3) + imgs(1, seed=9), cache=cache)
    assert counting.seen == 4


def test_keys_separate_backbones_and_images(tmp_path, backbone):
    cache = FeatureCache(tmp_path)
    f = encode_images(backbone, imgs(1), cache=cache)
    h = image_hash(imgs(1)[0])
    assert cache.get(h, backbone.id) is not None
    assert cache.get(h, "other@x@224") is None
    assert cache.get("0" * 64, backbone.id) is None
    assert f.tokens.dtype == torch.float32


def test_features_are_float32_by_default_and_float16_is_an_option(tmp_path, backbone):
    raw = backbone.encode(imgs(2))
    exact = encode_images(backbone, imgs(2))
    assert torch.equal(exact.tokens, raw.tokens) and torch.equal(exact.keys, raw.keys)
    half = encode_images(backbone, imgs(2), precision="float16")
    assert torch.equal(half.tokens, raw.tokens.half().float())
    assert not torch.equal(half.tokens, raw.tokens)  # the rounding is real on these features
    cache = FeatureCache(tmp_path)
    assert torch.equal(encode_images(backbone, imgs(2), cache=cache, precision="float16").tokens, half.tokens)
    (entry, _) = sorted(tmp_path.rglob("*.npz"))
    with np.load(entry) as data:
        assert data["tokens"].dtype == np.float16  # half the disk
    # a float16 entry cannot serve a float32 request: recomputed and replaced by a float32 one
    counting = CountingBackbone(backbone)
    assert torch.equal(encode_images(counting, imgs(2), cache=cache).tokens, exact.tokens)
    assert counting.seen == 2
    with np.load(entry) as data:
        assert data["tokens"].dtype == np.float32
    # a float32 entry serves a float16 request, rounded: what a miss would give
    assert torch.equal(encode_images(counting, imgs(2), cache=cache, precision="float16").tokens, half.tokens)
    assert counting.seen == 2
    with pytest.raises(ValueError, match="'float32' or 'float16'"):
        encode_images(backbone, imgs(1), precision="bfloat16")


def test_an_unreadable_entry_is_recomputed(tmp_path, backbone):
    cache = FeatureCache(tmp_path)
    encode_images(backbone, imgs(1), cache=cache)
    (entry,) = list(tmp_path.rglob("*.npz"))
    entry.write_bytes(b"truncated")
    assert cache.get(image_hash(imgs(1)[0]), backbone.id) is None
    assert not entry.exists()
    encode_images(backbone, imgs(1), cache=cache)
    assert cache.get(image_hash(imgs(1)[0]), backbone.id) is not None


def _writer(root, seed, rounds, queue):
    cache = FeatureCache(root)
    rng = np.random.default_rng(seed)
    bad = 0
    for _ in range(rounds):
        key = f"{int(rng.integers(0, 4)):064d}"
        value = float(key[-1])
        cache.put(
            key,
            "bb@1@224",
            BackboneFeatures(
                torch.full((1, 2, 2, 3), value), torch.full((1, 2, 2, 3), value), torch.zeros(1, 2, 2)
            ),
        )
        got = cache.get(key, "bb@1@224")
        if got is None or not torch.equal(got.tokens, torch.full((1, 2, 2, 3), value)):
            bad += 1
    queue.put(bad)


def test_several_processes_share_the_cache_safely(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(tmp_path, s, 60, queue)) for s in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert [queue.get(timeout=5) for _ in procs] == [0, 0, 0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no temp file left
