"""`SparsitySetpoint`: threshold-aware fine-tuning. In every training forward, each selected MLP block keeps only
its largest activations (by |a|, at the block's capture point), so the model learns to work at the sparsity that
calibrated inference thresholds will later impose.

    setpoint = SparsitySetpoint(model, sparsity=0.99, ramp_steps=180, config=DeftConfig())
    setpoint.check_ramp(total_steps=300)           # warns when the set-point would not be reached
    for step, batch in enumerate(batches):
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        setpoint.step(step + 1)                    # optimizer steps done: moves the ramp
    setpoint.remove()                              # hooks gone, the model computes exactly what it did before

The sparsity in force after `n` optimizer steps is `setpoint.at(n)`: 0 at the start, rising to `sparsity` at
`ramp_steps` (linearly in the sparsity, or geometrically in the kept share), then held. Per block, the threshold
τ is the `at(n)`-quantile of |a| over the real entries of the batch (padding rows never count; the attention mask
is read from the model's own forward arguments); entries with |a| <= τ are set to 0, by the same rule as calibrated
inference thresholds (sparsity.zeroing).

How exact τ is, and what it costs: τ is read off a log2 histogram (sparsity.histogram) of |a| over at most
`SAMPLE` = 65,536 entries of the block's real tokens, drawn at fixed random positions (all entries when there are
fewer), and the histograms of every process are summed first, so every process uses the same τ: the quantile over
the global batch, for any number of processes. With every entry counted τ is within one histogram bin (0.27%) of
the exact quantile; with a sample, the share it keeps is the asked share give or take the sample's standard error,
sqrt(s (1 - s) / 65,536) (±0.00028 at s = 0.995, ±0.0012 at s = 0.9). Nothing is read back to the host in the
forward on a GPU (τ stays a tensor; on CPU, where reading it costs nothing, τ is a number, so the mask is one fused
pass), and no copy of the activation is made beyond the sample; on CPU the mask zeroes the activation in place when
the op that made it did not keep it for backward (sparsity.zeroing.may_overwrite), so a hook registered before the
set-point that keeps the activation sees it masked. A gradient-checkpoint recompute reuses the τ of its forward.
It is the "setpoint" stage of deft_common.capture, so the density tracker measures what it leaves. The mask acts
only when the hooked module is in training mode and gradients are enabled: evaluation and generate() see the model
untouched. With `dense_every=n` every n-th optimizer step trains without the mask, so the model learns to be accurate
both dense and thresholded.

Gradient through the mask: "mask" (the zeroed entries pass no gradient, as CATS) or "ste" (straight-through, the
gradient of the dense activation, as Q-Sparse).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..architectures import MlpSite, find_mlp_sites
from ..capture import ActivationCapture, in_backward, is_activation
from ..config import (SETPOINT_GRADIENTS, SETPOINT_SCHEDULES, DeftConfig, DeftConfigError, check_choice,
                      check_dense_every, check_fraction, check_whole)
from ..distributed import sum_over_processes
from .histogram import NUM_BINS, bin_index, quantile_on_device
from .zeroing import MaskAtOrBelow, may_overwrite

GRADIENTS = SETPOINT_GRADIENTS
SCHEDULES = SETPOINT_SCHEDULES
SAMPLE = 1 << 16  # entries per block and forward whose histogram gives τ (see the module docstring)


class SetpointWarning(UserWarning):
    """The set-point's ramp is longer than the run: the set-point will not be reached."""


