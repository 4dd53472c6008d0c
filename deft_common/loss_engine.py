"""`DensityLossEngine`: the density term of each training forward, in one place for every adapter.

It owns the DensityTracker on the model, the sparsity set-point (DeftConfig.sparsity_setpoint: the training
forward keeps only each MLP block's largest activations, deft_common.sparsity.setpoint), the coefficient of each
optimizer step (CoefSchedule: fixed coef, warm-up, or the target-density controller), and the metrics windows
(DensitySums, one for training and one for evaluation forwards). A training forward is

    with engine.recording(batch, step):          # the tracker records the MLP activations, masked to real tokens
        outputs = model(**batch)
    loss = outputs.loss + engine.term(step)      # coef(step) × density loss; observed by the weight and the window

where `step` is the number of optimizer steps done before this forward. The raw loss hook (DensityLossHook), the
HF Trainer mixin and callback, the DeepSpeed hook and the `deft` command line all call it, and only add the term
to their loss (with the scale their framework needs). Metrics:

    engine.pop_metrics("train")   # {"deft/density", "deft/loss", "deft/density/<block>", deft/coef, ...}, all processes
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from .architectures import device_of
from .config import DeftConfig
from .coef_schedule import DensitySums, CoefSchedule
from .sparsity.setpoint import SparsitySetpoint
from .tracker import DensityTracker

MODES = ("train", "eval")


class DensityLossEngine:
    """One per training run. Attributes: tracker (the DensityTracker), config (its DeftConfig), coef_schedule (the
    CoefSchedule; `coef_schedule.controller` with target_density), device (where collectives run when this process
    recorded nothing)."""

    def __init__(self, model: nn.Module, config: DeftConfig | None = None, device: torch.device | str | None = None):
        config = DeftConfig() if config is None else config
        # The set-point and the tracker are stages of one capture (deft_common.capture): the tracker always
        # measures the activations the set-point left, whichever is built first.
        self.setpoint = SparsitySetpoint.from_config(model, config) if isinstance(config, DeftConfig) else None
        self.tracker = self._tracker(model, config)
        self.config = self.tracker.config
        self.device = torch.device(device) if device is not None else device_of(model)
        self.coef_schedule = CoefSchedule(self.config, len(self.tracker.sites), self.device)
        self.coef: float | None = None  # the weight of the last term
        self._windows: dict[str, DensitySums | None] = dict.fromkeys(MODES)

    # ------------------------------------------------------------------------------------------ forwards
    def track(self, model: nn.Module) -> DensityTracker:
        """The tracker on `model`: a new one when the caller swapped its model (the weight carries on)."""
        if self.tracker.model is not model:
            self.tracker.remove()
            if self.setpoint is not None:
                step = self.setpoint.current_step
                self.setpoint.remove()
                self.setpoint = SparsitySetpoint.from_config(model, self.config)
                self.setpoint.step(step)
            self.tracker = self._tracker(model, self.config)
            self._windows = dict.fromkeys(MODES)  # other blocks, other per-block keys
        return self.tracker

    def _tracker(self, model: nn.Module, config) -> DensityTracker:
        # Measuring only (coef 0, e.g. the set-point alone): the tracker counts and skips the density loss's work.
        measures_only = isinstance(config, DeftConfig) and config.measures_only and not config.adaptive
        return DensityTracker(model, config, density_loss=not measures_only, setpoint=self.setpoint)

    def recording(self, inputs, step: int | None = None) -> AbstractContextManager:
        """Record the forward of the model-input batch `inputs` (its attention and decoder masks). `step`: the
        optimizer steps done before this training forward, which sets the sparsity set-point's ramp."""
        if self.setpoint is not None and step is not None and step != self.setpoint.current_step:
            self.setpoint.step(step)
        return self.tracker.record(**self.tracker.masks_for(inputs))

    def check_ramp(self, total_steps: int) -> None:
        """Warn (SetpointWarning) when the set-point's ramp is longer than a run of `total_steps` optimizer steps."""
        if self.setpoint is not None:
            self.setpoint.check_ramp(total_steps)

    def term(self, step: int) -> torch.Tensor:
        """The density term of the training forward just recorded, coef × density loss, with coef the weight of
        optimizer step `step`; its density goes to the weight (the controller) and to the training window."""
        self.coef = self.coef_schedule.coef(step)
        term = self.coef * self.tracker.density_loss()
        self.coef_schedule.observe(self.tracker)
        self._window("train").add(self.tracker, term)
        return term

    def measured_eval(self) -> None:
        """Add the evaluation forward just recorded to the evaluation window (it only measures density)."""
        self._window("eval").add(self.tracker)

    def end_step(self) -> None:
        """The optimizer step is over: feed the controller its density now rather than at the next step's first
        forward (to log where it stands). A collective under torch.distributed (CoefSchedule.end_step)."""
        self.coef_schedule.end_step()

    # ------------------------------------------------------------------------------------------ metrics
    def pop_metrics(self, mode: str = "train", prefix: str = "", per_block: bool = True) -> dict[str, float]:
        """The window's metrics over every process, and an empty window:

            <prefix>deft/density           mean over MLP blocks of the fraction of active entries (|a| > threshold)
            <prefix>deft/loss              mean density term (coef × density loss) of the training forwards
            <prefix>deft/density/<block>   per MLP block (per_block=True)
            training only:
            deft/coef                      the weight of the last step, when it changes over training
                                           (coef_warmup_steps, or target_density: then also deft/target_density and
                                           deft/density_error, from the controller)
            deft/sparsity_setpoint         the set-point's sparsity in force, with sparsity_setpoint
            deft/adaptive_weight/<block>   with adaptive=True, the ADA-DEFT weight (mean 1) of the last forward

        This is the one list of DEFT's metric keys: the loss hook, the HF callback and mixin, the DeepSpeed hook and
        Axolotl log these.

        Empty when nothing was recorded since the last pop. A collective when torch.distributed is initialised and
        any process recorded in this mode: every process must call it."""
        sums = self._windows[mode]
        self.clear(mode)
        if sums is None:
            return {}
        totals = sums.pop(self.device)
        if totals.density is None:
            return {}
        out = {f"{prefix}deft/density": totals.density}
        if totals.term is not None:
            out[f"{prefix}deft/loss"] = totals.term
        if mode == "train":
            out.update(self.coef_schedule.log())
            if self.setpoint is not None:
                out["deft/sparsity_setpoint"] = self.setpoint.current_sparsity
            if self.tracker.adaptive is not None:
                out.update(self.tracker.adaptive.log())
        if per_block:
            names = [site.name for site in self.tracker.sites]
            out.update({f"{prefix}deft/density/{n}": d for n, d in zip(names, totals.layers) if d is not None})
        return out

    def clear(self, mode: str) -> None:
        """Forget the forwards of `mode` since the last pop (e.g. of an earlier predict())."""
        self._windows[mode] = None

    def remove(self) -> None:
        """Take the tracker's (and the set-point's) hooks off the model."""
        self.tracker.remove()
        if self.setpoint is not None:
            self.setpoint.remove()

    def _window(self, mode: str) -> DensitySums:
        if self._windows[mode] is None:
            self._windows[mode] = DensitySums(len(self.tracker.sites))
        return self._windows[mode]
