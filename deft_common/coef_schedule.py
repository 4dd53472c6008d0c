"""The coefficient λ of the density term, step by step, for every adapter: `CoefSchedule` (fixed, warm-up or
target-density controller; not ADA-DEFT's per-layer weights, which are deft_common.adaptive_weights), and
`DensitySums`, the density of a window of training forwards over every process.

    schedule = CoefSchedule(config, layers=len(tracker.sites))
    # in each training forward of optimizer step `step` (steps done before it, e.g. trainer.state.global_step):
    coef = schedule.coef(step)               # config.coef_at(step), or the target-density controller's weight
    loss = task_loss + coef * tracker.density_loss()
    schedule.observe(tracker)                # this forward's density, for the controller
    schedule.log()                           # {"deft/coef": ..., ...} when the coefficient changes over training

With `DeftConfig.target_density` the weight is `DensityController.coef`, and the controller is fed once per
optimizer step with the mean density of that step's training forwards, summed over every process. `coef(step)`
notices the step boundary by itself (the first forward of a new step), so a loop only has to pass the step it is
in; the controller's update is then a collective that every process reaches in the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DeftConfig, DeftConfigError
from .controller import DensityController
from .distributed import sum_over_processes
from .tracker import DensityTracker


@dataclass
class WindowTotals:
    """What `DensitySums.pop()` read: over the window's forwards and every process."""

    layers: list[float | None]  # per MLP block (tracker.sites order): fraction of active entries; None = not seen
    term: float | None  # mean density term of the forwards that added one; None = none did

    @property
    def density(self) -> float | None:
        """Mean over the blocks seen of their density; None when nothing was recorded anywhere."""
        seen = [d for d in self.layers if d is not None]
        return sum(seen) / len(seen) if seen else None


class DensitySums:
    """Active and real MLP entries per layer (and, optionally, density terms) summed over forwards, kept as
    tensors so that a forward costs no device sync and no collective; `pop()` reads and sums them over every
    process, once per window (a logging interval, an optimizer step)."""

    def __init__(self, layers: int):
        self.layers = layers
        self.clear()

    def clear(self) -> None:
        self.active: torch.Tensor | None = None  # float64 (layers,), on the activations' device
        self.entries = [0] * self.layers
        self.term = 0.0  # sum of the density terms added (a float64 tensor once one is added)
        self.terms = 0  # forwards that added a term
        self.forwards = 0

    def add(self, tracker: DensityTracker, term: torch.Tensor | None = None) -> None:
        """Add the last `tracker.record()` (and the density term computed from it)."""
        active, entries = _layer_counts(tracker)
        if active is not None:
            self.active = active if self.active is None else self.active + active
        self.entries = [a + b for a, b in zip(self.entries, entries)]
        if term is not None:
            self.term = self.term + term.detach().to(torch.float64)
            self.terms += 1
        self.forwards += 1

    def pop(self, device: torch.device | str) -> WindowTotals:
        """The window's totals over every process, and an empty window. A collective when torch.distributed is
        initialised: every process must call it."""
        n = self.layers
        vector = torch.zeros(2 * n + 2, dtype=torch.float64, device=self.active.device if self.active is not None
                             else device)
        if self.active is not None:
            vector[:n] = self.active
        vector[n : 2 * n] = torch.tensor(self.entries, dtype=torch.float64)
        vector[-2] = self.term
        vector[-1] = self.terms
        self.clear()
        values = sum_over_processes(vector).tolist()
        active, entries, term, terms = values[:n], values[n : 2 * n], values[-2], values[-1]
        return WindowTotals(layers=[a / e if e else None for a, e in zip(active, entries)],
                            term=term / terms if terms else None)


class CoefSchedule:
    """The density weight of each optimizer step: `config.coef_at(step)` (fixed coef, linear warm-up), or, when
    `config.target_density` is set, the weight of a `DensityController` (attribute `controller`) fed once per
    optimizer step with the global mean density of that step. One object per training run.

    coef(step):      the weight for a training forward of optimizer step `step`; at the first forward of a new
                     step it first feeds the controller the previous step's density (a collective then)
    observe(tracker): after each training forward, so that the controller sees its density
    log():           the weight to log: the controller's `log()` (deft/coef, deft/target_density,
                     deft/density_error of the step before), {"deft/coef"} during a warm-up, else {}
    """

    def __init__(self, config: DeftConfig, layers: int, device: torch.device | str = "cpu"):
        self.config = config
        self.controller = DensityController(config) if config.target_density is not None else None
        self.device = torch.device(device)  # for the collective when this process recorded nothing
        self._step_sums = DensitySums(layers)
        self._step: int | None = None
        self._coef: float | None = None

    @property
    def measures_only(self) -> bool:
        """coef=0 without a target: the density is measured, nothing is added to the loss."""
        return self.config.measures_only

    def coef(self, step: int) -> float:
        if self.controller is None:
            self._coef = self.config.coef_at(step)
            return self._coef
        if step != self._step:
            self.end_step()
            self._step = step
        self._coef = self.controller.coef
        return self._coef

    def observe(self, tracker: DensityTracker) -> None:
        if self.controller is not None:
            self._step_sums.add(tracker)

    def end_step(self) -> None:
        """Feed the controller the forwards observed since the last step boundary now, instead of at the next
        step's first forward (e.g. before saving a checkpoint). A collective under torch.distributed."""
        if self.controller is None or not self._step_sums.forwards:
            return
        density = self._step_sums.pop(self.device).density
        if density is not None:
            self.controller.update(density)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the weight where this one is: the controller's state ({} without a
        controller: the fixed/warm-up weight follows the step alone). Ends the step first (see end_step)."""
        if self.controller is None:
            return {}
        self.end_step()
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is None and "controller" not in state:
            return
        if self.controller is None or "controller" not in state:
            raise DeftConfigError(
                "CoefSchedule.load_state_dict: the saved state and this DeftConfig disagree on target_density "
                f"(saved: {'a controller state' if 'controller' in state else 'no controller'}, now: "
                f"target_density={self.config.target_density}); resume with the DeftConfig of the saved run"
            )
        self.controller.load_state_dict(state["controller"])
        self._step_sums.clear()
        self._step = None

    def log(self) -> dict[str, float]:
        if self.controller is not None:
            return self.controller.log()
        if self.config.coef_warmup_steps and self._coef is not None:
            return {"deft/coef": self._coef}
        return {}


def _layer_counts(tracker: DensityTracker) -> tuple[torch.Tensor | None, list[int]]:
    """Active entries (a float64 tensor, read without a device sync) and real entries of the last record per MLP
    block, in the order of tracker.sites (0 for a block not seen). Like tracker.layer_counts(), which would sync
    the device once per layer and forward to turn the counts into Python ints."""
    k = tracker._threshold_index(None)
    records = [tracker._records.get(site.name) for site in tracker.sites]
    records = [rec if rec is not None and rec.entries else None for rec in records]
    seen = [rec for rec in records if rec is not None]
    if not seen:
        return None, [0] * len(records)
    zero = torch.zeros((), dtype=torch.float64, device=seen[0].active.device)
    active = torch.stack([zero if rec is None else rec.active[k].to(torch.float64) for rec in records])
    return active, [0 if rec is None else rec.entries for rec in records]
