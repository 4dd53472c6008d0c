"""ADA-DEFT in one import: the learnable per-layer weights and their file (adaptive_weights.py), and choosing and
skipping MLP blocks from them at inference (block_skip.py)."""

from .adaptive_weights import (WEIGHTS_FILE, AdaptiveLayerWeights, attach_layer_weights, layer_weights,
                               load_layer_weights, save_gathered_layer_weights, save_layer_weights)
from .block_skip import SkipReport, apply_ada_deft, budget_to_count, choose_blocks_to_skip, skip_mlp_blocks

__all__ = ["WEIGHTS_FILE", "AdaptiveLayerWeights", "SkipReport", "apply_ada_deft", "attach_layer_weights",
           "budget_to_count", "choose_blocks_to_skip", "layer_weights", "load_layer_weights",
           "save_gathered_layer_weights", "save_layer_weights", "skip_mlp_blocks"]
