"""Stage 1: the network, its losses and its checkpoint formats."""

import math

import pytest
import torch

from cosod.errors import CheckpointError
from cosod.refine import group_threshold, upsample
from cosod.scosparc import (
    OFFICIAL_KEY_MAP,
    Stage1Checkpoint,
    Stage1Net,
    cooccurrence_loss,
    load_stage1,
    region_embeddings,
    saliency_loss,
    save_stage1,
    stage1_loss,
)


def planted_tokens(b=4, grid=8, dim=48, n_common=6, seed=0):
    """Background tokens orthogonal to a common vector c, which is planted at n_common patches per image
    (at different places in every image). Returns tokens (B, g, g, C) and the planted mask (B, g, g)."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(b, grid * grid, dim, generator=g)
    bg[..., 0] = 0
    bg = bg / bg.norm(dim=-1, keepdim=True)
    c = torch.zeros(dim)
    c[0] = 3.0
    planted = torch.zeros(b, grid * grid, dtype=torch.bool)
    for i in range(b):
        idx = torch.randperm(grid * grid, generator=g)[:n_common]
        planted[i, idx] = True
    tokens = torch.where(planted[..., None], c.expand_as(bg), bg)
    return tokens.reshape(b, grid, grid, dim), planted.reshape(b, grid, grid)


def naive_scores(net, tokens, ref_mask=None):
    """The official computation: the full (B*N, B*N) matrix W, averaged over the other images' columns."""
    b, h, w, c = tokens.shape
    n = h * w
    q, k = net.project(tokens)
    W = q.reshape(b * n, c) @ k.reshape(b * n, c).T / math.sqrt(c)
    W = W.reshape(b, n, b, n)
    out = torch.zeros(b, n)
    for i in range(b):
        others = [j for j in range(b) if j != i and (ref_mask is None or ref_mask[i, j])]
        out[i] = W[i][:, others, :].mean(dim=(1, 2))
    return out


def test_planted_common_patches_are_recovered_exactly():
    tokens, planted = planted_tokens()
    net = Stage1Net.identity(tokens.shape[-1])
    with torch.no_grad():
        maps = net(tokens)
    th = group_threshold(upsample(maps, 64), (8, 8))
    assert torch.equal(maps >= th, planted)
    # the planted patches reach the top of the range, the rest the bottom
    assert maps[planted].min() == pytest.approx(torch.sigmoid(torch.tensor(0.35 / 0.15)).item(), abs=1e-4)
    assert maps[~planted].max() < 0.05


def test_linear_form_equals_the_full_cross_attention_matrix():
    torch.manual_seed(1)
    tokens = torch.randn(5, 4, 4, 16)
    net = Stage1Net.seeded(16)
    with torch.no_grad():
        torch.testing.assert_close(net.scores(tokens), naive_scores(net, tokens), rtol=1e-4, atol=1e-5)
        refs = torch.tensor(
            [[0, 1, 1, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]],
            dtype=torch.bool,
        )
        torch.testing.assert_close(
            net.scores(tokens, refs), naive_scores(net, tokens, refs), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(net.scores(tokens, chunk=2), net.scores(tokens), rtol=1e-5, atol=1e-6)


def test_map_range_and_group_of_one():
    tokens = torch.randn(3, 4, 4, 8)
    maps = Stage1Net.seeded(8)(tokens)
    for m in maps:  # per-image min-max, so every map reaches both ends
        assert m.max().item() == pytest.approx(0.91160, abs=1e-4)
        assert m.min().item() == pytest.approx(0.01295, abs=1e-4)
    with pytest.raises(ValueError, match="group of 1"):
        Stage1Net.seeded(8)(tokens[:1])


def test_official_init_is_seeded_and_has_the_official_size():
    a, b = Stage1Net.seeded(768), Stage1Net.seeded(768)
    assert sum(p.numel() for p in a.parameters()) == 1_771_776
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_cooccurrence_loss_matches_the_formula():
    fg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bg = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, -1.0]])
    cos = torch.nn.functional.cosine_similarity
    expected = []
    for i in range(3):
        for j in range(i + 1, 3):
            dp = math.exp(1 - cos(fg[i], fg[j], dim=0))
            dn = math.exp(1 - (cos(fg[i], bg[i], dim=0) + cos(fg[j], bg[j], dim=0)))
            expected.append(dp / (dp + dn))
    assert cooccurrence_loss(fg, bg).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert cooccurrence_loss(fg[:1], bg[:1]).item() == 0.0


def test_embeddings_divide_by_patch_count_and_saliency_loss():
    tokens = torch.ones(1, 2, 2, 3)
    maps = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    fg, bg = region_embeddings(tokens, maps)
    torch.testing.assert_close(fg, torch.full((1, 3), 0.5))
    torch.testing.assert_close(bg, torch.full((1, 3), 0.5))
    sa = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert saliency_loss(sa, maps).item() == pytest.approx(1 - (1.0 + 0.5) / 4)
    total = stage1_loss(tokens.expand(2, 2, 2, 3), sa.expand(2, 2, 2), maps.expand(2, 2, 2))
    assert total.total.item() == pytest.approx(total.cooccurrence.item() + 0.3 * total.saliency.item())


def test_training_signal_lowers_the_loss_on_planted_tokens():
    tokens, _ = planted_tokens(seed=3)
    sa = torch.rand(tokens.shape[:3], generator=torch.Generator().manual_seed(0))
    net = Stage1Net.seeded(tokens.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss = stage1_loss(tokens, sa, net(tokens)).total
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_official_checkpoint_format_loads(tmp_path):
    src = Stage1Net.seeded(32)
    inverse = {v: k for k, v in OFFICIAL_KEY_MAP.items()}
    official = {}
    for key, value in src.state_dict().items():
        prefix, rest = key.split(".", 1)
        official[inverse[prefix + "."] + rest] = value
    assert sorted(official) == sorted(
        f"encoder_attn.{m}.{p}"
        for m in ("conv", "query_transform", "key_transform")
        for p in ("weight", "bias")
    )
    path = tmp_path / "model_combined.pt"
    torch.save(official, path)
    ckpt = load_stage1(path)
    assert ckpt.source == "official" and ckpt.net.dim == 32
    tokens = torch.randn(3, 4, 4, 32)
    torch.testing.assert_close(ckpt.net(tokens), src(tokens))


def test_own_checkpoint_round_trip_keeps_its_record(tmp_path):
    net = Stage1Net.seeded(16)
    ckpt = Stage1Checkpoint(
        net=net,
        backbone="tiny",
        config={"epochs": 2},
        data_ids=["a", "b"],
        metrics={"last": {"loss": 0.5}},
        parent="scosparc-p1-v1",
    )
    path = save_stage1(ckpt, tmp_path / "sub" / "c.pt")
    back = load_stage1(path)
    assert (back.backbone, back.config, back.data_ids, back.parent) == (
        "tiny",
        {"epochs": 2},
        ["a", "b"],
        "scosparc-p1-v1",
    )
    assert back.metrics["last"]["loss"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temp file left behind
    for pa, pb in zip(net.parameters(), back.net.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_bad_checkpoints_are_refused_with_a_reason(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_stage1(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_stage1(tmp_path / "junk.pt")
    torch.save({"something.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a SCoSPARC stage-1 checkpoint"):
        load_stage1(tmp_path / "other.pt")
