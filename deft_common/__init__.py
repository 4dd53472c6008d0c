"""deft_common: the framework-free core of activation-density DEFT (Density-Efficient Fine-Tuning).

Torch only. Finds each architecture's MLP activations, measures their density and computes the density loss
that the framework adapters (deft_hf, deft_trl, deft_axolotl, deft_deepspeed) add to the task loss.
"""

from .adaptive_weights import (AdaptiveLayerWeights, attach_layer_weights, layer_weights, load_layer_weights,
                               save_layer_weights)
from .architectures import MlpSite, base_model_of, down_projection, find_mlp_sites, unwrapped, up_projection
from .block_skip import SkipReport, apply_ada_deft, budget_to_count, choose_blocks_to_skip, skip_mlp_blocks
from .checkpointing import DeftCheckpointingError, make_checkpointing_non_reentrant, uses_reentrant_checkpointing
from .config import DeftConfig, DeftConfigError
from .controller import DensityController
from .density_weight import DensitySums, DensityWeight
from .loss_engine import DensityLossEngine
from .loss_hook import DeftLossError, DensityLossHook
from .setpoint import SetpointWarning, SparsitySetpoint
from .sparse_mlp import SparseMlpError, install_sparse_mlp
from .thresholds import (THRESHOLDS_FILE, ActivationHistograms, DeftThresholdsError, SparsityThresholds,
                         ThresholdsHandle, apply_thresholds, calibrate_thresholds, measure_histograms,
                         save_inference_thresholds)
from .tracker import DeftInputError, DensityTracker

__version__ = "0.1.0"

__all__ = [
    "ActivationHistograms",
    "AdaptiveLayerWeights",
    "DeftCheckpointingError",
    "DeftConfig",
    "DeftConfigError",
    "DeftInputError",
    "DeftLossError",
    "DeftThresholdsError",
    "DensityController",
    "DensityLossEngine",
    "DensityLossHook",
    "DensitySums",
    "DensityTracker",
    "DensityWeight",
    "MlpSite",
    "SetpointWarning",
    "SkipReport",
    "SparseMlpError",
    "SparsitySetpoint",
    "SparsityThresholds",
    "THRESHOLDS_FILE",
    "ThresholdsHandle",
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
