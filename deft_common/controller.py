"""Target-density control: the density weight is adjusted every step so the measured density converges to
`DeftConfig.target_density`.

A fixed weight behaves like a switch on pretrained models: below some value the density does not move, above it
whole layers are driven to zero faster than the task can adapt, and which value is "some value" depends on the
model, the data and the learning rate. The controller treats the weight as the multiplier of the constraint
"density <= target" and runs dual ascent on it, once per optimizer step, from the density d measured on that step,
with a damping term on the change of d since the step before:

    coef <- max(0, coef + gain * (d - target) + damping * (d - d_previous))

The first term raises the weight while the density is above the target and lowers it below. The second holds the
weight back while the density is already falling: under a constant weight the density keeps falling (the weight
sets how fast it falls, not where it stops), so without it the weight is still rising when the target is reached
and the density overshoots. With it, the density approaches the target at about gain / damping × its distance per
step. It starts at 0 (pure task loss); `coef` is not used.

    controller = DensityController(config)          # config.target_density set
    loss = task_loss + controller.coef * tracker.density_loss()
    ...optimizer step...
    controller.update(tracker.mean_density())       # the density of the batch just trained on
"""

from __future__ import annotations

import math

from .config import DeftConfig, DeftConfigError


class DensityController:
    def __init__(self, config: DeftConfig):
        if config.target_density is None:
            raise DeftConfigError("DensityController needs DeftConfig.target_density (a fraction in (0, 1))")
        self.target = float(config.target_density)
        self.gain = float(config.controller_gain)
        self.damping = float(config.controller_damping)
        self.coef = 0.0
        self.steps = 0
        self.last_density: float | None = None

    def update(self, density: float) -> float:
        """Feed the density measured on this step (at DeftConfig.threshold); returns the weight for the next step."""
        density = float(density)
        if not math.isfinite(density) or not 0.0 <= density <= 1.0:
            raise ValueError(f"DensityController.update: density must be a fraction in [0, 1], got {density!r}")
        change = 0.0 if self.last_density is None else density - self.last_density
        self.coef = max(0.0, self.coef + self.gain * (density - self.target) + self.damping * change)
        self.steps += 1
        self.last_density = density
        return self.coef

    def log(self) -> dict[str, float]:
        """What to log each step: the weight in use and the distance of the last measured density to the target."""
        out = {"deft/coef": self.coef, "deft/target_density": self.target}
        if self.last_density is not None:
            out["deft/density_error"] = self.last_density - self.target
        return out

    def state_dict(self) -> dict:
        return {"coef": self.coef, "steps": self.steps, "last_density": self.last_density}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
        self.steps = int(state["steps"])
        self.last_density = state.get("last_density")
