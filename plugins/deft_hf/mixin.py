"""`DeftTrainerMixin`: DEFT for any transformers `Trainer` (sub)class, by overriding `compute_loss`.

    from deft_common import DeftConfig
    from deft_hf import DeftTrainerMixin

    class MyTrainer(DeftTrainerMixin, Trainer):      # or Seq2SeqTrainer, AxolotlTrainer, TRL trainers (deft_trl)
        pass

    trainer = MyTrainer(model=model, args=args, train_dataset=ds, deft_config=DeftConfig(coef=1.0))

Each training micro-batch: loss = task loss + coef × density loss (scaled for gradient accumulation the way the
Trainer scales the task loss, see trainer_support.py). coef is DeftConfig.coef_at(state.global_step), or with
DeftConfig.target_density the target-density controller's weight, fed once per optimizer step with the global mean
density of that step (deft_common.CoefSchedule). Evaluation forwards only measure density. The logs get
deft/density, deft/loss, deft/density/<layer>, eval_deft/... and, when the weight changes over training,
deft/coef (see metrics.py).

ADA-DEFT (DeftConfig(adaptive=True)): the per-layer weights are attached to the model at construction, before the
Trainer builds its optimizer in `train()`, so they train with the model; `save_model` (also each checkpoint) writes
them beside the saved model as deft_adaptive.json (deft_common.load_layer_weights reads them back), and the logs
get deft/adaptive_weight/<layer>. Several processes: under DDP the weights are kept out of DDP's reduction and
averaged by a hook; under FSDP1/FSDP2 and DeepSpeed they are gathered to be saved (trainer_support.py).

Inference thresholds (DeftConfig(inference_sparsity=0.9), or at sparsity_setpoint): `save_model(DIR)` (a user's
call, not the checkpoints) calibrates them on the first `calibration_batches` training batches and writes
DIR/deft_thresholds.json (deft_common.SparsityThresholds.load reads it back), and logs deft/inference_sparsity and
deft/calibrated_density.

Sparsity set-point (DeftConfig(sparsity_setpoint=0.995, setpoint_ramp_steps=...)): each training forward keeps only
each MLP block's largest activations (deft_common.sparsity.setpoint), ramped by state.global_step, so a resumed run continues
the ramp (and its dense steps, setpoint_dense_every); the logs get deft/sparsity_setpoint.

Checkpoints also keep the controller's state and the ADA-DEFT weights (in trainer_state.json), so that
`train(resume_from_checkpoint=...)` continues them (trainer_support.TrainerResumeState).

Evaluation density is measured inside `compute_loss`, i.e. for evaluation batches with labels. Seq2SeqTrainer with
`predict_with_generate=True` computes its evaluation loss outside `compute_loss`, so there the mixin logs no
eval_deft/... keys (DeftCallback does).

Public attributes, for code that builds on the mixin:
    deft_config    the DeftConfig in use (constructor keyword `deft_config`, else the class attribute, else defaults)
    deft_engine    the DensityLossEngine computing each micro-batch's density term and keeping the metrics windows
    deft_tracker   its DensityTracker on `trainer.model`; its hooks stay for the trainer's lifetime (`.remove()`)
    deft_coef_schedule  its CoefSchedule giving each step's coef λ (`.controller` with target_density)
    deft_metrics   the DeftMetrics merging the windows into the logs
"""

from __future__ import annotations

import torch

from deft_common import CoefSchedule, DeftConfig, DeftConfigError, DensityTracker
from deft_common.loss_engine import DensityLossEngine

from .metrics import DeftMetrics
from .trainer_support import (TrainerResumeState, check_layer_weights_in_optimizer, density_term_scale,
                              disable_ignored_loss_kwargs, ensure_non_reentrant_checkpointing,
                              keep_layer_weights_out_of_ddp, save_layer_weights_with_model,
                              save_thresholds_with_model)


class DeftTrainerMixin:
    """Put it first: `class MyTrainer(DeftTrainerMixin, Trainer)`; pass `deft_config=DeftConfig(...)`."""

    # A class-level default, for trainers that other code constructs (e.g. a subclass made by the Axolotl plugin).
    deft_config: DeftConfig | None = None

    def __init__(self, *args, deft_config: DeftConfig | None = None, **kwargs):
        config = deft_config if deft_config is not None else type(self).deft_config
        config = DeftConfig() if config is None else config
        if not isinstance(config, DeftConfig):
            raise DeftConfigError(
                f"deft_config must be a deft_common.DeftConfig, got {type(config).__module__}.{type(config).__name__} "
                "(note: peft.DeftConfig is an unrelated PEFT method)"
            )
        super().__init__(*args, **kwargs)
        self.deft_config = config
        self.deft_engine = DensityLossEngine(self.model, config, self.args.device)  # after super(): TRL wraps the
        self.deft_metrics = DeftMetrics(self.deft_engine)                            # model in PEFT there
        self._deft_resume = TrainerResumeState(self, lambda: self.deft_coef_schedule)
        disable_ignored_loss_kwargs(self)
        keep_layer_weights_out_of_ddp(self)  # ADA-DEFT under DDP; train() wraps the model later
        self._deft_checked_optimizer = None  # the optimizer check_layer_weights_in_optimizer last passed

    @property
    def deft_tracker(self) -> DensityTracker:
        return self.deft_engine.tracker

    @property
    def deft_coef_schedule(self) -> CoefSchedule:
        return self.deft_engine.coef_schedule

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        engine = self.deft_engine
        engine.track(self.model)  # a new tracker when the Trainer swapped its model (model_init, FSDP wrapping)
        training = model.training and torch.is_grad_enabled()
        if training:
            self._deft_resume.restore_if_resumed()
            ensure_non_reentrant_checkpointing(self.model)
            if self.optimizer is not self._deft_checked_optimizer:  # once per train()
                check_layer_weights_in_optimizer(self)
                engine.check_ramp(self.state.max_steps)
                self._deft_checked_optimizer = self.optimizer
        # masks read before super(): Trainer pops the labels for label smoothing
        with engine.recording(inputs, self.state.global_step if training else None):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if not training:
            engine.measured_eval()
            return result
        loss, outputs = result if return_outputs else (result, None)
        scale = density_term_scale(self, num_items_in_batch, inside_model_loss=False)
        loss = loss + engine.term(self.state.global_step) * scale
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call=_internal_call)  # checkpoints come through here too
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_layer_weights_with_model(self, output_dir)
        if not _internal_call:  # the model a user saves; checkpoints are not calibrated
            save_thresholds_with_model(self, output_dir, self.deft_config)

    def evaluation_loop(self, *args, **kwargs):
        self.deft_metrics.clear("eval")  # a new evaluation: forget forwards of earlier predict() calls
        return super().evaluation_loop(*args, **kwargs)

    def log(self, logs, *args, **kwargs):
        # Merged before Trainer.log, which copies `logs` into state.log_history and hands it to TensorBoard / W&B.
        logs.update(self.deft_metrics.for_log(logs))
        return super().log(logs, *args, **kwargs)
