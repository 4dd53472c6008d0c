"""`DeftPlugin`: the Axolotl side of DEFT.

    plugins:
      - deft_axolotl.DeftPlugin
    deft:
      coef: 1.0

What each hook does:
- register (raw config, before Axolotl validates it): rejects misspelled `deft` blocks, which Axolotl would
  drop without a word, and makes the two settings DEFT needs before Axolotl fills in its defaults:
  non-reentrant gradient checkpointing and no fused LoRA MLP kernel.
- get_input_args: the `deft:` block (args.py), validated by Axolotl together with the rest of the config.
- get_trainer_cls: the trainer Axolotl would use (AxolotlTrainer, `trainer_cls:`, or a trainer another listed
  plugin supplies) with deft_hf.DeftTrainerMixin mixed in; the mixin adds the density loss and logs
  deft/density and deft/loss.
- post_trainer_create: checks that the trainer really is a DEFT trainer (another plugin listed earlier may have
  chosen the trainer class).
- post_train: logs the final density, with `adaptive: true` writes the ADA-DEFT layer weights into output_dir
  (deft_adaptive.json, beside the adapter Axolotl saves there next), and removes the hooks (Axolotl 0.19 calls it
  twice; the second call is a no-op); with `inference_sparsity` (or `sparsity_setpoint`) it calibrates the inference
  thresholds and writes deft_thresholds.json into output_dir too. Checkpoints get the weights from the trainer's
  save_model (deft_hf mixin).
"""

from __future__ import annotations

import difflib

from axolotl.integrations.base import BasePlugin, PluginManager
from axolotl.utils.logging import get_logger

from deft_common import THRESHOLDS_FILE, DeftConfig, DeftConfigError
from deft_common.adaptive import WEIGHTS_FILE

from .args import DeftBlock
from .trainer import deft_trainer_class, is_deft_trainer, save_layer_weights_with_model, save_thresholds_with_model

# Axolotl's console shows INFO only from loggers under "axolotl."; this name puts DEFT's messages with its own.
LOG = get_logger("axolotl.integrations.deft")

PLUGIN_NAME = "deft_axolotl.DeftPlugin"


def _raw_block(cfg) -> dict:
    block = cfg.get("deft")
    return block if isinstance(block, dict) else {}


def _enabled(cfg) -> bool:
    return _raw_block(cfg).get("enabled", True) is not False


def deft_config_from(cfg) -> DeftConfig | None:
    """The DeftConfig of a validated Axolotl config, or None when `deft: {enabled: false}`."""
    block = DeftBlock.model_validate(dict(cfg.get("deft") or {}))
    return block.to_deft_config() if block.enabled else None


