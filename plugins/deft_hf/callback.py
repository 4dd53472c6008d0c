"""`DeftCallback`: DEFT for existing transformers code, by adding one callback.

    trainer = Trainer(..., callbacks=[DeftCallback(DeftConfig(coef=1.0))])     # Trainer or Seq2SeqTrainer

A callback gets no access to the loss, so this one puts deft_common's `DensityLossHook` on the top-level model
(`trainer.model`): it records each training forward (and each evaluation forward with labels) and adds
coef × density loss × k to `outputs.loss`, the loss `Trainer.compute_loss` returns. coef follows
trainer.state.global_step (warm-up, or the target-density controller with DeftConfig.target_density); k undoes the
gradient-accumulation and multi-process scaling the Trainer applies afterwards (trainer_support.py). It also puts the
DEFT metrics into the logs (metrics.py) and moves itself first among the callbacks, so that state.log_history,
TensorBoard and W&B all get them.

ADA-DEFT (DeftConfig(adaptive=True)): the hook attaches the per-layer weights to the model at on_init_end, before
the Trainer builds its optimizer in `train()`; the callback makes `trainer.save_model` (which also writes every
checkpoint) write them beside the saved model as deft_adaptive.json, and logs deft/adaptive_weight/<layer>.
Inference thresholds (DeftConfig(inference_sparsity=0.9), or at sparsity_setpoint): a user's
`trainer.save_model(DIR)` also calibrates them on the first `calibration_batches` training batches and writes
DIR/deft_thresholds.json, logging deft/inference_sparsity and deft/calibrated_density (as DeftTrainerMixin does).

Checkpoints also keep the controller's state and the ADA-DEFT weights (in trainer_state.json), so that
`train(resume_from_checkpoint=...)` continues them (trainer_support.TrainerResumeState).

It only works where the Trainer optimises the model's own `outputs.loss`. It refuses, with DeftCallbackError, label
smoothing, `compute_loss_func`, TRL >= 1.15 `SFTTrainer` (it computes the loss itself), and, at the end of every
optimizer step, any trainer whose backward never reached the added term. Those need `DeftTrainerMixin`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from importlib.metadata import version

import torch
import transformers
from packaging.version import Version
from transformers import TrainerCallback

from deft_common import DeftConfig, DeftConfigError, DeftError, DensityLossHook, DensityTracker

from .metrics import DeftMetrics
from .mixin import DeftTrainerMixin
from .trainer_support import (TrainerResumeState, check_layer_weights_in_optimizer, density_term_scale,
                              disable_ignored_loss_kwargs, ensure_non_reentrant_checkpointing,
                              keep_layer_weights_out_of_ddp, save_layer_weights_with_model,
                              save_thresholds_with_model)


class DeftCallbackError(DeftError, RuntimeError):
    """DeftCallback cannot add the density loss in this setup; the message says why and how to use the mixin."""


USE_THE_MIXIN = (
    "Use the DEFT trainer mixin instead of DeftCallback: `class MyTrainer(DeftTrainerMixin, Trainer)` "
    "(`from deft_hf import DeftTrainerMixin`; for TRL `class MyTrainer(DeftSFTMixin, SFTTrainer)` from deft_trl), "
    "then `MyTrainer(..., deft_config=DeftConfig(...))`."
)


class DeftCallback(TrainerCallback):
    """`Trainer(..., callbacks=[DeftCallback(DeftConfig(...))])`.

    Attributes: config (the DeftConfig), hook (the DensityLossHook on trainer.model, kept for evaluations after
    training; `hook.coef_schedule` gives the density weight and its controller), tracker (its DensityTracker), trainer
    (the Trainer it serves), metrics (DeftMetrics). `remove()` takes every hook off.
    Like DeftTrainerMixin it sets `trainer.model_accepts_loss_kwargs = False` for models that return a per-batch
    mean loss although they take **kwargs (T5, sequence classification), see trainer_support.py.
    """

    def __init__(self, config: DeftConfig | None = None):
        self.config = DeftConfig() if config is None else config
        if not isinstance(self.config, DeftConfig):
            raise DeftConfigError(
                f"DeftCallback needs a deft_common.DeftConfig, got {type(config).__module__}.{type(config).__name__}"
            )
        self.hook: _TrainerLossHook | None = None
        self.trainer: transformers.Trainer | None = None
        self.metrics = DeftMetrics()
        self._resume: TrainerResumeState | None = None
        self._terms_in_flight = 0  # density terms of this optimizer step that backward has not reached yet

    @property
    def tracker(self) -> DensityTracker | None:
        return None if self.hook is None else self.hook.tracker

    # ------------------------------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._bind(model)
        keep_layer_weights_out_of_ddp(self.trainer)  # ADA-DEFT under DDP; train() wraps the model later

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._bind(model)  # again: model_init may have built a new model, or the callback came via add_callback
        _refuse_loss_outside_model(self.trainer)
        disable_ignored_loss_kwargs(self.trainer)
        ensure_non_reentrant_checkpointing(model)
        check_layer_weights_in_optimizer(self.trainer)  # the Trainer built its optimizer just before this event
        self.hook.engine.check_ramp(state.max_steps)
        self._terms_in_flight = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._resume.restore_if_resumed()  # the Trainer loads a checkpoint's state after on_train_begin

    def on_step_end(self, args, state, control, **kwargs):
        missed, self._terms_in_flight = self._terms_in_flight, 0
        if missed > 0:
            raise DeftCallbackError(
                f"the density loss of {missed} forward pass(es) of step {state.global_step} never reached backward: "
                f"{type(self.trainer).__name__} does not optimise the model's outputs.loss, to which DeftCallback "
                f"adds the density term, so DEFT would do nothing. {USE_THE_MIXIN}"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.metrics.for_log(logs)
        if metrics:
            logs.update(metrics)  # for the callbacks after this one (TensorBoard, W&B, console)
            if state.log_history:
                state.log_history[-1].update(metrics)  # Trainer.log appended its copy of `logs` before on_log

    def on_evaluate(self, args, state, control, **kwargs):
        self.metrics.clear("eval")

    def on_predict(self, args, state, control, **kwargs):
        self.metrics.clear("eval")  # predict() does not log: drop its forwards

    def remove(self) -> None:
        """Remove every hook DEFT put on the model."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    # ------------------------------------------------------------------------------------------ setup
    def _bind(self, model) -> None:
        trainer = _calling_trainer() or self.trainer  # the one found at init, for events sent from outside it
        if trainer is None:
            raise DeftCallbackError(
                "DeftCallback works inside a transformers Trainer: Trainer(..., callbacks=[DeftCallback(...)])"
            )
        if isinstance(trainer, DeftTrainerMixin):
            raise DeftCallbackError(
                f"{type(trainer).__name__} already applies DEFT through DeftTrainerMixin; remove the DeftCallback"
            )
        self.trainer = trainer
        if self.hook is None or self.hook.model is not model:
            self.remove()
            self.hook = _TrainerLossHook(self, model)
            self.metrics = DeftMetrics(self.hook.engine)
        # First in line, so that on_log adds the metrics before the reporting callbacks see `logs`. Moving the
        # current callback to the front during the event's loop shifts only callbacks that already ran.
        callbacks = trainer.callback_handler.callbacks
        if callbacks[0] is not self:
            callbacks.remove(self)
            callbacks.insert(0, self)
        if self._resume is None or self._resume.trainer is not trainer:
            self._resume = TrainerResumeState(trainer, lambda: self.hook.coef_schedule)
        saves_files = self.config.adaptive or self.config.thresholds_sparsity is not None
        if saves_files and not hasattr(trainer.save_model, "deft_saves_files"):
            trainer.save_model = _saving_deft_files(trainer, self)

    def _reached_backward(self, grad):
        self._terms_in_flight -= 1


