"""deft_common: the framework-free core of activation-density DEFT (Density-Efficient Fine-Tuning).

Torch only. Finds each architecture's MLP activations, measures their density and computes the density loss
that the framework adapters (deft_hf, deft_trl, deft_axolotl, deft_deepspeed) add to the task loss.
"""

from .architectures import MlpSite, base_model_of, find_mlp_sites
from .checkpointing import DeftCheckpointingError, make_checkpointing_non_reentrant, uses_reentrant_checkpointing
from .config import DeftConfig, DeftConfigError
from .controller import DensityController
from .loss_hook import DeftLossError, DensityLossHook
from .tracker import DeftInputError, DensityTracker

__version__ = "0.1.0"

__all__ = [
    "DeftCheckpointingError",
    "DeftConfig",
    "DeftConfigError",
    "DeftInputError",
    "DensityController",
    "DeftLossError",
    "DensityLossHook",
    "DensityTracker",
    "MlpSite",
    "__version__",
    "base_model_of",
    "find_mlp_sites",
    "make_checkpointing_non_reentrant",
    "uses_reentrant_checkpointing",
]
