"""One SCoSPARC stage-1 training step (method_spec A.2-A.4) on a hand-built group of two images of three
patches with 2-dim tokens, checked against the formulas written out here in plain float64 Python: the loss
values, the gradient of every parameter (central differences of that hand computation) and the Adam update."""

from __future__ import annotations

import math

import pytest
import torch

from cosod.backbones import BackboneFeatures
from cosod.scosparc import SALIENCY_WEIGHT, TEMPERATURE, THRESH, Stage1Net, stage1_loss
from cosod.train import TrainConfig, train_stage1_on_features

# image i, patch p -> token (C = 2); the grid is 1 x 3
TOKENS = [
    [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
    [[1.0, 0.2], [0.3, 1.0], [-0.4, 0.6]],
]
CLS = [[1.0, 0.0, 0.5], [0.2, 1.0, 0.0]]  # the saliency SA, as the loss reads it


def _vec(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _cos(a: list[float], b: list[float]) -> float:
    return _vec(a, b) / (math.sqrt(_vec(a, a)) * math.sqrt(_vec(b, b)))


def _conv(w: list[list[float]], bias: list[float], x: list[float]) -> list[float]:
    return [_vec(row, x) + b for row, b in zip(w, bias, strict=True)]


def hand_maps(params: dict[str, list]) -> list[list[float]]:
    """A.2: F_res = conv_a(F) + F; Q, K = conv_q, conv_k of F_res; r_i(p) = Q_i(p) . mean of the other image's
    K over its patches / sqrt(C); per-image min-max; sigmoid((r - 0.65) / 0.15)."""
    c = len(TOKENS[0][0])
    q, k = [], []
    for img in TOKENS:
        res = [[a + x for a, x in zip(_conv(params["rw"], params["rb"], t), t, strict=True)] for t in img]
        q.append([_conv(params["qw"], params["qb"], f) for f in res])
        k.append([_conv(params["kw"], params["kb"], f) for f in res])
    maps = []
    for i in range(2):
        other = k[1 - i]
        kmean = [sum(col) / len(other) for col in zip(*other, strict=True)]
        r = [_vec(qp, kmean) / math.sqrt(c) for qp in q[i]]
        lo, hi = min(r), max(r)
        maps.append([1 / (1 + math.exp(-((v - lo) / (hi - lo) - THRESH) / TEMPERATURE)) for v in r])
    return maps


def hand_loss(maps: list[list[float]]) -> tuple[float, float, float]:
    """A.3: f_i = sum_p w x / N, b_i = sum_p (1 - w) x / N; L_cooc = d_p / (d_p + d_n) over the one pair;
    L_sal = 1 - mean(SA * M); L = L_cooc + 0.3 L_sal."""
    n = len(TOKENS[0])
    fg = [
        [sum(w * t[d] for w, t in zip(maps[i], TOKENS[i], strict=True)) / n for d in range(2)]
        for i in range(2)
    ]
    bg = [
        [sum((1 - w) * t[d] for w, t in zip(maps[i], TOKENS[i], strict=True)) / n for d in range(2)]
        for i in range(2)
    ]
    d_p = math.exp(1 - _cos(fg[0], fg[1]))
    d_n = math.exp(1 - (_cos(fg[0], bg[0]) + _cos(fg[1], bg[1])))
    cooc = d_p / (d_p + d_n)
    sal = (
        1
        - sum(s * m for srow, mrow in zip(CLS, maps, strict=True) for s, m in zip(srow, mrow, strict=True))
        / 6
    )
    return cooc + SALIENCY_WEIGHT * sal, cooc, sal


def _params(net: Stage1Net) -> dict[str, list]:
    def w(conv: torch.nn.Conv2d) -> list[list[float]]:
        return conv.weight.detach().double()[:, :, 0, 0].tolist()

    def b(conv: torch.nn.Conv2d) -> list[float]:
        assert conv.bias is not None
        return conv.bias.detach().double().tolist()

    return {
        "rw": w(net.residual),
        "rb": b(net.residual),
        "qw": w(net.query),
        "qb": b(net.query),
        "kw": w(net.key),
        "kb": b(net.key),
    }


def _numeric_grads(params: dict[str, list], h: float = 1e-6) -> dict[str, list]:
    """Central differences of the hand-computed loss, parameter by parameter."""
    out: dict[str, list] = {}
    for name, value in params.items():
        shape2d = isinstance(value[0], list)
        flat = [x for row in value for x in row] if shape2d else list(value)
        grads = []
        for j in range(len(flat)):
            moved = []
            for step in (h, -h):
                f = list(flat)
                f[j] += step
                p = dict(params)
                p[name] = [f[r * 2 : r * 2 + 2] for r in range(2)] if shape2d else f
                moved.append(hand_loss(hand_maps(p))[0])
            grads.append((moved[0] - moved[1]) / (2 * h))
        out[name] = [grads[r * 2 : r * 2 + 2] for r in range(2)] if shape2d else grads
    return out


def _feats() -> BackboneFeatures:
    tokens = torch.tensor(TOKENS).reshape(2, 1, 3, 2)
    return BackboneFeatures(tokens, tokens.clone(), torch.tensor(CLS).reshape(2, 1, 3))


def test_loss_values_match_the_hand_computation() -> None:
    net = Stage1Net.seeded(2)
    feats = _feats()
    with torch.no_grad():
        maps = net(feats.tokens)
        got = stage1_loss(feats.tokens, feats.cls_attention, maps)
    hand = hand_maps(_params(net))
    torch.testing.assert_close(
        maps[:, 0].double(), torch.tensor(hand, dtype=torch.float64), rtol=0, atol=1e-6
    )
    total, cooc, sal = hand_loss(hand)
    assert got.cooccurrence.item() == pytest.approx(cooc, abs=1e-6)
    assert got.saliency.item() == pytest.approx(sal, abs=1e-6)
    assert got.total.item() == pytest.approx(total, abs=1e-6)
    # the saliency term by hand for maps fixed at 0.5 everywhere: 1 - mean(SA) / 2
    half = [[0.5] * 3, [0.5] * 3]
    assert hand_loss(half)[2] == pytest.approx(1 - (1.5 + 1.2) / 6 * 0.5)


def test_one_training_step_has_the_hand_computed_gradients_and_adam_update() -> None:
    net = Stage1Net.seeded(2)
    before = _params(net)
    config = TrainConfig(backbone="tiny", epochs=1, max_steps=1)  # lr 1e-4, weight decay 1e-4, betas 0.9/0.99
    metrics = train_stage1_on_features(net, [_feats()], 1, config)
    assert metrics["steps"] == 1
    total, _, _ = hand_loss(hand_maps(before))
    assert metrics["last"]["loss"] == pytest.approx(total, abs=1e-6)

    expected = _numeric_grads(before)
    convs = {"r": net.residual, "q": net.query, "k": net.key}
    lr, wd, eps = config.lr, config.weight_decay, 1e-8
    assert wd is not None
    for key, conv in convs.items():
        assert conv.weight.grad is not None and conv.bias is not None and conv.bias.grad is not None
        grad_w = conv.weight.grad[:, :, 0, 0].double()
        grad_b = conv.bias.grad.double()
        torch.testing.assert_close(
            grad_w, torch.tensor(expected[key + "w"], dtype=torch.float64), atol=2e-5, rtol=1e-3
        )
        torch.testing.assert_close(
            grad_b, torch.tensor(expected[key + "b"], dtype=torch.float64), atol=2e-5, rtol=1e-3
        )
        # Adam's first step with L2 weight decay: p -= lr * g' / (|g'| + eps), g' = g + wd * p
        for got, old, g in (
            (conv.weight.detach()[:, :, 0, 0].double(), torch.tensor(before[key + "w"]), grad_w),
            (conv.bias.detach().double(), torch.tensor(before[key + "b"]), grad_b),
        ):
            g2 = g + wd * old
            torch.testing.assert_close(got, old - lr * g2 / (g2.abs() + eps), atol=1e-7, rtol=0)
    assert any(abs(g) > 1e-3 for row in expected["qw"] for g in row)  # the step really moves the net
