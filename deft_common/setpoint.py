"""`SparsitySetpoint`: threshold-aware fine-tuning. In every training forward, each selected MLP block keeps only
its largest activations (by |a|, at the block's capture point), so the model learns to work at the sparsity that
calibrated inference thresholds will later impose.

    setpoint = SparsitySetpoint(model, sparsity=0.99, ramp_steps=180, config=DeftConfig(), density_term=True)
    setpoint.check_ramp(total_steps=300)           # warns when the set-point would not be reached
    for step, batch in enumerate(batches):
        loss = model(**batch).loss + below_coef * setpoint.density_loss()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        setpoint.step(step + 1)                    # optimizer steps done: moves the ramp
    setpoint.remove()                              # hooks gone, the model computes exactly what it did before

The sparsity in force after `n` optimizer steps is `setpoint.at(n)`: 0 at the start, rising to `sparsity` at
`ramp_steps` (linearly in the sparsity, or geometrically in the kept share), then held. Per block, the threshold
τ is the `at(n)`-quantile of |a| over the real entries of the batch (padding rows never count; the attention mask
is read from the model's own forward arguments), or a running average of it (`threshold="running"`); entries with
|a| <= τ are set to 0, exactly as calibrated inference thresholds do. The mask acts only when the hooked module is
in training mode and gradients are enabled: evaluation and generate() see the model untouched. With
`dense_every=n` every n-th optimizer step trains without the mask, so the model learns to be accurate both dense
and thresholded.

Gradient through the mask: "mask" (the zeroed entries pass no gradient, as CATS) or "ste" (straight-through, the
gradient of the dense activation, as Q-Sparse). `density_loss()` is the optional set-point-aware density term:
per block, the mean over real entries of |a|/τ for the entries at or below τ, i.e. an L1 pull on exactly the
entries the set-point removes (the paper's a²/(a²+ε) only acts near zero).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from .architectures import MlpSite, base_model_of, find_mlp_sites
from .config import (SETPOINT_GRADIENTS, SETPOINT_SCHEDULES, DeftConfig, DeftConfigError, check_choice,
                     check_dense_every, check_fraction, check_whole)
from .tracker import _in_backward, _prompt_tokens, real_rows, stack_masks

GRADIENTS = SETPOINT_GRADIENTS
THRESHOLDS = ("batch", "running")
SCHEDULES = SETPOINT_SCHEDULES


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
    threshold:  "batch" (τ = quantile of this batch) or "running" (τ = running average of the batch quantiles,
                updated at each `step()`, closer to the fixed τ of calibrated inference).
    momentum:   weight of the past in the running average.
    schedule:   "linear" (sparsity linear in the step) or "geometric" (kept share 1 - sparsity falls geometrically,
                so more of the ramp is spent at high sparsity).
    density_term: compute the set-point-aware density term of each training forward for `density_loss()`
                (off by default: it costs a few element-wise ops per block and keeps their graph).
    dense_every: every n-th optimizer step trains dense, without the mask (0 = never; 2 = alternate), so the
                model also stays accurate without thresholds.
    """

    def __init__(self, model: nn.Module, sparsity: float, ramp_steps: int = 0, config: DeftConfig | None = None, *,
                 gradient: str = "mask", threshold: str = "batch", momentum: float = 0.9, schedule: str = "linear",
                 density_term: bool = False, dense_every: int = 0):
        self.config = config if config is not None else DeftConfig()
        if not isinstance(self.config, DeftConfig):
            raise DeftConfigError(f"SparsitySetpoint needs a deft_common.DeftConfig, got {type(self.config).__name__}")
        check_fraction("sparsity_setpoint", sparsity, fix="the fraction of MLP activations zeroed in training; use "
                       "e.g. 0.99, or leave it unset for no set-point")
        check_whole("setpoint_ramp_steps", ramp_steps, minimum=0,
                    fix="0 = the set-point from the first step; use e.g. 60% of the run's optimizer steps")
        check_choice("SparsitySetpoint: gradient", gradient, GRADIENTS)
        check_choice("SparsitySetpoint: threshold", threshold, THRESHOLDS)
        check_choice("SparsitySetpoint: schedule", schedule, SCHEDULES)
        check_dense_every("setpoint_dense_every", dense_every)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise DeftConfigError(f"SparsitySetpoint: momentum={momentum!r} must be in [0, 1); use e.g. 0.9")
        self.sparsity, self.ramp_steps = float(sparsity), int(ramp_steps)
        self.density_term = bool(density_term)
        self.dense_every = int(dense_every)
        self.gradient, self.threshold, self.momentum, self.schedule = gradient, threshold, float(momentum), schedule
        self.model = model
        self.sites: list[MlpSite] = find_mlp_sites(model, self.config)  # raises when a capture point is missing
        base = base_model_of(model)
        self.is_encoder_decoder = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
        self.virtual_tokens = _prompt_tokens(model)
        self.current_step = 0
        self.enabled = True
        self.running: dict[str, float] = {}  # block name -> running τ ("running" thresholds)
        self.last_thresholds: dict[str, float] = {}  # block name -> τ used in the latest training forward
        self.last_density: dict[str, float] = {}  # block name -> kept share over real entries, latest forward
        self._pending: dict[str, list[float]] = {}  # batch τs seen since the last step()
        self._below: list[torch.Tensor] = []  # density-loss terms since the last density_loss()
        self._masks: dict[str, torch.Tensor | None] = {"encoder": None, "decoder": None}
        # The masks are read from the forward arguments of the model given and of its base model (PEFT may call
        # the base model's forward directly, past its hooks); the innermost call seen last wins.
        self._handles = [m.register_forward_pre_hook(self._mask_reader(m), with_kwargs=True)
                         for m in dict.fromkeys([model, base])]
        self._handles += [self._hook(site) for site in self.sites]

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
        """Call after each optimizer step with the number of optimizer steps done (or nothing: one more).
        Moves the ramp and, with running thresholds, folds this step's batch thresholds into the average."""
        self.current_step = self.current_step + 1 if global_step is None else int(global_step)
        for name, values in self._pending.items():
            tau = sum(values) / len(values)
            old = self.running.get(name)
            self.running[name] = tau if old is None else self.momentum * old + (1.0 - self.momentum) * tau
        self._pending = {}
        self._below = []  # terms of a step whose density_loss() was not asked for: dropped, never kept

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
        return {"sparsity": self.sparsity, "ramp_steps": self.ramp_steps, "step": self.current_step,
                "running": dict(self.running)}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: the ramp resumes at the saved step (and running thresholds at their saved values)."""
        missing = {"sparsity", "ramp_steps", "step", "running"} - set(state)
        if missing:
            raise ValueError(f"SparsitySetpoint.load_state_dict: the state lacks {sorted(missing)}; "
                             "pass what SparsitySetpoint.state_dict() returned")
        if (float(state["sparsity"]), int(state["ramp_steps"])) != (self.sparsity, self.ramp_steps):
            raise ValueError(
                f"SparsitySetpoint.load_state_dict: the state is of set-point {state['sparsity']} with ramp "
                f"{state['ramp_steps']} steps, this one is {self.sparsity} with ramp {self.ramp_steps}; "
                "resume with the settings the run started with")
        unknown = set(state["running"]) - {site.name for site in self.sites}
        if unknown:
            raise ValueError(f"SparsitySetpoint.load_state_dict: running thresholds for unknown blocks {sorted(unknown)}")
        self.current_step = int(state["step"])
        self.running = {k: float(v) for k, v in state["running"].items()}
        self._pending = {}

    # ------------------------------------------------------------------ density loss
    def density_loss(self) -> torch.Tensor:
        """Mean over the blocks (and forwards since the last call) of the set-point-aware density term (needs
        density_term=True); 0 when nothing was masked. Clears what it returns: call it once per forward/backward."""
        terms, self._below = self._below, []
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    # ------------------------------------------------------------------ hooks
    def _mask_reader(self, module: nn.Module):
        signature = inspect.signature(module.forward)

        def read(_module, args, kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = dict(kwargs)
            for param in signature.parameters.values():  # forward(*args, **kwargs) wrappers
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    bound = {**bound.pop(param.name, {}), **bound}
            self._read_masks(bound)
            return None

        return read

    def _read_masks(self, bound: dict) -> None:
        # The attention masks of this forward, so that padding rows never count in the quantile.
        self._masks = stack_masks(bound, self.is_encoder_decoder)

    def _hook(self, site: MlpSite):
        module = site.capture_module(self.config.capture)
        if self.config.capture == "act":
            return module.register_forward_hook(lambda m, _args, out: self._tap(m, site, out))
        return module.register_forward_pre_hook(lambda m, args: self._tap(m, site, args))

    def _tap(self, module: nn.Module, site: MlpSite, value):
        if not (self.enabled and module.training and torch.is_grad_enabled()):
            return None  # eval, generate(), no-grad passes: the model is untouched
        is_tuple = isinstance(value, (tuple, list))
        a = value[0] if is_tuple and value else value
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            raise DeftConfigError(
                f"sparsity set-point: the capture point of {site.name} (capture={self.config.capture!r}) gives "
                f"{type(a).__name__}, not a floating-point tensor, so it cannot be masked; use the other capture "
                "point or name a module whose output is the activation with DeftConfig(modules=...)")
        sparsity = self.current_sparsity
        if sparsity <= 0.0 or self.is_dense_step(self.current_step):
            return None
        masked = self._mask(site, a, sparsity)
        return (masked, *value[1:]) if is_tuple else masked

    def _mask(self, site: MlpSite, a: torch.Tensor, sparsity: float) -> torch.Tensor:
        magnitude = a.detach().abs()
        real = real_rows(self._masks, a, site, self.is_encoder_decoder, self.virtual_tokens)
        flat = magnitude.reshape(-1, a.shape[-1])
        real_values = (flat if real is None else flat[real]).flatten().float()
        k = int(sparsity * real_values.numel())
        if k == 0:
            return a
        batch_tau = real_values.kthvalue(k).values
        in_backward = _in_backward()  # a gradient-checkpoint recompute: same τ, nothing recorded twice
        if not in_backward:
            self._pending.setdefault(site.name, []).append(float(batch_tau))
        tau = batch_tau
        if self.threshold == "running" and site.name in self.running:
            tau = torch.tensor(self.running[site.name], dtype=batch_tau.dtype, device=batch_tau.device)
        keep = magnitude > tau.to(magnitude.dtype)
        if not in_backward:
            self.last_thresholds[site.name] = float(tau)
            real_keep = keep.reshape(-1, a.shape[-1]) if real is None else keep.reshape(-1, a.shape[-1])[real]
            self.last_density[site.name] = float(real_keep.float().mean())
            if self.density_term and a.requires_grad:
                self._below.append(self._below_term(a, keep, real, tau))
        if self.gradient == "ste":
            return a - (a * ~keep).detach()  # forward: masked; backward: the dense gradient
        return a * keep

    @staticmethod
    def _below_term(a, keep, real, tau) -> torch.Tensor:
        # L1 on the entries the set-point removes, in units of τ: pulls them towards 0, so the dense model and the
        # thresholded one agree (and thresholds slightly above the set-point remove little).
        below = (a.abs() * ~keep).reshape(-1, a.shape[-1]).float()
        if real is not None:
            below = below[real]
        return below.sum() / (max(float(tau), 1e-12) * max(below.numel(), 1))

    # ------------------------------------------------------------------ switching
    def disabled(self):
        """Context manager: training forwards inside it run dense (e.g. the teacher pass of distillation)."""
        setpoint = self

        class _Disabled:
            def __enter__(self):
                self.was, setpoint.enabled = setpoint.enabled, False
                return setpoint

            def __exit__(self, *exc):
                setpoint.enabled = self.was
                return False

        return _Disabled()

    def remove(self) -> None:
        """Remove every hook: the model computes exactly what it did before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._below, self._pending = [], {}
        self._masks = {"encoder": None, "decoder": None}

