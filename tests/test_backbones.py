"""Backbones: the registry, the real weights-loading path, and the three outputs of one forward pass."""

import numpy as np
import pytest
import timm
import torch

from cosod.backbones import (
    BACKBONES,
    build_backbone,
    expected_path,
    get_spec,
)
from cosod.errors import UnknownBackboneError, WeightsInvalidError, WeightsMissingError


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
    model = write_random_weights(name, tmp_path / "vit_small_patch8_224.dino.pth")
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
