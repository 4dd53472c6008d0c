"""`DensityTracker`: the "observe" stage on the MLP capture points (deft_common.capture) plus a collector that is
active only inside `record()` (the same design as transformers' output capturing).

    tracker = DensityTracker(model, DeftConfig())
    with tracker.record(attention_mask=batch["attention_mask"]):
        out = model(**batch)
    loss = out.loss + cfg.coef * tracker.density_loss()
    tracker.density()        # {MLP block name: fraction of active entries}
    tracker.remove()         # hooks gone, model exactly as before

The stage is added once for the tracker's lifetime, after the set-point and any applied thresholds, so it measures
the activations the model really uses. Whenever an activation is part of a training graph they
run the same fused op, recording or not, so a non-reentrant checkpoint recompute sees identical saved tensors;
only inside `record()` (and never during backward) is anything kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adaptive_weights import attach_layer_weights
from .architectures import MlpSite, find_mlp_sites
from .capture import ActivationCapture, check_mask, in_backward, is_activation, is_encoder_decoder, masks_for_batch
from .checkpointing import REENTRANT_FIX, check_checkpointing
from .config import DeftConfig
from .distributed import is_distributed, sum_over_processes
from .errors import DeftCheckpointingError, DeftConfigError
from .sparsity.zeroing import has_only_positive_zeros
from .surrogate import count_active, density_tap

@dataclass
class _LayerRecord:
    surrogate_sum: torch.Tensor | int = 0  # Σ s(a) over real entries (fp32, differentiable when training)
    active: torch.Tensor | int = 0  # entries with |a| > τ, one count per threshold
    entries: int = 0  # real entries seen (real tokens × hidden units)


class DensityTracker:
    def __init__(self, model: nn.Module, config: DeftConfig | None = None, density_loss: bool = True,
                 setpoint=None):
        """density_loss=False: only count the active entries (density()); density_loss() is then 0 and training
        forwards cost one count per block (what DensityLossEngine does when coef is 0). setpoint: the
        SparsitySetpoint on the model, whose thresholds DeftConfig.surrogate "setpoint" bends at (DensityLossEngine
        passes it)."""
        self.config = config if config is not None else DeftConfig()
        if not isinstance(self.config, DeftConfig):
            raise DeftConfigError(f"DensityTracker needs a deft_common.DeftConfig, got {type(self.config).__name__}")
        if self.config.surrogate == "setpoint" and density_loss and setpoint is None:
            raise DeftConfigError("DeftConfig.surrogate='setpoint' needs the set-point's thresholds: build the "
                                  "tracker through DensityLossEngine (every adapter does), or pass "
                                  "DensityTracker(..., setpoint=SparsitySetpoint.from_config(model, config))")
        self.setpoint = setpoint
        self.model = model
        self.is_encoder_decoder = is_encoder_decoder(model)
        self.sites: list[MlpSite] = find_mlp_sites(model, self.config)
        self.thresholds: tuple[float, ...] = tuple(sorted({0.0, float(self.config.threshold)}))
        self._recording = False
        self._grad_expected = False
        self._records: dict[str, _LayerRecord] = {}
        self._density_loss = density_loss
        # ADA-DEFT: the learnable per-layer weights live on the model (see deft_common.adaptive_weights).
        self.adaptive = attach_layer_weights(model, self.config, self.sites) if self.config.adaptive else None
        self._capture = ActivationCapture.of(model)
        self._stage = self._capture.add("observe", self.sites, self.config.capture, self._observe)

    @property
    def virtual_tokens(self) -> int:
        """PEFT prompt tuning's virtual tokens, counted as real positions (0 for any other model)."""
        return self._capture.virtual_tokens

    # ------------------------------------------------------------------ the stage
    def _observe(self, site: MlpSite, a) -> torch.Tensor | None:
        """Returns what the module should use instead (the activation routed through the density op), or None to
        leave it as it is."""
        if not is_activation(a):
            return None
        recording = self._recording and not in_backward()
        if recording and self._grad_expected and not torch.is_grad_enabled():
            recording = False  # a no-grad forward inside a training step (e.g. TRL's metrics-only pass): not the loss
        training_graph = torch.is_grad_enabled() and a.requires_grad and self._density_loss
        if not recording and not training_graph:
            return None  # inference, eval, generate(), or counting only outside record(): no work, nothing kept
        pad_rows, real_rows = self._capture.pad_rows(site, a) if recording else (None, 0)
        if self._density_loss:
            routed, ssum, active = density_tap(a, pad_rows, self.config.surrogate, self._knee(site, a),
                                               self.thresholds)
        else:
            active = count_active(a, pad_rows, self.thresholds, positive_zeros=has_only_positive_zeros(a))
            routed, ssum = None, torch.zeros((), device=a.device)
        if recording:
            rec = self._records.setdefault(site.name, _LayerRecord())
            rec.surrogate_sum = rec.surrogate_sum + ssum
            rec.active = rec.active + active
            rec.entries += real_rows * a.shape[-1]
        # In a training graph the activation always goes through the op, recording or not, so that a gradient
        # checkpoint recompute (which runs outside record()) saves the same tensors as the original forward.
        return routed if training_graph else None

    def _knee(self, site: MlpSite, a: torch.Tensor):
        """Where the block's s(a) bends: ε, or for surrogate "setpoint" the set-point's latest τ of the block (on a
        dense step, that of the masked step before; before the first masked forward +inf, so s and its gradient
        are 0)."""
        if self.config.surrogate != "setpoint":
            return self.config.eps
        tau = self.setpoint.threshold(site.name)
        return tau if tau is not None else a.new_full((), float("inf"), dtype=torch.float32)

    # --------------------------------------------------------------- recording
    @contextmanager
    def record(self, attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None):
        """Collect activation statistics of the forward passes run inside this block (previous ones are dropped)."""
        if self._recording:
            raise RuntimeError("DensityTracker.record() is already active; records cannot be nested")
        if self._stage is None:
            raise RuntimeError("this DensityTracker was removed; create a new one")
        masks = {
            "encoder": check_mask("attention_mask", attention_mask),
            "decoder": check_mask("decoder_attention_mask", decoder_attention_mask),
        }
        if not self.is_encoder_decoder:
            masks["decoder"] = masks["encoder"]
        self._grad_expected = torch.is_grad_enabled() and self.model.training and self.config.coef > 0
        if self._grad_expected:
            check_checkpointing(self.model)
        self.clear()
        self._capture.pin_masks(masks)
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False
            self._capture.pin_masks(None)

    def clear(self) -> None:
        """Drop what the last record() kept."""
        self._records = {}

    # ----------------------------------------------------------------- results
    def layer_losses(self) -> dict[str, torch.Tensor]:
        """Per MLP block: the mean of s(a) (DeftConfig.surrogate, deft_common.surrogate) over real entries (fp32,
        differentiable in training)."""
        if not self._records:
            raise RuntimeError(
                "DensityTracker recorded no MLP activation: run the model inside `with tracker.record(...)`"
            )
        return {name: rec.surrogate_sum / rec.entries for name, rec in self._records.items() if rec.entries}

    def density_loss(self) -> torch.Tensor:
        """Mean over layers of the per-layer mean of s(a) over real tokens (fp32 scalar): the paper's a²/(a²+ε), or
        the DeftConfig.surrogate chosen.
        With DeftConfig(adaptive=True): the ADA-DEFT weighted form (deft_common.adaptive_weights)."""
        layer_losses = self.layer_losses()
        if self.adaptive is not None and layer_losses:
            if self._grad_expected and not self.adaptive.logits.requires_grad:
                raise DeftConfigError(
                    "the ADA-DEFT layer weights are frozen (requires_grad=False), e.g. because PEFT wrapped the model "
                    "after they were attached; build the DensityTracker after get_peft_model, or call "
                    "deft_common.layer_weights(model).requires_grad_(True)"
                )
            return self.adaptive.loss(layer_losses)
        losses = list(layer_losses.values())
        loss = torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float32)
        if self._grad_expected and not loss.requires_grad:
            raise DeftCheckpointingError(
                "the DEFT density term has no gradient although the model is training: either reentrant gradient "
                f"checkpointing hid the activations ({REENTRANT_FIX}), or no trainable parameter lies upstream "
                "of the selected MLP layers (choose other DeftConfig.layers or train more parameters)"
            )
        return loss

    def layer_counts(self, threshold: float | None = None) -> dict[str, tuple[int, int]]:
        """Per MLP block: (active entries, real entries) of the last record, |a| > threshold (default config.threshold)."""
        k = self._threshold_index(threshold)
        return {name: (int(rec.active[k]), rec.entries) for name, rec in self._records.items() if rec.entries}

    def density(self, threshold: float | None = None) -> dict[str, float]:
        """Per MLP block: fraction of entries with |a| > threshold over real tokens (threshold 0 = exact non-zeros)."""
        return {name: active / entries for name, (active, entries) in self.layer_counts(threshold).items()}

    def mean_density(self, threshold: float | None = None) -> float:
        values = list(self.density(threshold).values())
        return sum(values) / len(values) if values else float("nan")

    def global_density(self, threshold: float | None = None) -> dict[str, float]:
        """`density()` over every process: counts are summed with torch.distributed when it is initialised.
        Every process must call it (it is a collective)."""
        counts = self.layer_counts(threshold)
        if not is_distributed():
            return {name: active / entries for name, (active, entries) in counts.items()}
        names = [site.name for site in self.sites]
        totals = sum_over_processes(torch.tensor([counts.get(n, (0, 0)) for n in names], dtype=torch.float64))
        return {n: float(a / e) for n, (a, e) in zip(names, totals.tolist()) if e}

    def masks_for(self, batch) -> dict[str, torch.Tensor | None]:
        """The record() keyword arguments for a model-input batch (see `masks_for_batch`)."""
        return masks_for_batch(batch, self.is_encoder_decoder)

    def stack_of(self, name: str) -> str:
        return next(site.stack for site in self.sites if site.name == name)

    def _threshold_index(self, threshold: float | None) -> int:
        tau = float(self.config.threshold if threshold is None else threshold)
        if tau not in self.thresholds:
            raise ValueError(f"density was counted for thresholds {self.thresholds}, not {tau}")
        return self.thresholds.index(tau)

    # ------------------------------------------------------------------ teardown
    def remove(self) -> None:
        """Remove the stage (the last stage takes the hooks with it): the model is exactly as before."""
        if self._stage is not None:
            self._stage.remove()
            self._stage = None
        self.clear()
