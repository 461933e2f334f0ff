"""UMS-CoSOD FRAM: MCA, then a 1x1 conv + ReLU, then rank-amplified self-attention (method_spec B.5).

    F_act    = ReLU(Conv1x1(MCA(F_merged)))
    A_raw    = Q K^T / sqrt(C)                          (B, HW, HW), per image
    A_final  = softmax(A_raw) * A_amp,   A_amp = (rank + 1)^alpha where A_raw >= 0, else 1
    F_enrich = A_final V + F_act

``rank`` is the *descending* rank of an entry within its row (0 = largest), so weaker positive correlations
get larger multipliers (DCFM's ``AugAttentionModule``, alpha = 3). Nothing renormalises the rows, so their
sums reach ~1e6-1e7 at 28x28; the attention therefore always runs in fp32 with autocast disabled, and the
decoder normalises its input. ``row_renorm=True`` divides each row of A_final by its sum: a flagged deviation
from the paper, off by default.

MCA (Yu et al. 2023) averages three gated copies of its input; each gate pools over two axes (mean and
unbiased std), fuses them with learnable weights ``sigmoid(omega)`` (omega initialised with ``torch.rand(2)``,
so seed before construction), runs a 1-D conv of size k along the remaining axis and applies a sigmoid. The
parameter names (``h_cw``, ``w_hc``, ``c_hw``, ``weight``, ``conv``) follow the MCANet release so its state
dicts map 1:1.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ALPHA = 3.0


def mca_kernel_size(channels: int, gamma: float = 1.0, lambd: float = 1.5) -> int:
    """Kernel of MCA's channel gate: ``t = round(|(log2 C - gamma) / lambd|)``; k = t if t is odd, else t - 1.

    C = 768, 512, 256 -> 5; C = 64, 48, 32 -> 3. Values below 1 (C < 4) are raised to 1.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    t = round(abs((math.log2(channels) - gamma) / lambd))
    k = t if t % 2 else t - 1
    return max(k, 1)