class DeftPlugin(BasePlugin):
    """Adds the DEFT density loss (activation sparsity of every MLP layer) to Axolotl fine-tuning."""

    def __init__(self):
        super().__init__()
        self.trainer = None

    def get_input_args(self) -> str:
        return "deft_axolotl.args.DeftArgs"

    # ------------------------------------------------------------------ config
    def register(self, cfg: dict):
        _reject_misspelled_block(cfg)
        if not _enabled(cfg):
            return
        if cfg.get("gradient_checkpointing") is True:
            kwargs = dict(cfg.get("gradient_checkpointing_kwargs") or {})
            if kwargs.get("use_reentrant") is not False:
                # Axolotl 0.19 defaults to reentrant checkpointing, which runs each layer's forward without
                # gradients: the density loss would train nothing.
                LOG.warning(
                    "DEFT: gradient checkpointing switched to non-reentrant (gradient_checkpointing_kwargs."
                    f"use_reentrant: false, was {kwargs.get('use_reentrant', 'unset')}); with reentrant "
                    "checkpointing the density loss gets no gradient"
                )
                cfg["gradient_checkpointing_kwargs"] = {**kwargs, "use_reentrant": False}
        if cfg.get("lora_mlp_kernel") is True:
            raise DeftConfigError(
                "`lora_mlp_kernel: true` replaces the MLP forward with a fused kernel that never calls the "
                "activation module DEFT measures; set `lora_mlp_kernel: false` (or remove it) to use DEFT"
            )
        if cfg.get("lora_mlp_kernel") is None and cfg.get("adapter") in ("lora", "qlora"):
            # Axolotl auto-enables this fused kernel for LoRA; it would bypass the activation (error above).
            LOG.info("DEFT: lora_mlp_kernel set to false (the fused LoRA MLP kernel bypasses the MLP activation)")
            cfg["lora_mlp_kernel"] = False

    # ------------------------------------------------------------------ trainer
    def get_trainer_cls(self, cfg):
        deft_config = deft_config_from(cfg)
        if deft_config is None:
            LOG.info("DEFT: disabled (deft.enabled: false); training without the density loss")
            return None
        base = self._other_trainer_cls(cfg)
        return deft_trainer_class(base, deft_config)

    def _other_trainer_cls(self, cfg):
        """The trainer class Axolotl would use without DEFT: another listed plugin's (first wins, as in
        Axolotl), else `trainer_cls:`, else None (AxolotlTrainer)."""
        for name, plugin in PluginManager.get_instance().plugins.items():
            if plugin is self or name not in (cfg.get("plugins") or []):
                continue
            trainer_cls = plugin.get_trainer_cls(cfg)
            if trainer_cls is not None:
                return trainer_cls
        if cfg.get("trainer_cls"):
            from axolotl.utils.import_helper import get_cls_from_module_str

            return get_cls_from_module_str(cfg.trainer_cls)
        return None

    def post_trainer_create(self, cfg, trainer):
        if deft_config_from(cfg) is None:
            return
        if not is_deft_trainer(trainer):
            earlier = [p for p in cfg.get("plugins") or [] if p != PLUGIN_NAME]
            raise DeftConfigError(
                f"the trainer is {type(trainer).__name__}, not a DEFT trainer: a plugin listed before "
                f"{PLUGIN_NAME} chose the trainer class ({earlier}); list {PLUGIN_NAME} first in `plugins:` "
                "and DEFT will build on that plugin's trainer"
            )
        self.trainer = trainer
        LOG.info(
            f"DEFT: density loss on {len(trainer.deft_tracker.sites)} MLP block(s) "
            f"({trainer.deft_tracker.sites[0].name}, ...), {trainer.deft_config.to_dict()}"
        )

    def post_train(self, cfg, model):
        if self.trainer is None:  # disabled, or the second call of Axolotl 0.19
            return
        trainer, self.trainer = self.trainer, None
        densities = [entry["deft/density"] for entry in trainer.state.log_history if "deft/density" in entry]
        if densities:
            LOG.info(f"DEFT: MLP activation density {densities[0]:.4f} (first log) -> {densities[-1]:.4f} (last log)")
        if trainer.deft_config.adaptive:
            # Axolotl saves the final model with model.save_pretrained (no trainer.save_model) on most setups.
            save_layer_weights_with_model(trainer, cfg.output_dir)
            LOG.info(f"DEFT: ADA-DEFT layer weights saved to {cfg.output_dir}/{WEIGHTS_FILE}")
        if trainer.deft_config.thresholds_sparsity is not None:
            thresholds = save_thresholds_with_model(trainer, cfg.output_dir, trainer.deft_config)
            LOG.info(f"DEFT: inference thresholds (sparsity {trainer.deft_config.thresholds_sparsity:g}, calibrated "
                     f"density {thresholds.mean_calibrated_density():.4f}) saved to {cfg.output_dir}/{THRESHOLDS_FILE}")
        trainer.deft_tracker.remove()  # the trained model goes back to its callers without DEFT's hooks


def _reject_misspelled_block(cfg: dict) -> None:
    suspects = [
        key
        for key in cfg
        if isinstance(key, str)
        and key != "deft"
        and (key.lower().startswith("deft") or difflib.get_close_matches(key.lower(), ["deft"], n=1, cutoff=0.75))
    ]
    if suspects:
        raise DeftConfigError(
            f"config key(s) {suspects} look like a misspelled `deft:` block; Axolotl would ignore them. "
            f"Put the DEFT settings under `deft:` (keys: {', '.join(DeftBlock.model_fields)})"
        )
