"""Backbones: the registry, the real weights-loading path, and the three outputs of one forward pass."""

import hashlib
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

from cosod import backbones, checksums
from cosod.backbones import (
    BACKBONES,
    build_backbone,
    expected_path,
    fetch_weights,
    get_spec,
)
from cosod.checksums import sidecar_path
from cosod.errors import UnknownBackboneError, WeightsChecksumError, WeightsInvalidError, WeightsMissingError
from cosod.pipeline import Pipeline, PipelineConfig


def images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8) for i in range(n)]


def write_random_weights(name, path, **create_kwargs):
    """A state dict with the backbone's real architecture (random values), as a user would drop in."""
    spec = get_spec(name)
    torch.manual_seed(7)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **create_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_spec_is_consistent(name):
    spec = BACKBONES[name]
    assert spec.embed_dim % spec.num_heads == 0
    assert spec.hub_id is None or spec.hub_id == f"timm/{spec.timm_name}"
    assert spec.random_init or spec.filename


def test_tiny_backbone_outputs_shapes_and_ranges():
    bb = build_backbone("tiny")
    feats = bb.encode(images(3), batch_size=2)
    assert feats.tokens.shape == (3, 28, 28, 48) and feats.keys.shape == (3, 28, 28, 48)
    assert feats.cls_attention.shape == (3, 28, 28)
    for a in feats.cls_attention:
        assert a.min().item() == 0.0 and a.max().item() == pytest.approx(1.0)
    # deterministic across builds (seeded init), independent of the batch size
    again = build_backbone("tiny").encode(images(3), batch_size=3)
    torch.testing.assert_close(feats.tokens, again.tokens, rtol=1e-5, atol=1e-5)


def test_tokens_keys_and_cls_attention_match_timm_internals():
    bb = build_backbone("tiny")
    x = bb.preprocess(images(2))
    feats = bb.forward(x)
    model = bb.model
    with torch.no_grad():
        seq = model.forward_features(x)
        torch.testing.assert_close(feats.tokens, seq[:, 1:].reshape(2, 28, 28, 48))
        # keys: recompute the last block's qkv from its input; attention: the unfused probabilities
        captured = {}
        attn = model.blocks[-1].attn
        attn.fused_attn = False
        h1 = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("p", o))
        h2 = model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("n", o))
        model.forward_features(x)
        h1.remove()
        h2.remove()
        attn.fused_attn = True
    probs = captured["p"][:, :, 0, 1:].mean(dim=1).reshape(2, 28, 28)
    lo = probs.amin(dim=(1, 2), keepdim=True)
    hi = probs.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(feats.cls_attention, (probs - lo) / (hi - lo), rtol=1e-4, atol=1e-5)
    qkv = attn.qkv(captured["n"])
    keys = qkv[..., 48:96][:, 1:].reshape(2, 28, 28, 48)
    torch.testing.assert_close(feats.keys, keys, rtol=1e-4, atol=1e-5)


def test_a_weights_file_written_here_loads_through_the_real_path(tmp_path):
    name = "vit_small_patch8_224.dino"
    model = write_random_weights(name, tmp_path / "vit_small_patch8_224.dino.pth")  # accepted, not pinned
    bb = build_backbone(name, weights_dir=tmp_path)
    assert bb.weights_file == str(tmp_path / "vit_small_patch8_224.dino.pth")
    x = bb.preprocess(images(1))
    with torch.no_grad():
        expected = model.eval().forward_features(x)[:, 1:].reshape(1, 28, 28, 384)
    torch.testing.assert_close(bb.forward(x).tokens, expected, rtol=1e-4, atol=1e-4)


def test_official_dino_file_name_is_accepted(tmp_path, monkeypatch):
    write_random_weights("vit_small_patch8_224.dino", tmp_path / "dino_deitsmall8_pretrain.pth")
    monkeypatch.setenv("COSOD_WEIGHTS_DIR", str(tmp_path))
    bb = build_backbone("dino_vits8")  # alias, weights dir from the environment
    assert bb.weights_file.endswith("dino_deitsmall8_pretrain.pth")
    assert bb.id.startswith("vit_small_patch8_224.dino@")


