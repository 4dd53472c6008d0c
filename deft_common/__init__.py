"""deft_common: the framework-free core of activation-density DEFT (Density-Efficient Fine-Tuning).

Torch only. Finds each architecture's MLP activations, measures their density and computes the density loss
that the framework adapters (deft_hf, deft_trl, deft_axolotl, deft_deepspeed) add to the task loss; calibrates
the thresholds, trains under a sparsity set-point and executes sparse MLPs (deft_common.sparsity). Everything that
reads or changes an MLP activation is a stage of one capture mechanism (deft_common.capture). Every error DEFT
raises is a DeftError (deft_common.errors).
"""

from .adaptive_weights import (AdaptiveLayerWeights, attach_layer_weights, layer_weights, load_layer_weights,
                               save_layer_weights)
from .architectures import MlpSite, base_model_of, down_projection, find_mlp_sites, unwrapped, up_projection
from .block_skip import SkipReport, apply_ada_deft, budget_to_count, choose_blocks_to_skip, skip_mlp_blocks
from .capture import ActivationCapture
from .checkpointing import make_checkpointing_non_reentrant, uses_reentrant_checkpointing
from .coef_schedule import CoefSchedule, DensitySums
from .config import DeftConfig
from .controller import DensityController
from .errors import (DeftCheckpointingError, DeftConfigError, DeftError, DeftInputError, DeftLossError,
                     DeftThresholdsError, SparseMlpError, ThresholdsFileNotFound)
from .loss_engine import DensityLossEngine
from .loss_hook import DensityLossHook
from .sparsity import (THRESHOLDS_FILE, ActivationHistograms, SetpointWarning, SparsitySetpoint, SparsityThresholds,
                       ThresholdsHandle, ThresholdsWarning, apply_thresholds, calibrate_thresholds, install_sparse_mlp,
                       measure_histograms, save_inference_thresholds)
from .tracker import DensityTracker

__version__ = "0.1.0"

__all__ = [
    "ActivationCapture",
    "ActivationHistograms",
    "AdaptiveLayerWeights",
    "CoefSchedule",
    "DeftCheckpointingError",
    "DeftConfig",
    "DeftConfigError",
    "DeftError",
    "DeftInputError",
    "DeftLossError",
    "DeftThresholdsError",
    "DensityController",
    "DensityLossEngine",
    "DensityLossHook",
    "DensitySums",
    "DensityTracker",
    "MlpSite",
    "SetpointWarning",
    "SkipReport",
    "SparseMlpError",
    "SparsitySetpoint",
    "SparsityThresholds",
    "THRESHOLDS_FILE",
    "ThresholdsFileNotFound",
    "ThresholdsHandle",
    "ThresholdsWarning",
    "__version__",
    "apply_ada_deft",
    "apply_thresholds",
    "attach_layer_weights",
    "base_model_of",
    "budget_to_count",
    "calibrate_thresholds",
    "choose_blocks_to_skip",
    "down_projection",
    "find_mlp_sites",
    "install_sparse_mlp",
    "layer_weights",
    "load_layer_weights",
    "make_checkpointing_non_reentrant",
    "measure_histograms",
    "save_inference_thresholds",
    "save_layer_weights",
    "skip_mlp_blocks",
    "unwrapped",
    "up_projection",
    "uses_reentrant_checkpointing",
]
