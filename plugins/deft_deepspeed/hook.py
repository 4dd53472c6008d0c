"""`DeftLossHook`: the DEFT density term inside the model's own loss, for raw DeepSpeed loops.

The hook folds `coef * density loss` into `outputs.loss` inside the module's forward (deft_common.DensityLossHook),
so the loss the engine returns already holds it; `engine.backward` then scales it for gradient accumulation
exactly like the task loss, under every ZeRO stage. This module adds what DeepSpeed needs on top:

- coef_warmup_steps and target_density follow `engine.global_steps` of the engine that calls the model (found on
  the call stack, so the loop needs no extra line): the target-density controller is fed the global mean density
  of each optimizer step at the first forward after `engine.step()` completed it. Without an engine, set
  `hook.global_step` yourself (coef_warmup_steps); target_density then raises, as it cannot see the steps;
- deepspeed < 0.19.8 scales the gradient of every output tensor by 1/GAS a second time on top of the loss
  (the task loss reaches the weights through `logits` and is divided by GAS twice, the density term once).
  That is wrong with or without DEFT, so with gradient_accumulation_steps > 1 and the default
  `engine.backward(loss)` the hook raises instead of training with a silently reweighted loss;
- ADA-DEFT (DeftConfig(adaptive=True)): the hook attaches the per-layer weights to the model, so built before
  `deepspeed.initialize` they are among `model.parameters()` that the engine's optimizer trains (also partitioned
  under ZeRO-3); `hook.save_layer_weights(DIR)` (or `save_layer_weights(model, DIR)`) writes them beside the saved
  adapter, gathering them under ZeRO-3;
- inference thresholds (DeftConfig(inference_sparsity=0.9)): `hook.save_thresholds(DIR, batches)` at the end of
  training calibrates them on the first `calibration_batches` training batches (every rank calls it; the counts are
  summed over processes, rank 0 writes DIR/deft_thresholds.json).
"""

from __future__ import annotations

import pathlib
import sys
import weakref

import torch
from torch import nn

from deft_common import DeftConfig, DeftConfigError, layer_weights
from deft_common.adaptive_weights import save_gathered_layer_weights
from deft_common.loss_hook import DensityLossHook
from deft_common import SparsityThresholds, save_inference_thresholds

# deepspeed 0.19.8 (PR #8245) divides the whole loss by GAS once and keeps the output hooks from scaling again.
FIXED_GAS_SCALING = (0, 19, 8)
_ENGINE_SEARCH_DEPTH = 12  # frames between the engine's forward and this hook: Module.__call__ internals