class MCAGate(nn.Module):
    """One MCA gate on a (b, n, p, q) tensor: a sigmoid weight per index of axis 1, from pooling over p and q.

    The pooled descriptor is ``z = (avg + std)/2 + sigmoid(w0) avg + sigmoid(w1) std`` (std unbiased), and the
    gate is ``sigmoid(conv1d_k(z))`` along n (zero padding, no bias). Output = input * gate, same shape and
    dtype.
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(
            1, 1, kernel_size=(1, kernel_size), padding=(0, (kernel_size - 1) // 2), bias=False
        )
        self.weight = nn.Parameter(torch.rand(2))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, p, q) -> gate values (b, n, 1, 1) in (0, 1). Needs p * q >= 2 (the std is unbiased)."""
        if x.dim() != 4:
            raise ValueError(f"MCAGate expects a 4-D tensor, got shape {tuple(x.shape)}")
        b, n = x.shape[:2]
        if x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                f"MCAGate pools over axes 2-3 and needs at least 2 elements there, got {tuple(x.shape)}"
            )
        flat = x.flatten(2)
        avg = flat.mean(dim=2)
        std = flat.std(dim=2)  # unbiased, as in MCANet
        s = torch.sigmoid(self.weight)
        z = 0.5 * (avg + std) + s[0] * avg + s[1] * std  # (b, n)
        z = self.conv(z.reshape(b, 1, 1, n))  # 1-D conv along n
        return torch.sigmoid(z).reshape(b, n, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MCA(nn.Module):
    """Multidimensional collaborative attention: (B, C, H, W) -> (B, C, H, W), ``(X_c + X_h + X_w) / 3``.

    - ``h_cw`` (k = 3) gates across H, pooling over C and W;
    - ``w_hc`` (k = 3) gates across W, pooling over H and C;
    - ``c_hw`` (k = :func:`mca_kernel_size`) gates across C, pooling over H and W (needs H * W >= 2).
    No residual. Construction draws ``torch.rand`` (gate weights): seed first for determinism.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.h_cw = MCAGate(3)
        self.w_hc = MCAGate(3)
        self.c_hw = MCAGate(mca_kernel_size(channels))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three gates of ``x`` (B, C, H, W): over C (B, C), H (B, H) and W (B, W), all in (0, 1)."""
        self._check(x)
        g_c = self.c_hw.gate(x).flatten(1)
        g_h = self.h_cw.gate(x.permute(0, 2, 1, 3)).flatten(1)
        g_w = self.w_hc.gate(x.permute(0, 3, 2, 1)).flatten(1)
        return g_c, g_h, g_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x_h = self.h_cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        x_w = self.w_hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
        x_c = self.c_hw(x)
        return (x_c + x_h + x_w) / 3.0

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"MCA({self.channels}) expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"MCA needs H * W >= 2 (unbiased std over space), got {tuple(x.shape)}")


# --- rank amplification ---------------------------------------------------------------------------------


def amplification_ranks(a_raw: torch.Tensor) -> torch.Tensor:
    """Descending rank of each entry within its row (last axis): 0 = largest, n-1 = smallest; int64.

    Computed as a double argsort (stable, so ties are ranked by position). Works for any shape with >= 1 dim.
    """
    if a_raw.dim() < 1:
        raise ValueError(f"a_raw must have at least one dimension, got shape {tuple(a_raw.shape)}")
    order = torch.argsort(a_raw, dim=-1, descending=True, stable=True)
    return torch.argsort(order, dim=-1, stable=True)


def amplification_weights(a_raw: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """A_amp = (rank + 1)^alpha where a_raw >= 0, else 1 (eq. 4 with DCFM's ``>= 0``).

    fp32 (fp64 if a_raw is), same shape as ``a_raw``; values in [1, n^alpha] with n = a_raw.shape[-1].
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    dtype = torch.float64 if a_raw.dtype == torch.float64 else torch.float32
    ranks = amplification_ranks(a_raw).to(dtype)
    amp = (ranks + 1.0) ** alpha
    return torch.where(a_raw >= 0, amp, torch.ones_like(amp))


def amplified_attention(a_raw: torch.Tensor, alpha: float = ALPHA, row_renorm: bool = False) -> torch.Tensor:
    """A_final = softmax(a_raw, -1) * amplification_weights(a_raw, alpha); rows divided by their sums when
    ``row_renorm`` (flagged deviation). Same shape as ``a_raw``, non-negative."""
    a_final = torch.softmax(a_raw, dim=-1) * amplification_weights(a_raw, alpha).to(a_raw.dtype)
    if row_renorm:
        a_final = a_final / a_final.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return a_final


def _two_convs(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1))


def _conv_fp32(x: torch.Tensor, block: nn.Sequential) -> torch.Tensor:
    """Apply a stack of 1x1 convs in fp32 whatever the parameter dtype (weights cast on the fly)."""
    for conv in block:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected Conv2d layers, got {type(conv).__name__}")
        bias = None if conv.bias is None else conv.bias.float()
        x = F.conv2d(x, conv.weight.float(), bias)
    return x


class AmplifiedAttention(nn.Module):
    """Rank-amplified intra-image self-attention plus residual: F_act (B, C, H, W) -> F_enrich, same shape.

    Q, K and V are each two stacked 1x1 convs (C -> C -> C, biases, no activation). Always computed in fp32
    with autocast disabled (input of any float dtype is cast up); the output is fp32. Memory: a few
    (B, HW, HW) fp32 tensors (24 x 784 x 784 x 4 B = 59 MB each).
    """

    def __init__(self, dim: int, alpha: float = ALPHA, row_renorm: bool = False):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.dim = dim
        self.alpha = float(alpha)
        self.row_renorm = bool(row_renorm)
        if self.row_renorm:
            log.info(
                "AmplifiedAttention: row_renorm=True (deviation from UMS/DCFM: rows of A_final sum to 1)"
            )
        self.query = _two_convs(dim)
        self.key = _two_convs(dim)
        self.value = _two_convs(dim)
        self.scale = 1.0 / math.sqrt(dim)

    def attention(self, f_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_raw, A_final, V) for ``f_act`` (B, C, H, W): (B, HW, HW), (B, HW, HW), (B, HW, C), all fp32."""
        if f_act.dim() != 4 or f_act.shape[1] != self.dim:
            raise ValueError(
                f"AmplifiedAttention({self.dim}) expects (B, {self.dim}, H, W), got {tuple(f_act.shape)}"
            )
        with torch.autocast(device_type=f_act.device.type, enabled=False):
            x = f_act.float()
            q = _conv_fp32(x, self.query).flatten(2).transpose(1, 2)  # (B, HW, C)
            k = _conv_fp32(x, self.key).flatten(2)  # (B, C, HW)
            v = _conv_fp32(x, self.value).flatten(2).transpose(1, 2)  # (B, HW, C)
            a_raw = torch.bmm(q, k) * self.scale
            a_final = amplified_attention(a_raw, self.alpha, self.row_renorm)
        return a_raw, a_final, v

    def forward(self, f_act: torch.Tensor) -> torch.Tensor:
        b, c, h, w = f_act.shape
        _, a_final, v = self.attention(f_act)
        with torch.autocast(device_type=f_act.device.type, enabled=False):
            out = torch.bmm(a_final, v).transpose(1, 2).reshape(b, c, h, w)
            return out + f_act.float()


class FRAM(nn.Module):
    """Feature Refinement and Amplification Module: F_merged (B, C, H, W) -> F_enrich (B, C, H, W) fp32.

    ``MCA -> Conv1x1 + ReLU (= F_act) -> AmplifiedAttention``. MCA and the conv follow the ambient autocast;
    the attention and its residual are fp32. Expect large magnitudes (see module doc); normalise before use.
    """

    def __init__(self, dim: int, alpha: float = ALPHA, row_renorm: bool = False):
        super().__init__()
        self.dim = dim
        self.mca = MCA(dim)
        self.act = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(inplace=True))
        self.attention = AmplifiedAttention(dim, alpha=alpha, row_renorm=row_renorm)

    def activate(self, merged: torch.Tensor) -> torch.Tensor:
        """F_act = ReLU(Conv1x1(MCA(merged))), (B, C, H, W), >= 0, dtype of the computation."""
        if merged.dim() != 4 or merged.shape[1] != self.dim:
            raise ValueError(f"FRAM({self.dim}) expects (B, {self.dim}, H, W), got {tuple(merged.shape)}")
        param_dtype = next(self.act.parameters()).dtype
        if merged.dtype != param_dtype and not torch.is_autocast_enabled(merged.device.type):
            merged = merged.to(param_dtype)  # e.g. bf16 features into an fp32 module
        return self.act(self.mca(merged))

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        return self.attention(self.activate(merged))
