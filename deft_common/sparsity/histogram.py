"""The log2 histogram of |a| that calibration and the set-point read their quantiles from.

|a| is binned by log2 into BINS_PER_OCTAVE bins per factor of 2 over [2^LOWEST_OCTAVE, 2^HIGHEST_OCTAVE); values
outside the range fall into the first or last bin (exact zeros land in the first). Within a bin the quantile is
interpolated in log space, so it is within one bin (a factor 2^(1/256), 0.27%) of the exact quantile of the
entries counted. Histograms of several processes add up, so a quantile over every process's entries costs one sum.
"""

from __future__ import annotations

import torch

BINS_PER_OCTAVE = 256
LOWEST_OCTAVE, HIGHEST_OCTAVE = -40, 24
NUM_BINS = (HIGHEST_OCTAVE - LOWEST_OCTAVE) * BINS_PER_OCTAVE


def bin_index(magnitude: torch.Tensor) -> torch.Tensor:
    """The bin (int64) of each entry of `magnitude` (|a|, any float dtype; computed in fp32)."""
    return ((torch.log2(magnitude.float()) - LOWEST_OCTAVE) * BINS_PER_OCTAVE).floor_().clamp_(0, NUM_BINS - 1).long()


def bin_value(position: torch.Tensor | float) -> torch.Tensor | float:
    """|a| at a (fractional) bin position: bin k starts at 2^(LOWEST_OCTAVE + k / BINS_PER_OCTAVE)."""
    exponent = LOWEST_OCTAVE + position / BINS_PER_OCTAVE
    return torch.exp2(exponent) if isinstance(exponent, torch.Tensor) else 2.0 ** exponent


def quantile_on_device(counts: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of the entries a histogram counted, as a 0-dim tensor on the histogram's device, computed
    there without reading anything back to the host (no synchronisation): the position where the cumulative count
    reaches q × total, interpolated within its bin. Below the first bin's share it is the first bin's start
    (2^LOWEST_OCTAVE, ~1e-12: exact zeros and underflows)."""
    cumulative = counts.cumsum(0)
    wanted = (q * cumulative[-1]).reshape(1)
    k = torch.searchsorted(cumulative, wanted).clamp_(max=NUM_BINS - 1)
    before = torch.where(k > 0, cumulative[(k - 1).clamp(min=0)], torch.zeros_like(wanted))
    share = ((wanted - before) / counts[k].clamp(min=1e-12)).clamp_(0.0, 1.0)
    return bin_value(k.to(counts.dtype) + share).reshape(())
