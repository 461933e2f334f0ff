"""UMS-CoSOD network: AFMM -> CFMM -> FRAM -> decoder on frozen DINO + DINOv2 tokens (method_spec B.1-B.6).

One forward pass takes one *group* as the batch (CFMM's prototype pools over the batch): the DINO tokens
(B, h, w, C) and the DINOv2 tokens (B, h2, w2, C2) of its images, e.g. 28x28x768 and 16x16x768 at 224 input.
It returns logits at 2^steps times the DINO grid (224 for ViT-B/8) plus the FRAM features that RRBE pools into
its group prototype.

Build through :meth:`UMSNet.build` for a deterministic initialisation: MCA's gate weights come from
``torch.rand``, so the seed must be set before construction; ``build`` does that in a forked RNG so the global
state is untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .afmm import AFMM, HEADS
from .cfmm import CFMM, CHUNK_ELEMENTS, CFMMOutput
from .decoder import STEPS, WIDTH, Decoder
from .fram import ALPHA, FRAM

log = logging.getLogger(__name__)

SEED = 123


@dataclass
class UMSOutput:
    """Output of :class:`UMSNet` for a group of B images on an h x w patch grid.

    logits: (B, 1, H, W) float32 saliency logits, H = h * 2^steps (apply sigmoid for [0, 1] maps).
    side_logits: list of (B, 1, H, W) side-output logits for deep supervision (earlier decoder stages).
    enriched: F_enrich (B, C, h, w) float32, FRAM's output (unnormalised, magnitudes up to ~1e6).
    mix_weights: AFMM's per-patch DINO weight w (B, h, w) in (0, 1), detached.
    cfmm: the CFMM intermediates (key points, response maps, prototype).
    """

    logits: torch.Tensor
    side_logits: list[torch.Tensor]
    enriched: torch.Tensor
    mix_weights: torch.Tensor
    cfmm: CFMMOutput = field(repr=False)


class UMSNet(nn.Module):
    """The trainable UMS-CoSOD network.

    Args:
        dim: DINO token channels C (768 for ViT-B/8).
        v2_dim: DINOv2 token channels (default ``dim``); projected to ``dim`` when different.
        afmm_hidden: AFMM weight-net width (default ``dim // 4``).
        heads: AFMM attention heads (4).
        alpha: FRAM amplification exponent (3).
        row_renorm: FRAM row renormalisation (flagged deviation, default off).
        width: decoder width (64).
        steps: decoder x2 upsamplings (3).
        chunk_elements: CFMM affinity chunk size in entries.
    """

    def __init__(
        self,
        dim: int = 768,
        v2_dim: int | None = None,
        afmm_hidden: int | None = None,
        heads: int = HEADS,
        alpha: float = ALPHA,
        row_renorm: bool = False,
        width: int = WIDTH,
        steps: int = STEPS,
        chunk_elements: int = CHUNK_ELEMENTS,
    ):
        super().__init__()
        v2_dim = dim if v2_dim is None else v2_dim
        self.config: dict[str, Any] = {
            "dim": dim,
            "v2_dim": v2_dim,
            "afmm_hidden": afmm_hidden,
            "heads": heads,
            "alpha": float(alpha),
            "row_renorm": bool(row_renorm),
            "width": width,
            "steps": steps,
            "chunk_elements": chunk_elements,
        }
        self.dim = dim
        self.v2_dim = v2_dim
        self.afmm = AFMM(dim, v2_dim=v2_dim, hidden=afmm_hidden, heads=heads)
        self.cfmm = CFMM(dim, chunk_elements=chunk_elements)
        self.fram = FRAM(dim, alpha=alpha, row_renorm=row_renorm)
        self.decoder = Decoder(dim, width=width, steps=steps)

    @classmethod
    def build(cls, seed: int = SEED, **kw: Any) -> UMSNet:
        """Construct with PyTorch's default initialisation under ``seed`` (global RNG state preserved)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = cls(**kw)
        log.debug("built UMSNet(%s) with seed %d", net.config, seed)
        return net

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, dino_tokens: torch.Tensor, v2_tokens: torch.Tensor) -> UMSOutput:
        """dino_tokens (B, h, w, dim), v2_tokens (B, h2, w2, v2_dim), float, one group -> :class:`UMSOutput`.

        B = 1 works (the group prototype is then the image's own); h * w must be >= 2 (MCA's std).
        """
        fused = self.afmm(dino_tokens, v2_tokens)  # (B, C, h, w)
        mined = self.cfmm(fused)
        enriched = self.fram(mined.merged)
        logits, sides = self.decoder(enriched)
        weights = self.afmm.last_weights
        assert weights is not None  # set by the AFMM forward above
        return UMSOutput(
            logits=logits.float(),
            side_logits=[s.float() for s in sides],
            enriched=enriched,
            mix_weights=weights,
            cfmm=mined,
        )
