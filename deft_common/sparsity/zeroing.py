"""The one zeroing rule of DEFT: an activation entry with |a| <= τ is set to exactly 0.

Calibrated inference thresholds (a fixed τ per block) and the training set-point (τ of each batch) both follow it;
`mask_stage` is the inference thresholds' stage at the blocks' capture points (deft_common.capture).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import MlpSite
from ..capture import ActivationCapture, StageHandle, is_activation


def zero_at_or_below(a: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """`a` with every entry |a| <= τ set to exactly 0. For a number τ, hardshrink is exactly that rule in one fused
    pass (measured 10x faster than abs, compare and masked_fill on a 32x128x1536 batch); a tensor τ (the set-point's,
    computed on the device) is compared on the device, without reading it on the host. The gradient passes where
    the entry is kept, and is 0 where it is zeroed."""
    if isinstance(tau, torch.Tensor):
        return torch.where(a.abs() > tau.to(a.dtype), a, a.new_zeros(()))  # 3x faster than a * mask on CPU
    return F.hardshrink(a, float(tau))


def mask_stage(model: nn.Module, thresholds: Mapping[str, float], sites: list[MlpSite], capture: str) -> StageHandle:
    """The "inference" stage that zeroes |a| <= thresholds[site.name] at `capture` of each of `sites`, in every
    forward (training and inference alike); `handle.remove()` takes it off."""

    def zeroed(site: MlpSite, a):
        return zero_at_or_below(a, thresholds[site.name]) if is_activation(a) else None

    return ActivationCapture.of(model).add("inference", sites, capture, zeroed)