def test_dinov2_with_registers_resamples_to_224_and_drops_five_prefix_tokens(tmp_path):
    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    write_random_weights(name, tmp_path / f"{name}.pth")  # saved at timm's default 518 input
    bb = build_backbone(name, weights_dir=tmp_path, input_size=224)
    feats = bb.encode(images(1))
    assert bb.grid == (16, 16)
    assert feats.tokens.shape == (1, 16, 16, 384) and feats.cls_attention.shape == (1, 16, 16)


def test_missing_weights_name_the_file_and_the_command(tmp_path):
    with pytest.raises(WeightsMissingError) as err:
        build_backbone("vit_base_patch8_224.dino", weights_dir=tmp_path)
    msg = str(err.value)
    assert str(expected_path(get_spec("vit_base_patch8_224.dino"), tmp_path)) in msg
    assert "cosod weights fetch vit_base_patch8_224.dino" in msg


def test_wrong_or_corrupt_weights_are_refused(tmp_path):
    (tmp_path / "vit_small_patch8_224.dino.pth").write_bytes(b"\x00garbage")
    with pytest.raises(WeightsInvalidError, match="cannot read"):
        build_backbone("vit_small_patch8_224.dino", weights_dir=tmp_path)
    torch.save({"blocks.0.norm1.weight": torch.zeros(3)}, tmp_path / "vit_small_patch8_224.dino.pth")
    with pytest.raises(WeightsInvalidError, match="does not fit"):
        build_backbone("vit_small_patch8_224.dino", weights_dir=tmp_path)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(UnknownBackboneError, match="vit_small_patch8_224.dino"):
        get_spec("resnet50")


