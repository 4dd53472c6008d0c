"""Sparsity at inference and the training set-point: one package, one zeroing rule.

- thresholds.py   SparsityThresholds and its file, deft_thresholds.json
- calibration.py  calibrate_thresholds / measure_histograms / save_inference_thresholds (a quantile of |a| per block)
- zeroing.py      the rule |a| <= τ -> 0, and the mask stage at the capture points
- masking.py      apply_thresholds: the mask, or sparse execution (kernel="sparse")
- sparse_mlp.py   install_sparse_mlp: a block's forward that skips the work behind the zeros
- kernels.py      the C++ / torch kernels sparse execution runs on
- setpoint.py     SparsitySetpoint: training under the sparsity the thresholds will impose

Every piece that touches an activation is a stage of deft_common.capture.
"""

from .calibration import ActivationHistograms, calibrate_thresholds, measure_histograms, save_inference_thresholds
from .masking import KERNELS, ThresholdsHandle, apply_thresholds
from .setpoint import SetpointWarning, SparsitySetpoint
from .sparse_mlp import SparseMlpHandle, install_sparse_mlp, speedup_limit
from .thresholds import THRESHOLDS_FILE, SparsityThresholds, ThresholdsWarning
from .zeroing import zero_at_or_below

__all__ = [
    "KERNELS",
    "THRESHOLDS_FILE",
    "ActivationHistograms",
    "SetpointWarning",
    "SparseMlpHandle",
    "SparsitySetpoint",
    "SparsityThresholds",
    "ThresholdsHandle",
    "ThresholdsWarning",
    "apply_thresholds",
    "calibrate_thresholds",
    "install_sparse_mlp",
    "measure_histograms",
    "save_inference_thresholds",
    "speedup_limit",
    "zero_at_or_below",
]
