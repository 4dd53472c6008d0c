"""How a transformers `Trainer` scales the loss, mirrored once for every DEFT adapter.

After `compute_loss` returns, `Trainer.training_step` divides the loss by the number of gradient-accumulation
micro-batches unless it counts as "already scaled for GA" (normalised by `num_items_in_batch`, the token count of
the whole optimizer step). DEFT's density term is a per-micro-batch mean, so it must be divided by GA exactly when
the Trainer will not do it. Then DDP/FSDP/DeepSpeed average the gradients over processes, which is right for a
per-process mean (and for ADA-DEFT's weighted form, see deft_common.adaptive_weights). The rules below follow
transformers 5.16 (no `loss_is_scaled_for_ga`) and 5.19+ (with it).

Several processes, for ADA-DEFT: its layer weights are read whole through deft_common.distributed.gathered (DeepSpeed
ZeRO-3, FSDP1, FSDP2) when saved and checkpointed, and kept out of plain DDP, which would mark them unused
(keep_layer_weights_out_of_ddp).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import torch
import transformers
from torch import nn

from deft_common import (CoefSchedule, DeftConfigError, SparsityThresholds, base_model_of, layer_weights,
                         make_checkpointing_non_reentrant, save_inference_thresholds)
from deft_common.adaptive_weights import save_gathered_layer_weights
from deft_common.distributed import gathered, keep_out_of_ddp

logger = logging.getLogger("deft_hf")

# transformers >= 5.19 lets a Trainer subclass declare how its loss is scaled; older versions ignore the attribute.
_TRAINER_HAS_SCALING_ATTRIBUTE = hasattr(transformers.Trainer, "loss_is_scaled_for_ga")


def loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Whether `trainer.training_step` will leave the loss of this micro-batch undivided by GA (same rule as it)."""
    if _TRAINER_HAS_SCALING_ATTRIBUTE and trainer.loss_is_scaled_for_ga is not None:
        return bool(trainer.loss_is_scaled_for_ga)
    return bool(
        (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or trainer.compute_loss_func is not None
    )


def process_loss_multiplier(trainer, num_items_in_batch) -> int:
    """The factor `Trainer.compute_loss` multiplies the model's loss by (the number of data-parallel processes,
    when the loss was divided by the token count of all processes), same condition as there."""
    args = trainer.args
    if not (
        args.average_tokens_across_devices
        and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func)
        and num_items_in_batch is not None
    ):
        return 1
    if args.n_gpu > 1:
        return args.n_gpu
    return trainer.accelerator.num_processes // trainer.get_tp_size()


def density_term_scale(trainer, num_items_in_batch, inside_model_loss: bool) -> float:
    """The factor for `coef * density_loss` of one micro-batch such that the optimizer step gets
    coef × (mean over its micro-batches of the density loss), averaged over processes, whatever the Trainer does next.

    inside_model_loss=False: the term is added to the loss `compute_loss` returns (mixin).
    inside_model_loss=True: the term is added to the model's `outputs.loss` (callback), which `compute_loss` may still
    multiply by the number of processes.
    """
    scale = 1.0
    if loss_is_scaled_for_ga(trainer, num_items_in_batch):
        scale /= trainer.current_gradient_accumulation_steps
    if inside_model_loss:
        scale /= process_loss_multiplier(trainer, num_items_in_batch)
    return scale


def disable_ignored_loss_kwargs(trainer) -> bool:
    """Make the Trainer treat a per-micro-batch-mean task loss as such.

    Trainer assumes that a model whose forward takes `**kwargs` normalises its loss by `num_items_in_batch` and then
    divides nothing by GA. T5, BART and the sequence-classification heads take `**kwargs` but return a plain mean
    (transformers' docs ask to set `model_accepts_loss_kwargs = False` then). Without the fix their task loss would
    be weighted GA × processes times more than the density term. Returns whether it changed the trainer."""
    if not trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None:
        return False
    if _TRAINER_HAS_SCALING_ATTRIBUTE and trainer.loss_is_scaled_for_ga is not None:
        return False  # the trainer computes its own loss and says how it is scaled
    model = base_model_of(trainer.model)  # under PEFT / DDP wrappers
    if hasattr(model, "accepts_loss_kwargs") or _forward_uses_num_items(type(model)):
        return False  # the model declares it explicitly, or it does consume num_items_in_batch
    trainer.model_accepts_loss_kwargs = False
    logger.info(
        "DEFT: %s returns a per-batch mean loss (it ignores num_items_in_batch); set model_accepts_loss_kwargs=False "
        "so that the Trainer divides it by gradient accumulation like the density term",
        type(model).__name__,
    )
    return True