def test_bad_images_are_rejected_with_the_offending_shape():
    bb = build_backbone("tiny")
    with pytest.raises(ValueError, match=r"image 1: expected an HxWx3 uint8 RGB array, got float64 \(4, 4\)"):
        bb.preprocess([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        build_backbone("tiny", input_size=100)


def tiny_weights(path):
    """A ``tiny`` state dict (seed 7, not the seed-0 random init) saved at ``path``; returns the model."""
    return write_random_weights("tiny", path, **dict(get_spec("tiny").model_kwargs))


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hashed(monkeypatch):
    """Counts the files really hashed (not read from a sidecar)."""
    calls = []
    real = checksums.file_sha256

    def counting(path, chunk=checksums.CHUNK):
        calls.append(str(path))
        return real(path, chunk)

    monkeypatch.setattr(checksums, "file_sha256", counting)
    return calls


def test_the_backbone_id_names_the_weights_content_not_the_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    model = tiny_weights(a / "tiny.pth")
    pipe_a = Pipeline.build(PipelineConfig(backbone="tiny"), weights_dir=str(a))
    digest = sha256_of(a / "tiny.pth")
    assert pipe_a.backbone.weights_sha256 == digest and pipe_a.backbone.id == f"tiny@{digest[:12]}@224"

    b.mkdir()
    shutil.copyfile(a / "tiny.pth", b / "tiny.pth")  # a copy: new inode, and a new mtime
    st = (a / "tiny.pth").stat()
    os.utime(b / "tiny.pth", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert (b / "tiny.pth").stat().st_ino != st.st_ino
    pipe_b = Pipeline.build(PipelineConfig(backbone="tiny"), weights_dir=str(b))
    assert pipe_b.backbone.weights_file == str(b / "tiny.pth")
    assert pipe_b.backbone.id == pipe_a.backbone.id and pipe_b.version_id == pipe_a.version_id

    # one byte of one weight changed, in place (the file still loads): another id and another version
    data = bytearray((b / "tiny.pth").read_bytes())
    at = data.find(model.state_dict()["cls_token"].numpy().tobytes())
    assert at > 0
    data[at] ^= 0x01
    (b / "tiny.pth").write_bytes(bytes(data))
    pipe_c = Pipeline.build(PipelineConfig(backbone="tiny"), weights_dir=str(b))
    assert pipe_c.backbone.id != pipe_a.backbone.id and pipe_c.version_id != pipe_a.version_id
    assert pipe_c.backbone.weights_sha256 == sha256_of(b / "tiny.pth")


def test_a_pinned_file_with_other_content_is_refused_naming_both_hashes_and_the_fix(tmp_path):
    name = "vit_small_patch8_224.dino"
    spec = get_spec(name)
    path = tmp_path / spec.filename
    path.write_bytes(b"an interrupted download")
    for _ in range(2):  # again once a sidecar exists: refused on the content, whatever is cached
        with pytest.raises(WeightsChecksumError) as err:
            build_backbone(name, weights_dir=tmp_path)
        msg = str(err.value)
        assert str(path) in msg and sha256_of(path) in msg and spec.sha256 in msg
        assert "delete it and run `cosod weights fetch vit_small_patch8_224.dino` again" in msg
        assert isinstance(err.value, WeightsInvalidError)


def test_a_pinned_file_is_checked_from_its_sidecar_and_a_wrong_sidecar_is_not_believed(
    tmp_path, monkeypatch, hashed
):
    path = tmp_path / "tiny.pth"
    tiny_weights(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 100 * 10**9))  # not just written: sidecar trusted
    digest = sha256_of(path)
    monkeypatch.setitem(BACKBONES, "tiny", replace(BACKBONES["tiny"], sha256=digest))
    assert build_backbone("tiny", weights_dir=tmp_path).weights_sha256 == digest and len(hashed) == 1
    assert build_backbone("tiny", weights_dir=tmp_path).weights_sha256 == digest and len(hashed) == 1

    record = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert build_backbone("tiny", weights_dir=tmp_path).weights_sha256 == digest and len(hashed) == 2
    assert json.loads(sidecar_path(path).read_text())["sha256"] == digest  # repaired


def test_fetch_refuses_a_download_with_another_sha256_and_saves_nothing(tmp_path, monkeypatch):
    name = "vit_small_patch8_224.dino"
    spec = get_spec(name)
    hub = tmp_path / "hub" / "model.safetensors"
    hub.parent.mkdir()
    hub.write_bytes(b"not the published file")
    monkeypatch.setattr(backbones, "_download_hub_file", lambda s: hub)
    wdir = tmp_path / "w"
    with pytest.raises(WeightsChecksumError) as err:
        fetch_weights(name, wdir)
    msg = str(err.value)
    assert str(hub) in msg and sha256_of(hub) in msg and spec.sha256 in msg
    assert f"nothing was saved to {wdir / spec.filename}" in msg and f"cosod weights fetch {name}" in msg
    assert list(wdir.iterdir()) == []  # no file, no sidecar, no temp file


def test_fetch_copies_the_hub_file_byte_for_byte_with_its_sidecar(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    hub = tmp_path / "hub" / "model.safetensors"
    hub.parent.mkdir()
    save_file(tiny_weights(tmp_path / "unused.pth").state_dict(), str(hub))
    digest = sha256_of(hub)
    pinned = replace(BACKBONES["tiny"], hub_id="timm/tiny", filename="tiny.safetensors", sha256=digest)
    monkeypatch.setitem(BACKBONES, "tiny", pinned)
    monkeypatch.setattr(backbones, "_download_hub_file", lambda s: hub)
    dest = fetch_weights("tiny", tmp_path / "w")
    assert dest == tmp_path / "w" / "tiny.safetensors" and dest.read_bytes() == hub.read_bytes()
    assert json.loads(sidecar_path(dest).read_text())["sha256"] == digest
    bb = build_backbone("tiny", weights_dir=tmp_path / "w")
    assert bb.weights_file == str(dest) and bb.id == f"tiny@{digest[:12]}@224"
