"""deft_axolotl: DEFT as an Axolotl plugin.

    plugins:
      - deft_axolotl.DeftPlugin
    deft:
      coef: 1.0

See README.md in this folder.
"""

from .args import DeftArgs, DeftBlock
from .plugin import DeftPlugin
from .trainer import DeftAxolotlTrainer, deft_trainer_class

__all__ = ["DeftArgs", "DeftAxolotlTrainer", "DeftBlock", "DeftPlugin", "deft_trainer_class"]
