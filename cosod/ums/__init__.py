"""UMS-CoSOD network (method_spec B.3-B.7): AFMM -> CFMM -> FRAM -> decoder, and its BCE + IoU loss.

Importing this package builds nothing and touches no CUDA.
"""

from .afmm import AFMM, upsample_tokens
from .cfmm import CFMM, CFMMOutput, group_max_affinity
from .decoder import Decoder
from .fram import (
    FRAM,
    MCA,
    AmplifiedAttention,
    MCAGate,
    amplification_ranks,
    amplification_weights,
    amplified_attention,
    mca_kernel_size,
)
from .losses import LossTerms, bce_iou_loss, bce_iou_terms
from .net import UMSNet, UMSOutput

__all__ = [
    "AFMM",
    "CFMM",
    "FRAM",
    "MCA",
    "AmplifiedAttention",
    "CFMMOutput",
    "Decoder",
    "LossTerms",
    "MCAGate",
    "UMSNet",
    "UMSOutput",
    "amplification_ranks",
    "amplification_weights",
    "amplified_attention",
    "bce_iou_loss",
    "bce_iou_terms",
    "group_max_affinity",
    "mca_kernel_size",
    "upsample_tokens",
]
