"""Applying calibrated thresholds: every |a| <= τ at each thresholded block's capture point is set to 0.

`apply_thresholds(model, th)` adds the "inference" stage of deft_common.capture (kernel="mask": only zero);
kernel="sparse" also skips the work behind the zeros (sparsity.sparse_mlp). `handle.remove()` restores the model.
"""

from __future__ import annotations

from torch import nn

from ..capture import ActivationCapture
from ..errors import DeftThresholdsError
from .sparse_mlp import install_sparse_mlp
from .thresholds import SparsityThresholds
from .zeroing import mask_stage

KERNELS = ("mask", "sparse")


class ThresholdsHandle:
    """What `apply_thresholds` returns: `remove()` takes the thresholds off again (also as a context manager)."""

    def __init__(self, model: nn.Module, thresholds: SparsityThresholds, kernel: str, handles: list):
        self.model, self.thresholds, self.kernel = model, thresholds, kernel
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ThresholdsHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_thresholds(model: nn.Module, thresholds: SparsityThresholds, kernel: str = "mask") -> ThresholdsHandle:
    """From now on every |a| <= τ at each thresholded block's capture point is exactly 0 (inference and training
    forwards alike). kernel="mask" only zeroes; kernel="sparse" also skips the work behind the zeros
    (sparsity.sparse_mlp). `handle.remove()` restores the model exactly."""
    if not isinstance(thresholds, SparsityThresholds):
        raise DeftThresholdsError(f"apply_thresholds needs SparsityThresholds (calibrate_thresholds or "
                                  f"SparsityThresholds.load), got {type(thresholds).__name__}")
    if kernel not in KERNELS:
        raise DeftThresholdsError(f"apply_thresholds: kernel={kernel!r} is unknown; use 'mask' (zero the entries) "
                                  "or 'sparse' (zero them and skip their multiply-adds)")
    capture = ActivationCapture.existing(model)
    if capture is not None and capture.has_stage("inference"):
        raise DeftThresholdsError("thresholds are already applied to this model; call .remove() on the handle "
                                  "apply_thresholds returned before applying others")
    sites = thresholds.sites_in(model)
    handles = []
    try:
        if kernel == "sparse":
            for site in sites:  # each block gets its mask and, where it pays, its sparse forward
                handles.append(install_sparse_mlp(model, site, thresholds.thresholds[site.name], thresholds.capture,
                                                  calibrated_density=1.0 - thresholds.calibrated[site.name]))
        else:
            handles.append(mask_stage(model, thresholds.thresholds, sites, thresholds.capture))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return ThresholdsHandle(model, thresholds, kernel, handles)
