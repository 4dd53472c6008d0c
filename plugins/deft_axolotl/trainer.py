"""The Axolotl trainer with the DEFT density loss: `AxolotlTrainer` + `deft_hf.DeftTrainerMixin`.

The mixin does all the DEFT work (density loss added in `compute_loss` with the Trainer's gradient-accumulation
scaling, non-reentrant checkpointing, deft/* metrics merged in `log`); nothing here is Axolotl-specific beyond
the choice of base class.
"""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer

from deft_common import DeftConfig

try:
    from deft_hf import DeftTrainerMixin
    from deft_hf.trainer_support import (save_layer_weights_with_model,  # noqa: F401  (for plugin.py)
                                         save_thresholds_with_model)
except ImportError as err:
    # Axolotl 0.19 skips a plugin whose import raises ImportError and then drops its `deft:` block without a
    # word, so a missing dependency is re-raised as an error Axolotl does not catch.
    raise RuntimeError(f"the DEFT Axolotl plugin needs deft_common and deft_hf importable: {err}") from err


class DeftAxolotlTrainer(DeftTrainerMixin, AxolotlTrainer):
    """AxolotlTrainer whose training loss includes coef × DEFT density loss. Pass `deft_config=DeftConfig(...)`."""


def deft_trainer_class(base: type | None, deft_config: DeftConfig) -> type:
    """A trainer class for Axolotl's builder: `base` (None = AxolotlTrainer) with DEFT mixed in, constructed with
    `deft_config` by default (the builder passes only Axolotl's own keyword arguments)."""
    if base is None or base is AxolotlTrainer:
        parent: tuple[type, ...] = (DeftAxolotlTrainer,)
    elif issubclass(base, DeftTrainerMixin):
        parent = (base,)
    else:
        parent = (DeftTrainerMixin, base)
    name = parent[0].__name__ if len(parent) == 1 else f"Deft{base.__name__}"
    return type(name, parent, {"deft_config": deft_config, "__module__": __name__})


def is_deft_trainer(trainer) -> bool:
    return isinstance(trainer, DeftTrainerMixin)