class DeftLossHook(DensityLossHook):
    """`DeftLossHook(model, DeftConfig(...))` on the module before `deepspeed.initialize` makes its `outputs.loss`
    include `coef * density loss` in every training forward:

        hook = DeftLossHook(model, DeftConfig(coef=1.0))
        engine, *_ = deepspeed.initialize(model=model, optimizer=..., config=ds_config)
        out = engine(**batch)             # batch with labels: out.loss = task loss + coef * density loss
        engine.backward(out.loss)
        engine.step()
        hook.last_metrics()               # {"deft/density": ..., "deft/loss": ...}; every rank must call it
                                          # (+ deft/coef and the controller's keys with target_density)

    hook.tracker is the DensityTracker, hook.density() the last forward's {MLP block: density},
    hook.save_layer_weights(DIR) the ADA-DEFT weights (adaptive=True), hook.save_thresholds(DIR, batches) the
    inference thresholds (inference_sparsity), hook.remove() takes every hook off.
    Under the HF Trainer use deft_hf instead: the Trainer rescales the loss (num_items_in_batch) in ways only its own
    integration accounts for.
    """

    def __init__(self, model: nn.Module, config: DeftConfig | None = None):
        super().__init__(model, config)
        self._engine_ref = None  # weak reference to the DeepSpeedEngine of the last training forward

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if "num_items_in_batch" in kwargs:
            raise DeftConfigError(
                "deft_deepspeed.DeftLossHook is called by the HF Trainer (it passes num_items_in_batch and rescales "
                "the loss afterwards, which would misweight the density term); with the Trainer, also under "
                "DeepSpeed, use deft_hf.DeftTrainerMixin or deft_hf.DeftCallback instead"
            )
        engine = _calling_engine()
        self._engine_ref = None if engine is None else weakref.ref(engine)
        if engine is not None:
            self.global_step = engine.global_steps
        elif self.coef_schedule.controller is not None:
            raise DeftConfigError(
                f"DeftLossHook with target_density={self.config.target_density} follows the optimizer steps of the "
                "DeepSpeed engine (engine.global_steps), but this training forward was not called by an engine; "
                "call the model through the engine (`engine(**batch)`), or outside DeepSpeed use "
                "deft_common.DensityLossHook and advance `hook.global_step` after each optimizer step"
            )
        super()._start(module, args, kwargs)

    def save_layer_weights(self, directory) -> pathlib.Path | None:
        """ADA-DEFT: write the model's layer weights to DIRECTORY/deft_adaptive.json (see save_layer_weights)."""
        return save_layer_weights(self.model, directory)

    def save_thresholds(self, directory, batches) -> SparsityThresholds:
        """DeftConfig.thresholds_sparsity (inference_sparsity, else sparsity_setpoint): calibrate the inference
        thresholds on the first `calibration_batches` of `batches` (model-input dicts, e.g. the training loader) and
        write DIRECTORY/deft_thresholds.json (rank 0 writes; every rank must call it, the counts are summed over
        processes). Returns the thresholds;
        `thresholds.log()` gives deft/inference_sparsity and deft/calibrated_density for the run's logger."""
        with self.paused():
            return save_inference_thresholds(self.model, batches, self.config, directory)

    def _adding(self, added: torch.Tensor) -> None:
        engine = self._engine_ref() if self._engine_ref is not None else None
        if engine is not None and added.requires_grad and _scales_outputs_twice(engine):
            added.register_hook(_refuse_double_scaling(engine))


def save_layer_weights(model: nn.Module, directory, write: bool | None = None) -> pathlib.Path | None:
    """deft_common.save_layer_weights for a model a DeepSpeed engine trains: under ZeRO-3 the weights are partitioned,
    so they are gathered first, a collective that every rank must call. `write`: whether this process writes the
    file (default: rank 0 only when torch.distributed is initialised). Returns the path written, or None."""
    if layer_weights(model) is None:
        raise DeftConfigError(
            "save_layer_weights: the model has no ADA-DEFT weights; build "
            "DeftLossHook(model, DeftConfig(adaptive=True)) before deepspeed.initialize"
        )
    return save_gathered_layer_weights(model, directory, write=write)


def _calling_engine():
    """The DeepSpeedEngine whose forward is calling the model, if any: a few frames up the stack
    (engine.forward -> Module.__call__ -> hooks). The module holds no reference to its engine."""
    engine_class = _engine_class()
    if engine_class is None:
        return None
    frame = sys._getframe(2)
    for _ in range(_ENGINE_SEARCH_DEPTH):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, engine_class):
            return candidate
        frame = frame.f_back
    return None


def _engine_class():
    if "deepspeed" not in sys.modules:
        return None  # never import deepspeed for a model that no engine drives
    from deepspeed import DeepSpeedEngine

    return DeepSpeedEngine


def _deepspeed_version() -> tuple[int, ...]:
    import deepspeed

    return tuple(int(part) for part in deepspeed.__version__.split("+")[0].split(".")[:3] if part.isdigit())


def _scales_outputs_twice(engine) -> bool:
    # Output-tensor GAS hooks arrived with the PyTorch-style backward API; 0.19.8 stopped them double-scaling.
    return hasattr(engine, "_backward_prologue_per_tensor") and _deepspeed_version() < FIXED_GAS_SCALING


def _refuse_double_scaling(engine):
    def check(grad):
        gas = engine.gradient_accumulation_steps()
        if gas > 1 and getattr(engine, "_scale_wrt_gas", True):
            import deepspeed

            raise DeftConfigError(
                f"deepspeed {deepspeed.__version__} with gradient_accumulation_steps={gas} divides the gradient of "
                "every model output by GAS on top of the loss: the task loss would be scaled by 1/GAS^2 and the DEFT "
                "term by 1/GAS. Upgrade to deepspeed>=0.19.8, or scale the loss yourself: "
                "engine.backward(out.loss / engine.gradient_accumulation_steps(), scale_wrt_gas=False)"
            )
        return None

    return check
