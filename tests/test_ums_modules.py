"""UMS-CoSOD network modules: known answers for MCA, rank amplification, CFMM key points and the loss;
shapes and a short training run for the whole network. CPU, tiny dims, fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cosod.ums import (
    AFMM,
    CFMM,
    FRAM,
    MCA,
    AmplifiedAttention,
    Decoder,
    MCAGate,
    UMSNet,
    amplification_ranks,
    amplification_weights,
    amplified_attention,
    bce_iou_loss,
    bce_iou_terms,
    group_max_affinity,
    mca_kernel_size,
)

# --- MCA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "kernel"), [(768, 5), (512, 5), (256, 5), (64, 3), (48, 3), (32, 3), (16, 1), (4, 1), (2, 1)]
)
def test_mca_kernel_rule(channels, kernel):
    assert mca_kernel_size(channels) == kernel


def test_mca_gate_known_answer_uses_unbiased_std():
    gate = MCAGate(3)
    with torch.no_grad():
        gate.conv.weight.copy_(torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 1, 3))  # identity 1-D conv
        gate.weight.zero_()  # sigmoid(0) = 1/2, so z = avg + std
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, 4.0]]]])  # (1, 2, 2, 2)
    # channel 0: mean 3, unbiased std sqrt(14/3); channel 1: mean 1, unbiased std 2
    expected = torch.sigmoid(torch.tensor([3.0 + math.sqrt(14.0 / 3.0), 1.0 + 2.0]))
    torch.testing.assert_close(gate.gate(x).flatten(), expected)
    torch.testing.assert_close(gate(x), x * expected.view(1, 2, 1, 1))


def test_mca_shapes_gates_and_zero_kernels():
    torch.manual_seed(0)
    mca = MCA(32)
    assert mca.c_hw.kernel_size == 3 and mca.h_cw.kernel_size == 3 and mca.w_hc.kernel_size == 3
    for g in (mca.h_cw, mca.w_hc, mca.c_hw):
        assert g.weight.shape == (2,) and bool(((g.weight >= 0) & (g.weight < 1)).all())  # torch.rand init
    x = torch.randn(2, 32, 8, 6)
    out = mca(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    g_c, g_h, g_w = mca.gates(x)
    assert g_c.shape == (2, 32) and g_h.shape == (2, 8) and g_w.shape == (2, 6)
    for g in (g_c, g_h, g_w):
        assert bool(((g > 0) & (g < 1)).all())
    with torch.no_grad():
        for g in (mca.h_cw, mca.w_hc, mca.c_hw):
            g.conv.weight.zero_()  # every gate is sigmoid(0) = 1/2
    torch.testing.assert_close(mca(x), 0.5 * x)


def test_mca_rejects_single_pixel_maps():
    with pytest.raises(ValueError, match="H \\* W >= 2"):
        MCA(8)(torch.randn(2, 8, 1, 1))
    with pytest.raises(ValueError, match="expects"):
        MCA(8)(torch.randn(2, 4, 3, 3))


# --- rank amplification ---------------------------------------------------------------------------------

A_RAW = torch.tensor(
    [
        [
            [0.5, -0.2, 0.1, 0.0],
            [-1.0, -0.5, 2.0, -3.0],
            [0.4, 0.1, 0.3, 0.2],
            [-0.1, -0.2, -0.3, -0.4],
        ]
    ]
)


def test_amplification_ranks_known():
    expected = torch.tensor([[[0, 3, 1, 2], [2, 1, 0, 3], [0, 3, 1, 2], [0, 1, 2, 3]]])
    assert torch.equal(amplification_ranks(A_RAW), expected)


def test_amplification_weights_known():
    # (rank + 1)^3 where A_raw >= 0 (0.0 counts as positive), else 1; weak positives get the large multipliers
    expected = torch.tensor(
        [[[1.0, 1.0, 8.0, 27.0], [1.0, 1.0, 1.0, 1.0], [1.0, 64.0, 8.0, 27.0], [1.0, 1.0, 1.0, 1.0]]]
    )
    torch.testing.assert_close(amplification_weights(A_RAW, 3.0), expected)
    torch.testing.assert_close(amplification_weights(A_RAW, 0.0), torch.ones_like(A_RAW))
    a_final = amplified_attention(A_RAW, 3.0)
    torch.testing.assert_close(a_final, torch.softmax(A_RAW, -1) * expected)
    renorm = amplified_attention(A_RAW, 3.0, row_renorm=True)
    torch.testing.assert_close(renorm.sum(-1), torch.ones(1, 4))


def test_amplified_attention_module_known_answer():
    att = AmplifiedAttention(2)
    with torch.no_grad():
        for block in (att.query, att.key, att.value):
            for conv in block:
                conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
                conv.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # one image, patches (1,0) and (0,1)
    # A_raw = I / sqrt(2); row 0 ranks [0, 1] -> weights [1, 8]; row 1 ranks [1, 0] -> [8, 1]
    s = 1.0 / (1.0 + math.exp(-1.0 / math.sqrt(2.0)))  # softmax of [1/sqrt2, 0]
    p0 = torch.tensor([s + 1.0, 8.0 * (1.0 - s)])  # A_final @ V + residual
    p1 = torch.tensor([8.0 * (1.0 - s), s + 1.0])
    out = att(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 0], p0)
    torch.testing.assert_close(out[0, :, 0, 1], p1)


def test_fram_runs_in_fp32():
    torch.manual_seed(0)
    fram = FRAM(32)
    x = torch.randn(2, 32, 4, 4)
    out = fram(x.bfloat16())
    assert out.shape == (2, 32, 4, 4) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, fram(x.bfloat16().float()), rtol=0, atol=0)
    f_act = fram.activate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fram.attention(f_act)
        assert fram(x).dtype == torch.float32
    torch.testing.assert_close(auto, fram.attention(f_act), rtol=0, atol=0)  # attention untouched by autocast


# --- CFMM -----------------------------------------------------------------------------------------------


def _planted_group(b=4, c=32, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, c, h, w, generator=g), dim=1)
    planted = F.normalize(torch.randn(c, generator=g), dim=0)
    spots = [(1, 2), (5, 6), (0, 7), (4, 3)][:b]
    for i, (r, col) in enumerate(spots):
        x[i, :, r, col] = planted
    return x, planted, spots


def test_cfmm_key_point_is_the_planted_common_feature():
    x, planted, spots = _planted_group()
    cfmm = CFMM.identity(32).eval()
    out = cfmm(x)
    for i, (r, col) in enumerate(spots):
        mask = torch.zeros(8, 8)
        mask[r, col] = 1.0
        assert torch.equal(out.key_mask[i, 0], mask)
        torch.testing.assert_close(out.key_points[i], planted)
        torch.testing.assert_close(out.response_maps[i, :, r, col], torch.ones(4))  # cos(planted, planted)
        assert out.response[i, 0, r, col].item() == pytest.approx(1.0)  # the peak after min-max
    assert out.merged.shape == (4, 32, 8, 8) and out.prototype.shape == (1, 32, 1, 1)
    torch.testing.assert_close(out.merged, out.residual * out.prototype + out.residual * out.response)
    torch.testing.assert_close(out.prototype, (x * out.response).mean(dim=(0, 2, 3), keepdim=True))


def test_cfmm_relu_only_in_eval():
    x, _, _ = _planted_group()
    cfmm = CFMM.identity(32)
    assert bool((cfmm.train()(x).response_maps < 0).any())
    assert bool((cfmm.eval()(x).response_maps >= 0).all())


def test_group_max_affinity_chunked_matches_full_matrix():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 10, 8, generator=g)
    k = torch.randn(3, 10, 8, generator=g)
    full = (q.reshape(30, 8) @ k.reshape(30, 8).t()) * 0.5  # (BN, BN), image-major columns
    expected = full.view(30, 3, 10).amax(dim=-1)
    for chunk in (1, 7, 30, 31, 1 << 20):
        torch.testing.assert_close(group_max_affinity(q, k, 0.5, chunk_elements=chunk), expected)
    small = CFMM(8, chunk_elements=5)
    big = CFMM(8)
    big.load_state_dict(small.state_dict())
    x = torch.randn(3, 8, 2, 5, generator=g)
    torch.testing.assert_close(small(x).merged, big(x).merged)


# --- AFMM, decoder, network -----------------------------------------------------------------------------


def test_afmm_shapes_weights_and_extremes():
    torch.manual_seed(0)
    afmm = AFMM(32, v2_dim=48)
    assert afmm.hidden == 8 and afmm.heads == 4
    dino = torch.randn(2, 8, 8, 32)
    v2 = torch.randn(2, 4, 4, 48)
    out = afmm(dino, v2)
    assert out.shape == (2, 32, 8, 8) and out.dtype == torch.float32
    w = afmm.last_weights
    assert w is not None and w.shape == (2, 8, 8) and bool(((w > 0) & (w < 1)).all())
    v2_up = F.interpolate(afmm.v2_proj(v2).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear").permute(
        0, 2, 3, 1
    )
    last = afmm.weight_net[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(50.0)  # w = 1: all DINO
        torch.testing.assert_close(afmm.mix(dino, v2)[0], dino)
        last.bias.fill_(-50.0)  # w = 0: all (projected, upsampled) DINOv2
        torch.testing.assert_close(afmm.mix(dino, v2)[0], v2_up)
    normed = out.permute(0, 2, 3, 1)  # LayerNorm output: zero mean, unit variance over C
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 8, 8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="v2_tokens"):
        afmm(dino, torch.randn(2, 4, 4, 32))
    with pytest.raises(ValueError, match="divisible"):
        AFMM(30, heads=4)


def test_decoder_shapes_and_scale_invariance():
    torch.manual_seed(0)
    dec = Decoder(48, width=16)
    assert dec.norm.num_groups == 24
    x = torch.randn(2, 48, 4, 4)
    logits, sides = dec(x)
    assert logits.shape == (2, 1, 32, 32) and len(sides) == 2
    assert all(s.shape == (2, 1, 32, 32) for s in sides)
    big, _ = dec(x * 1e6)  # FRAM's magnitudes: the input GroupNorm absorbs them
    torch.testing.assert_close(big, logits, atol=1e-4, rtol=1e-4)


def _tiny_net() -> UMSNet:
    return UMSNet.build(seed=7, dim=32, v2_dim=48, width=16)


def test_umsnet_build_is_deterministic_and_shapes():
    state = torch.random.get_rng_state()
    a, b = _tiny_net(), _tiny_net()
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    torch.manual_seed(0)
    dino, v2 = torch.randn(3, 4, 4, 32), torch.randn(3, 3, 3, 48)
    out = a(dino, v2)
    assert out.logits.shape == (3, 1, 32, 32) and out.logits.dtype == torch.float32
    assert len(out.side_logits) == 2 and all(s.shape == (3, 1, 32, 32) for s in out.side_logits)
    assert out.enriched.shape == (3, 32, 4, 4) and out.enriched.dtype == torch.float32
    assert out.mix_weights.shape == (3, 4, 4)
    assert out.cfmm.key_points.shape == (3, 32)
    assert a.config["v2_dim"] == 48


@pytest.fixture
def one_thread():
    """Tiny ops run far faster on one thread (and do not suffer from a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_umsnet_few_adam_steps_reduce_loss(one_thread):
    net = _tiny_net()
    g = torch.Generator().manual_seed(3)
    dino, v2 = torch.randn(2, 4, 4, 32, generator=g), torch.randn(2, 3, 3, 48, generator=g)
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:24, 10:26] = 1.0
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = net(dino, v2)
        loss = bce_iou_loss(out.logits, target, out.side_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.75 * losses[0]  # ~4.46 -> ~2.5 (noisy: the amplified attention is spiky)


# --- loss -----------------------------------------------------------------------------------------------


def test_loss_known_values():
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, 1:3, 1:3] = 1.0  # 4 of 16 pixels
    perfect = (target * 2 - 1) * 20.0
    assert float(bce_iou_loss(perfect, target)) < 1e-3
    assert float(bce_iou_loss(-perfect, target)) > 10.0
    # P = 1/2 everywhere: BCE = ln 2; IoU = 2 / (8 + 4 - 2) per image -> loss 0.8 (up to the 1e-5)
    terms = bce_iou_terms(torch.zeros(2, 1, 4, 4), target)
    assert float(terms.bce) == pytest.approx(math.log(2.0), abs=1e-6)
    assert float(terms.iou) == pytest.approx(0.8, abs=1e-5)
    # side outputs add the same loss again; a bool (B, H, W) target at twice the size is resized nearest
    big = target[:, 0].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).bool()
    torch.testing.assert_close(bce_iou_loss(perfect, big), bce_iou_loss(perfect, target))
    torch.testing.assert_close(bce_iou_loss(-perfect, target, [-perfect]), 2 * bce_iou_loss(-perfect, target))


def test_loss_validates_inputs():
    with pytest.raises(ValueError, match="0/255"):
        bce_iou_loss(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 255.0))
    with pytest.raises(ValueError, match="logits"):
        bce_iou_loss(torch.zeros(1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        bce_iou_loss(torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 4, 4))