class _TrainerLossHook(DensityLossHook):
    """deft_common.DensityLossHook on trainer.model, driven by the Trainer: the weight follows
    trainer.state.global_step, the term is scaled for the Trainer's gradient-accumulation and multi-process
    handling, and evaluation forwards with labels are measured (the callback's DeftMetrics reads the windows)."""

    def __init__(self, callback: DeftCallback, model):
        self.callback = callback
        super().__init__(model, callback.config, term_scale=self._trainer_scale, measure_eval=True)

    def _trainer_scale(self, kwargs: dict) -> float:
        return density_term_scale(self.callback.trainer, kwargs.get("num_items_in_batch"), inside_model_loss=True)

    def _start(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled() and kwargs.get("fused_lm_head"):
            raise DeftCallbackError(
                "TRL's SFTTrainer (>= 1.15) computes the loss itself from a fused LM head and ignores the "
                f"model's outputs.loss, to which DeftCallback adds the density term. {USE_THE_MIXIN}"
            )
        self.global_step = self.callback.trainer.state.global_step
        super()._start(module, args, kwargs)

    def _adding(self, added):
        if added.requires_grad:  # on_step_end checks that backward reached it
            self.callback._terms_in_flight += 1
            added.register_hook(self.callback._reached_backward)

    def _no_loss_error(self, module, outputs):
        return DeftCallbackError(
            f"{type(module).__name__} returned no loss in a training step ({type(outputs).__name__}): the Trainer "
            "computes the loss outside the model (labels removed for compute_loss_func or label smoothing, or a "
            f"custom compute_loss), so DeftCallback cannot add the density term to it. {USE_THE_MIXIN}"
        )


def _saving_deft_files(trainer, callback: DeftCallback):
    """`trainer.save_model` that also writes DEFT's files into the same folder: the ADA-DEFT weights (also in every
    checkpoint) and, for a user's save, the inference thresholds (calibrated with the hook paused, so those forwards
    are not measured as an evaluation). No callback event follows `save_model` (a user's final save), so the bound
    method is wrapped on this trainer instance; the Trainer's own checkpoints call `self.save_model` too."""
    save_model = trainer.save_model

    @functools.wraps(save_model)
    def save_model_and_deft_files(output_dir=None, _internal_call=False):
        save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else trainer.args.output_dir
        save_layer_weights_with_model(trainer, output_dir)
        if not _internal_call:
            with callback.hook.paused() if callback.hook is not None else contextlib.nullcontext():
                save_thresholds_with_model(trainer, output_dir, callback.config)

    save_model_and_deft_files.deft_saves_files = True
    return save_model_and_deft_files


def _calling_trainer() -> transformers.Trainer | None:
    """The Trainer whose callback event is running. Callbacks are not handed the trainer, and DEFT needs it: to read
    the gradient-accumulation state, refuse setups it cannot serve, and order itself before the reporting callbacks."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer):
            return candidate
        frame = frame.f_back
    return None


def _refuse_loss_outside_model(trainer) -> None:
    """Setups in which the Trainer's loss is not the model's outputs.loss, found before training starts."""
    if trainer.label_smoother is not None:
        raise DeftCallbackError(
            f"label smoothing (label_smoothing_factor={trainer.args.label_smoothing_factor}) makes the Trainer compute "
            "the loss from the logits, not the model's outputs.loss, to which DeftCallback adds the density term. "
            + USE_THE_MIXIN
        )
    if trainer.compute_loss_func is not None:
        raise DeftCallbackError(
            "the Trainer has a compute_loss_func: it computes the loss from the logits, not the model's outputs.loss, "
            f"to which DeftCallback adds the density term. {USE_THE_MIXIN}"
        )
    if _is_trl_sft_with_own_loss(trainer):
        raise DeftCallbackError(
            f"TRL {version('trl')} SFTTrainer computes the loss itself (TRL >= 1.15 uses a fused LM head) and ignores "
            f"the model's outputs.loss, to which DeftCallback adds the density term. {USE_THE_MIXIN}"
        )


def _is_trl_sft_with_own_loss(trainer) -> bool:
    if "trl" not in sys.modules:
        return False
    is_sft = any(cls.__name__ == "SFTTrainer" and cls.__module__.startswith("trl.") for cls in type(trainer).__mro__)
    return is_sft and Version(version("trl")) >= Version("1.15.0")
