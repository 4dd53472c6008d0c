"""`DensityLossHook`: fold the density term into the model's own `outputs.loss`.

Two hooks on the top-level module (the plain or PEFT-wrapped model, not a DDP/DeepSpeed wrapper):
a forward pre-hook that starts `tracker.record()` with the batch's masks whenever the module trains with grad
enabled, and a forward hook that stops recording and returns the outputs with

    loss = task loss + term_scale * coef * density loss

where coef is `config.coef_at(global_step)`, or with `DeftConfig.target_density` the weight of the target-density
controller, fed once per optimizer step with the step's mean density (deft_common.coef_schedule).

Whatever calls the model and optimises `outputs.loss` (a raw loop, a DeepSpeed engine, DDP, the HF Trainer)
then optimises the DEFT loss without knowing about it; wrappers call `module(...)`, so the hooks fire inside them.

    hook = DensityLossHook(model, DeftConfig(coef=1.0))
    out = model(**batch)              # out.loss already holds the density term
    out.loss.backward()
    hook.global_step += 1             # after each optimizer step; needed for coef_warmup_steps and target_density
    hook.last_metrics()               # {"deft/density": ..., "deft/loss": coef × density loss}, all processes
    hook.remove()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .capture import forward_arguments
from .config import DeftConfig
from .coef_schedule import CoefSchedule
from .errors import DeftLossError
from .loss_engine import DensityLossEngine
from .tracker import DensityTracker

NO_LOSS_FIX = (
    "pass `labels` in the batch so the model computes its loss, or add the term yourself: remove this hook, "
    "wrap the forward in `with tracker.record(**tracker.masks_for(batch)):` and add "
    "`config.coef * tracker.density_loss()` to your loss"
)


class DensityLossHook:
    """Adds `coef * density loss` to `outputs.loss` of every training forward of `model`.

    global_step:  optimizer steps done; the caller advances it after each optimizer step when it uses
                  DeftConfig.coef_warmup_steps or DeftConfig.target_density (the controller is fed the density of
                  a step when global_step moves past it; a loop that never advances it never changes the weight).
    coef_schedule: the CoefSchedule that gives coef (config.coef_at(global_step), or the target-density
                  controller's weight, `coef_schedule.controller`).
    term_scale:   optional `f(forward kwargs) -> float`, a factor on the term that undoes how the caller scales the
                  loss afterwards (e.g. the HF Trainer's num_items_in_batch normalisation); default 1.
    measure_eval: also record evaluation forwards (module in eval mode, `labels` given), which only measure
                  density (the engine's "eval" window).
    engine:       the DensityLossEngine that computes the term and keeps the metrics windows.

    Framework adapters subclass it and override the small steps of a forward: `_adding` (the term about to be
    added), `_no_loss_error`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DeftConfig | None = None,
        term_scale: Callable[[dict], float] | None = None,
        measure_eval: bool = False,
    ):
        self.model = model
        self.engine = DensityLossEngine(model, config)
        self.config = self.engine.config
        self.term_scale = term_scale
        self.measure_eval = measure_eval
        self.global_step = 0
        self._record = None  # the open tracker.record() of the running forward
        self._mode = None  # "train" or "eval" for that forward
        self._paused = False
        self._handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            # always_call: the recording is closed even when the forward raises.
            model.register_forward_hook(self._finish, with_kwargs=True, always_call=True),
        ]

    # ------------------------------------------------------------------ hooks
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._record is not None or self._paused:
            return
        training = module.training and torch.is_grad_enabled()
        if not training and (module.training or not self.measure_eval):
            return  # generate(), no_grad in train mode, eval without measure_eval: the loss stays untouched
        inputs = forward_arguments(module, args, kwargs)
        if not training and inputs.get("labels") is None:
            return  # an evaluation forward without labels (generate()): nothing to measure
        record = self.engine.recording(inputs, self.global_step if training else None)
        record.__enter__()
        self._record, self._mode = record, "train" if training else "eval"

    def _finish(self, module: nn.Module, args: tuple, kwargs: dict, outputs):
        if self._record is None:
            return None
        record, mode = self._record, self._mode
        self._record = self._mode = None
        record.__exit__(None, None, None)
        if outputs is None:
            return None  # the forward raised; its own error propagates
        if mode == "eval":
            self.engine.measured_eval()
            return None
        term = self.engine.term(self.global_step)
        scale = 1.0 if self.term_scale is None else float(self.term_scale(kwargs))
        if self.coef_schedule.measures_only or scale == 0:
            return None  # measuring only (coef=0): outputs as the model made them
        loss = _loss_of(outputs)
        if loss is None:
            raise self._no_loss_error(module, outputs)
        added = scale * term
        self._adding(added)
        return _with_loss(outputs, (loss + added).to(loss.dtype))

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside neither record nor change the loss (e.g. the calibration passes of the thresholds)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @property
    def tracker(self) -> DensityTracker:
        return self.engine.tracker

    @property
    def coef_schedule(self) -> CoefSchedule:
        return self.engine.coef_schedule

    # ------------------------------------------------------ steps for subclasses
    def _adding(self, added: torch.Tensor) -> None:
        """`added` (the scaled term) is about to be added to outputs.loss."""

    def _no_loss_error(self, module: nn.Module, outputs) -> Exception:
        return DeftLossError(
            f"{type(module).__name__} returned no loss ({type(outputs).__name__}), so the DEFT density term "
            f"cannot be added to it; {NO_LOSS_FIX}"
        )

    # ---------------------------------------------------------------- metrics
    def last_metrics(self) -> dict[str, float]:
        """The metrics of the training forwards since the previous call (the micro-batches of the last optimizer step
        when called once per step), over every process: the keys of `DensityLossEngine.pop_metrics` without the
        per-block densities (deft/density, deft/loss, and deft/coef ... when the weight changes over training).
        Empty when nothing was recorded anywhere. A collective when torch.distributed is initialised: every process
        must call it."""
        return self.engine.pop_metrics("train", per_block=False)

    def density(self, threshold: float | None = None) -> dict[str, float]:
        """{MLP block name: density} of the last training forward on this process."""
        return self.tracker.density(threshold)

    # --------------------------------------------------------------- teardown
    def remove(self) -> None:
        """Remove both hooks and the tracker's: the model is exactly as before."""
        record, self._record = self._record, None
        if record is not None:
            record.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.engine.remove()


def _loss_of(outputs) -> torch.Tensor | None:
    """The loss of a ModelOutput / dict (key "loss"), a tuple whose first item is a scalar (return_dict=False),
    or a bare scalar tensor."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        loss = outputs[0] if outputs else None
    else:
        loss = outputs
    if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point():
        return loss
    return None


def _with_loss(outputs, loss: torch.Tensor):
    if isinstance(outputs, Mapping):
        outputs["loss"] = loss  # ModelOutput.__setitem__ updates the attribute too
        return outputs
    if isinstance(outputs, (tuple, list)):
        return type(outputs)([loss, *outputs[1:]]) if type(outputs) in (tuple, list) else (loss, *outputs[1:])
    return loss

