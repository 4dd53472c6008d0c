"""`DensityTracker`: persistent hooks on the MLP capture points plus a collector that is active only inside
`record()` (the same design as transformers' output capturing).

    tracker = DensityTracker(model, DeftConfig())
    with tracker.record(attention_mask=batch["attention_mask"]):
        out = model(**batch)
    loss = out.loss + cfg.coef * tracker.density_loss()
    tracker.density()        # {MLP block name: fraction of active entries}
    tracker.remove()         # hooks gone, model exactly as before

Hooks are registered once for the tracker's lifetime. Whenever an activation is part of a training graph they
run the same fused op, recording or not, so a non-reentrant checkpoint recompute sees identical saved tensors;
only inside `record()` (and never during backward) is anything kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adaptive_weights import attach_layer_weights
from .architectures import MlpSite, base_model_of, find_mlp_sites
from .checkpointing import REENTRANT_FIX, DeftCheckpointingError, check_checkpointing
from .config import DeftConfig, DeftConfigError
from .distributed import is_distributed, sum_over_processes
from .surrogate import density_tap


class DeftInputError(ValueError):
    """A tensor handed to DEFT (attention mask) does not fit the model's activations."""


@dataclass
class _LayerRecord:
    surrogate_sum: torch.Tensor | int = 0  # Σ s(a) over real entries (fp32, differentiable when training)
    active: torch.Tensor | int = 0  # entries with |a| > τ, one count per threshold
    entries: int = 0  # real entries seen (real tokens × hidden units)


def _in_backward() -> bool:
    # True while the autograd engine runs backward, e.g. during a gradient-checkpoint recompute.
    return torch._C._current_graph_task_id() != -1