def _forward_uses_num_items(model_class: type) -> bool:
    """Whether the model's forward passes `num_items_in_batch` on: it names it, or hands `**kwargs` to its
    `self.loss_function(...)` (transformers' token-normalised losses). Unreadable source: trust the Trainer."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return True
    if "num_items_in_batch" in source:
        return True
    marker = "self.loss_function("
    start = source.find(marker)
    while start != -1:
        args = _call_arguments(source, start + len(marker))
        if "**" in args:
            return True
        start = source.find(marker, start + 1)
    return False


def _call_arguments(source: str, start: int) -> str:
    """The text between the parentheses of a call whose arguments begin at `source[start]`."""
    depth = 1
    for i in range(start, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[start:i]
    return source[start:]


def ensure_non_reentrant_checkpointing(model: nn.Module) -> None:
    """Reentrant gradient checkpointing hides the activations from autograd (the density term would train nothing):
    switch it to non-reentrant, which computes the same gradients."""
    changed = make_checkpointing_non_reentrant(model)
    if changed:
        logger.warning(
            "DEFT switched gradient checkpointing of %d layer(s) to non-reentrant (use_reentrant=False): with "
            "reentrant checkpointing the density loss gets no gradient. Set gradient_checkpointing_kwargs="
            "{'use_reentrant': False} to silence this.",
            changed,
        )


# ------------------------------------------------------------------------------------------------ ADA-DEFT
def check_layer_weights_in_optimizer(trainer) -> None:
    """ADA-DEFT's layer weights must be in the optimizer, or they never train and choose nothing. The Trainer builds
    its optimizer in `train()` from the trainable `model.parameters()`, after DEFT attached them (at init); this
    catches an optimizer made earlier (`optimizers=(opt, sched)`) or a model swapped in later (`model_init`).
    DeepSpeed and FSDP build theirs from the model's parameters in their own form, so they are not checked here."""
    weights = layer_weights(trainer.model)
    optimizer = trainer.optimizer
    if weights is None or optimizer is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return
    if not weights.logits.requires_grad:
        raise DeftConfigError(
            "the ADA-DEFT layer weights are frozen (requires_grad=False), so they would never train; "
            "call deft_common.layer_weights(model).requires_grad_(True) before training"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if id(weights.logits) not in held:
        raise DeftConfigError(
            "the optimizer does not hold the ADA-DEFT layer weights, so they would never train: it was built before "
            "DEFT attached them. Let the Trainer build the optimizer (no `optimizers=`), or call "
            "deft_common.attach_layer_weights(model, DeftConfig(adaptive=True, ...)) before building it yourself"
        )


def keep_layer_weights_out_of_ddp(trainer) -> bool:
    """ADA-DEFT under plain DDP (several processes, neither FSDP nor DeepSpeed): the layer weights are used after
    the forward, so DDP, which the Trainer builds with find_unused_parameters=True for a PEFT model, would mark them
    unused and fail when their gradient arrives. Keep them out of DDP, their gradient averaged by a hook
    (deft_common.distributed.keep_out_of_ddp). Call it before `train()` wraps the model. Returns whether it did."""
    weights = layer_weights(trainer.model)
    if weights is None or trainer.args.world_size <= 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return False
    if trainer.model is not trainer.model_wrapped:
        return False  # already wrapped (DDP built): too late to change what it reduces
    return keep_out_of_ddp(trainer.model, weights.logits)


def save_layer_weights_with_model(trainer, output_dir) -> None:
    """ADA-DEFT: write the layer weights beside what `trainer.save_model(output_dir)` saved (a PEFT adapter keeps
    adapter weights only). Every process calls it: under DeepSpeed ZeRO-3, FSDP1 and FSDP2 the weights are
    gathered first (trainer.model is the FSDP-wrapped model there)."""
    if layer_weights(trainer.model) is not None:
        save_gathered_layer_weights(trainer.model, output_dir, write=trainer.args.should_save)


def save_thresholds_with_model(trainer, output_dir, config) -> SparsityThresholds | None:
    """DeftConfig.thresholds_sparsity (inference_sparsity, else sparsity_setpoint): calibrate the inference
    thresholds on the first `calibration_batches` training batches, write deft_thresholds.json beside what
    `trainer.save_model(output_dir)` saved (process 0 writes), then log deft/inference_sparsity and
    deft/calibrated_density. Every process calls it. Once per folder and step: Axolotl saves the final model both
    through the plugin and, under ZeRO-3 or FSDP, through save_model."""
    if config.thresholds_sparsity is None:
        return None
    saved = (str(output_dir), trainer.state.global_step)
    if getattr(trainer, "_deft_thresholds_saved", None) == saved:
        return None
    batches = (trainer._prepare_inputs(batch) for batch in trainer.get_train_dataloader())
    thresholds = save_inference_thresholds(trainer.model, batches, config, output_dir, write=trainer.args.should_save)
    trainer._deft_thresholds_saved = saved
    trainer.log(thresholds.log())
    return thresholds


RESUME_STATE_KEY = "DeftTrainingState"  # in TrainerState.stateful_callbacks, i.e. in each checkpoint's trainer_state.json


class TrainerResumeState:
    """What a run resumed with `trainer.train(resume_from_checkpoint=...)` needs to continue DEFT where the
    checkpoint left it: the target-density controller (CoefSchedule.state_dict) and the ADA-DEFT layer weights
    (a PEFT checkpoint holds adapter weights only, so they would restart uniform). Without it a resumed run would
    restart the controller's weight at 0 and the layer weights at uniform, with no error.

    It rides in the Trainer's own checkpoint file trainer_state.json, under stateful_callbacks["DeftTrainingState"]:
    `trainer._save_checkpoint` (every process calls it) is wrapped to store it first, and `restore_if_resumed()`,
    called at each training step, reads it back once the Trainer has loaded a checkpoint's state."""

    def __init__(self, trainer, weight: Callable[[], CoefSchedule]):
        self.trainer = trainer
        self._weight = weight  # a getter: the callback rebuilds its hook when the Trainer swaps models
        save_checkpoint = trainer._save_checkpoint

        @functools.wraps(save_checkpoint)
        def save_checkpoint_with_deft_state(*args, **kwargs):
            self.store()
            return save_checkpoint(*args, **kwargs)

        trainer._save_checkpoint = save_checkpoint_with_deft_state

    def store(self) -> None:
        state = self._weight().state_dict()
        weights = layer_weights(self.trainer.model)
        if weights is not None:
            with gathered(weights, "logits", self.trainer.model) as logits:  # every process calls store()
                state["adaptive_logits"] = logits.detach().float().cpu().tolist()
        if state:
            self.trainer.state.stateful_callbacks[RESUME_STATE_KEY] = state
        self.trainer.state.deft_state_checked = True  # not a dataclass field: never written to the JSON

    def restore_if_resumed(self) -> None:
        state = self.trainer.state  # train() makes a new TrainerState, loaded from the checkpoint when resuming
        if getattr(state, "deft_state_checked", False):
            return
        state.deft_state_checked = True
        saved = state.stateful_callbacks.get(RESUME_STATE_KEY)
        if saved is None:
            return
        saved = dict(saved)
        logits = saved.pop("adaptive_logits", None)
        self._weight().load_state_dict(saved)
        if logits is not None:
            weights = layer_weights(self.trainer.model)
            if weights is None or len(logits) != len(weights.names):
                raise DeftConfigError(
                    f"the checkpoint holds ADA-DEFT weights for {len(logits)} MLP blocks but the model has "
                    f"{'none' if weights is None else len(weights.names)}; resume with the DeftConfig (adaptive=True) "
                    "and model of the saved run"
                )
            with gathered(weights, "logits", self.trainer.model, modifier_rank=0) as full, torch.no_grad():
                full.copy_(torch.tensor(logits, dtype=full.dtype, device=full.device))