class SparsitySetpoint:
    """A sparsity set-point applied in the training forward at each selected MLP block's capture point.

    model:      a plain or PEFT-wrapped HF model (or any module `find_mlp_sites` understands).
    sparsity:   target fraction of zeroed activations per block, in [0, 1) (DeftConfig.sparsity_setpoint; the
                adapters build it with `from_config` through DensityLossEngine).
    ramp_steps: optimizer steps over which the sparsity rises from 0 to `sparsity` (0 = from the first step).
    config:     which blocks and capture point (DeftConfig.layers, .modules, .capture); its loss settings are unused.
    gradient:   "mask" (zeroed entries pass no gradient) or "ste" (straight-through estimator).
    schedule:   "linear" (sparsity linear in the step) or "geometric" (kept share 1 - sparsity falls geometrically,
                so more of the ramp is spent at high sparsity).
    dense_every: every n-th optimizer step trains dense, without the mask (0 = never; 2 = alternate), so the
                model also stays accurate without thresholds.
    """

    def __init__(self, model: nn.Module, sparsity: float, ramp_steps: int = 0, config: DeftConfig | None = None, *,
                 gradient: str = "mask", schedule: str = "linear", dense_every: int = 0):
        self.config = config if config is not None else DeftConfig()
        if not isinstance(self.config, DeftConfig):
            raise DeftConfigError(f"SparsitySetpoint needs a deft_common.DeftConfig, got {type(self.config).__name__}")
        check_fraction("sparsity_setpoint", sparsity, fix="the fraction of MLP activations zeroed in training; use "
                       "e.g. 0.99, or leave it unset for no set-point")
        check_whole("setpoint_ramp_steps", ramp_steps, minimum=0,
                    fix="0 = the set-point from the first step; use e.g. 60% of the run's optimizer steps")
        check_choice("SparsitySetpoint: gradient", gradient, GRADIENTS)
        check_choice("SparsitySetpoint: schedule", schedule, SCHEDULES)
        check_dense_every("setpoint_dense_every", dense_every)
        self.sparsity, self.ramp_steps = float(sparsity), int(ramp_steps)
        self.dense_every = int(dense_every)
        self.gradient, self.schedule = gradient, schedule
        self.model = model
        self.sites: list[MlpSite] = find_mlp_sites(model, self.config)  # raises when a capture point is missing
        self.current_step = 0
        self._taus: dict[str, torch.Tensor] = {}  # block name -> τ of the latest training forward (0-dim)
        self._kept: dict[str, torch.Tensor] = {}  # block name -> share of its sample above τ (0-dim)
        self._positions: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (entries, width, device) -> sample
        self._capture = ActivationCapture.of(model)
        self._stage = self._capture.add("setpoint", self.sites, self.config.capture, self._masked,
                                        read_masks_of=model)

    @classmethod
    def from_config(cls, model: nn.Module, config: DeftConfig) -> "SparsitySetpoint | None":
        """The set-point DeftConfig.sparsity_setpoint asks for (its ramp, schedule and gradient), None when unset."""
        if config.sparsity_setpoint is None:
            return None
        return cls(model, config.sparsity_setpoint, config.setpoint_ramp_steps, config,
                   gradient=config.setpoint_gradient, schedule=config.setpoint_schedule,
                   dense_every=config.setpoint_dense_every)

    # ------------------------------------------------------------------ schedule
    def at(self, step: int) -> float:
        """The sparsity in force after `step` optimizer steps."""
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.sparsity
        progress = max(0, step) / self.ramp_steps
        if self.schedule == "geometric":  # kept share (1 - s) goes 1 -> 1 - sparsity geometrically
            return 1.0 - (1.0 - self.sparsity) ** progress
        return self.sparsity * progress

    @property
    def current_sparsity(self) -> float:
        return self.at(self.current_step)

    def is_dense_step(self, step: int) -> bool:
        """Whether the optimizer step after `step` steps done trains dense (dense_every: steps n-1, 2n-1, ...)."""
        return self.dense_every > 0 and step % self.dense_every == self.dense_every - 1

    def step(self, global_step: int | None = None) -> None:
        """Call after each optimizer step with the number of optimizer steps done (or nothing: one more): moves the
        ramp."""
        self.current_step = self.current_step + 1 if global_step is None else int(global_step)

    def check_ramp(self, total_steps: int) -> float:
        """The sparsity reached at the end of a run of `total_steps` optimizer steps; warns (SetpointWarning)
        when the ramp is longer than the run, as the set-point will then not be reached."""
        reached = self.at(total_steps)
        if self.ramp_steps > total_steps:
            warnings.warn(
                f"setpoint_ramp_steps={self.ramp_steps} is longer than the run ({total_steps} steps): the sparsity "
                f"set-point {self.sparsity:g} will not be reached (the run ends at {reached:.4g}); use "
                f"setpoint_ramp_steps <= {total_steps}, e.g. {int(0.6 * total_steps)}",
                SetpointWarning, stacklevel=2)
        return reached

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"sparsity": self.sparsity, "ramp_steps": self.ramp_steps, "step": self.current_step}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: the ramp resumes at the saved step."""
        missing = {"sparsity", "ramp_steps", "step"} - set(state)
        if missing:
            raise ValueError(f"SparsitySetpoint.load_state_dict: the state lacks {sorted(missing)}; "
                             "pass what SparsitySetpoint.state_dict() returned")
        if (float(state["sparsity"]), int(state["ramp_steps"])) != (self.sparsity, self.ramp_steps):
            raise ValueError(
                f"SparsitySetpoint.load_state_dict: the state is of set-point {state['sparsity']} with ramp "
                f"{state['ramp_steps']} steps, this one is {self.sparsity} with ramp {self.ramp_steps}; "
                "resume with the settings the run started with")
        self.current_step = int(state["step"])

    # ------------------------------------------------------------------ the stage
    def _masked(self, site: MlpSite, a):
        module = site.capture_module(self.config.capture)
        if not (module.training and torch.is_grad_enabled()):
            return None  # eval, generate(), no-grad passes: the model is untouched
        if not is_activation(a):
            raise DeftConfigError(
                f"sparsity set-point: the capture point of {site.name} (capture={self.config.capture!r}) gives "
                f"{type(a).__name__}, not a floating-point tensor, so it cannot be masked; use the other capture "
                "point or name a module whose output is the activation with DeftConfig(modules=...)")
        sparsity = self.current_sparsity
        if sparsity <= 0.0 or self.is_dense_step(self.current_step):
            return None
        return self._mask(site, a, sparsity)

    def _mask(self, site: MlpSite, a: torch.Tensor, sparsity: float) -> torch.Tensor:
        if in_backward():  # a gradient-checkpoint recompute: the τ of its forward, nothing recorded twice
            tau = self._taus[site.name]
        else:
            tau = self._taus[site.name] = self._quantile(site, a, sparsity)
        # On CPU a number: reading it costs nothing there and the mask is one fused pass. Elsewhere, and in a graph
        # torch.compile traces, a tensor: nothing is read back to the host.
        on_host = a.device.type == "cpu" and not torch.compiler.is_compiling()
        if not on_host:
            return MaskAtOrBelow.apply(a, tau, self.gradient == "ste", False)
        return MaskAtOrBelow.apply(a, float(tau), self.gradient == "ste", may_overwrite(a))

    def _quantile(self, site: MlpSite, a: torch.Tensor, q: float) -> torch.Tensor:
        """τ of this forward (a 0-dim tensor on a's device): the q-quantile of |a| over the real entries of every
        process, from the histogram of a bounded sample."""
        flat, width = a.detach().reshape(-1), a.shape[-1]
        real = self._capture.real_rows(site, a)  # None: every row is real
        if flat.numel() > SAMPLE:
            positions, rows = self._sample_positions(flat.numel(), width, a.device)
            values = flat.index_select(0, positions)
            weight = real.index_select(0, rows) if real is not None else None
        else:
            values = flat
            weight = real.unsqueeze(1).expand(-1, width).reshape(-1) if real is not None else None
        weight = torch.ones_like(values, dtype=torch.float32) if weight is None else weight.float()
        magnitude = values.abs()
        counts = torch.zeros(NUM_BINS, dtype=torch.float32, device=a.device)
        counts.index_add_(0, bin_index(magnitude), weight)
        tau = quantile_on_device(sum_over_processes(counts), q)
        self._kept[site.name] = (weight * (magnitude > tau)).sum() / weight.sum().clamp(min=1)
        return tau

    def _sample_positions(self, entries: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """SAMPLE fixed random positions in an activation of `entries` entries, and the row of each; drawn once per
        shape (seeded, so every process and every run draws the same)."""
        key = (entries, width, device)
        if key not in self._positions:
            generator = torch.Generator().manual_seed(entries)
            # in increasing order: the gather then reads memory forwards (1.5x faster on CPU than in random order)
            positions = torch.randint(0, entries, (SAMPLE,), generator=generator).sort().values.to(device)
            self._positions[key] = (positions, positions // width)
        return self._positions[key]

    def threshold(self, name: str) -> torch.Tensor | None:
        """τ of block `name` in the latest masked training forward (a 0-dim tensor on its device), None before the
        first (DeftConfig.surrogate "setpoint" bends there)."""
        return self._taus.get(name)

    @property
    def last_thresholds(self) -> dict[str, float]:
        """Block name -> τ used in the latest training forward (reading it synchronises with the device)."""
        return {name: float(tau) for name, tau in self._taus.items()}

    @property
    def last_density(self) -> dict[str, float]:
        """Block name -> the share of the latest training forward's τ sample that it kept (over real entries)."""
        return {name: float(kept) for name, kept in self._kept.items()}

    def remove(self) -> None:
        """Remove the stage: the model computes exactly what it did before."""
        self._stage.remove()