class DensityTracker:
    def __init__(self, model: nn.Module, config: DeftConfig | None = None):
        self.config = config if config is not None else DeftConfig()
        if not isinstance(self.config, DeftConfig):
            raise DeftConfigError(f"DensityTracker needs a deft_common.DeftConfig, got {type(self.config).__name__}")
        self.model = model
        base = base_model_of(model)
        self.is_encoder_decoder = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
        self.sites: list[MlpSite] = find_mlp_sites(model, self.config)
        self.virtual_tokens = _prompt_tokens(model)
        self.thresholds: tuple[float, ...] = tuple(sorted({0.0, float(self.config.threshold)}))
        self._recording = False
        self._grad_expected = False
        self._masks: dict[str, torch.Tensor | None] = {}
        self._pad_rows_cache: dict[tuple, tuple[torch.Tensor | None, int]] = {}
        self._records: dict[str, _LayerRecord] = {}
        # ADA-DEFT: the learnable per-layer weights live on the model (see deft_common.adaptive_weights).
        self.adaptive = attach_layer_weights(model, self.config, self.sites) if self.config.adaptive else None
        self._handles = [self._hook(site) for site in self.sites]

    # ------------------------------------------------------------------ hooks
    def _hook(self, site: MlpSite):
        module = site.capture_module(self.config.capture)
        if self.config.capture == "act":
            return module.register_forward_hook(lambda _m, _args, out: self._tap(site, out))
        return module.register_forward_pre_hook(lambda _m, args: self._tap(site, args))

    def _tap(self, site: MlpSite, value):
        """Hook body: `value` is the activation (or a tuple starting with it). Returns what the module should
        use instead (the activation routed through the density op), or None to leave it as it is."""
        is_tuple = isinstance(value, (tuple, list))
        a = value[0] if is_tuple and value else value
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            return None
        routed = self._observe(site, a)
        if routed is None:
            return None
        return (routed, *value[1:]) if is_tuple else routed

    def _observe(self, site: MlpSite, a: torch.Tensor) -> torch.Tensor | None:
        recording = self._recording and not _in_backward()
        if recording and self._grad_expected and not torch.is_grad_enabled():
            recording = False  # a no-grad forward inside a training step (e.g. TRL's metrics-only pass): not the loss
        training_graph = torch.is_grad_enabled() and a.requires_grad
        if not recording and not training_graph:
            return None  # inference, eval, generate(): no work, nothing kept
        pad_rows, real_rows = self._pad_rows(site, a) if recording else (None, 0)
        routed, ssum, active = density_tap(a, pad_rows, self.config.eps, self.thresholds)
        if recording:
            rec = self._records.setdefault(site.name, _LayerRecord())
            rec.surrogate_sum = rec.surrogate_sum + ssum
            rec.active = rec.active + active
            rec.entries += real_rows * a.shape[-1]
        # In a training graph the activation always goes through the op, recording or not, so that a gradient
        # checkpoint recompute (which runs outside record()) saves the same tensors as the original forward.
        return routed if training_graph else None

    def _pad_rows(self, site: MlpSite, a: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """(indices of the padding rows of a.reshape(-1, hidden), None if there are none; number of real rows)."""
        key = "decoder" if (self.is_encoder_decoder and site.stack == "decoder") else "encoder"
        mask = self._masks.get(key)
        if mask is None:
            return None, a.numel() // a.shape[-1]
        cache_key = (key, tuple(a.shape[:-1]), a.device)
        if cache_key not in self._pad_rows_cache:
            real = self._align_mask(mask, a, site, key, self.virtual_tokens)
            pad_rows = torch.nonzero(~real).flatten()
            self._pad_rows_cache[cache_key] = (pad_rows if pad_rows.numel() else None, real.numel() - pad_rows.numel())
        return self._pad_rows_cache[cache_key]

    @staticmethod
    def _align_mask(mask: torch.Tensor, a: torch.Tensor, site: MlpSite, key: str, virtual_tokens: int = 0) -> torch.Tensor:
        name = "attention_mask" if key == "encoder" else "decoder_attention_mask"
        batch, length = mask.shape
        if a.dim() == 3:
            if a.shape[0] != batch or a.shape[1] not in (length, length + virtual_tokens):
                raise DeftInputError(
                    f"{name} has shape {tuple(mask.shape)} but {site.name} saw activations of shape {tuple(a.shape)}; "
                    "pass the (batch, seq_len) mask of the batch given to the model (with PEFT prompt tuning, "
                    "build the DensityTracker on the PeftModel so it knows the virtual tokens)"
                )
            extra = a.shape[1] - length
            if extra:  # PEFT prompt tuning prepends virtual tokens; they are real positions the MLP computes
                mask = torch.cat([mask.new_ones(batch, extra), mask], dim=1)
        elif a.dim() != 2 or a.shape[0] != mask.numel():
            raise DeftInputError(
                f"{name} has shape {tuple(mask.shape)} but {site.name} saw activations of shape {tuple(a.shape)}"
            )
        return mask.reshape(-1).to(device=a.device) != 0  # True for real token rows

    # --------------------------------------------------------------- recording
    @contextmanager
    def record(self, attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None):
        """Collect activation statistics of the forward passes run inside this block (previous ones are dropped)."""
        if self._recording:
            raise RuntimeError("DensityTracker.record() is already active; records cannot be nested")
        if not self._handles:
            raise RuntimeError("this DensityTracker was removed; create a new one")
        masks = {
            "encoder": _check_mask("attention_mask", attention_mask),
            "decoder": _check_mask("decoder_attention_mask", decoder_attention_mask),
        }
        if not self.is_encoder_decoder:
            masks["decoder"] = masks["encoder"]
        self._grad_expected = torch.is_grad_enabled() and self.model.training and self.config.coef > 0
        if self._grad_expected:
            check_checkpointing(self.model)
        self.clear()
        self._masks = masks
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False
            self._masks = {}
            self._pad_rows_cache = {}

    def clear(self) -> None:
        """Drop what the last record() kept."""
        self._records = {}

    # ----------------------------------------------------------------- results
    def layer_losses(self) -> dict[str, torch.Tensor]:
        """Per MLP block: the mean of s(a) over real entries (fp32, differentiable in training)."""
        if not self._records:
            raise RuntimeError(
                "DensityTracker recorded no MLP activation: run the model inside `with tracker.record(...)`"
            )
        return {name: rec.surrogate_sum / rec.entries for name, rec in self._records.items() if rec.entries}

    def density_loss(self) -> torch.Tensor:
        """Mean over layers of the per-layer mean of s(a) = a²/(a²+ε) over real tokens (fp32 scalar).
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
        """Remove every hook: the model is exactly as before the tracker was made."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


def masks_for_batch(batch, is_encoder_decoder: bool) -> dict[str, torch.Tensor | None]:
    """The real-token masks of a model-input batch, as record() takes them: its attention mask, and for
    encoder-decoder models its decoder_attention_mask or, failing that, the real label positions (labels != -100)."""
    masks = {"attention_mask": batch.get("attention_mask")}
    if is_encoder_decoder:
        decoder_mask = batch.get("decoder_attention_mask")
        labels = batch.get("labels")
        if decoder_mask is None and labels is not None and batch.get("decoder_input_ids") is None:
            decoder_mask = (labels != -100).long()
        masks["decoder_attention_mask"] = decoder_mask
    return masks


def stack_masks(batch, is_encoder_decoder: bool) -> dict[str, torch.Tensor | None]:
    """{"encoder": mask, "decoder": mask} of a model-input batch (see `masks_for_batch`); a decoder-only model's
    blocks are all read with the attention mask."""
    masks = masks_for_batch(batch, is_encoder_decoder)
    encoder = masks["attention_mask"]
    return {"encoder": encoder, "decoder": masks.get("decoder_attention_mask") if is_encoder_decoder else encoder}


def real_rows(masks: dict, a: torch.Tensor, site: MlpSite, is_encoder_decoder: bool, virtual_tokens: int = 0):
    """Boolean (rows,) over a.reshape(-1, hidden): True for the rows of real tokens (None = every row is real).
    `masks` is what `stack_masks` gives for the forward that produced `a`."""
    stack = "decoder" if (is_encoder_decoder and site.stack == "decoder") else "encoder"
    mask = masks.get(stack)
    if mask is None:
        return None
    return DensityTracker._align_mask(mask, a, site, stack, virtual_tokens)


def _prompt_tokens(model: nn.Module) -> int:
    """How many virtual tokens PEFT prompt tuning / p-tuning prepends to the input (0 for any other model):
    only then may activations be longer than the attention mask."""
    while not hasattr(model, "active_peft_config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DDP / DeepSpeed wrappers
    peft_config = getattr(model, "active_peft_config", None)
    if not getattr(peft_config, "is_prompt_learning", False):
        return 0
    return int(getattr(peft_config, "num_virtual_tokens", 0) or 0)


def _check_mask(name: str, mask) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DeftInputError(f"{name} must be a (batch, seq_len) tensor of 1 for real tokens and 0 for padding, got {shape}")
    return mask.detach()
