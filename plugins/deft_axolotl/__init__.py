"""deft_axolotl: DEFT as an Axolotl plugin.

    plugins:
      - deft_axolotl.DeftPlugin
    deft:
      coef: 1.0

See README.md in this folder.
"""

try:
    import axolotl  # noqa: F401  (the plugin and its trainer build on it)
except ModuleNotFoundError as err:
    if err.name != "axolotl":  # axolotl is there, one of its own imports failed: that error says which
        raise
    raise ImportError("deft_axolotl needs the package axolotl, which is not installed. Install it with: "
                      "pip install 'deft-plugins[axolotl]' (from a checkout: pip install '.[axolotl]')",
                      name="axolotl") from err

from .args import DeftArgs, DeftBlock  # noqa: E402
from .plugin import DeftPlugin  # noqa: E402
from .trainer import DeftAxolotlTrainer, deft_trainer_class  # noqa: E402

__all__ = ["DeftArgs", "DeftAxolotlTrainer", "DeftBlock", "DeftPlugin", "deft_trainer_class"]
