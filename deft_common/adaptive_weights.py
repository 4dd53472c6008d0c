"""ADA-DEFT, training: learnable per-layer weights on the density terms, and their file beside a saved adapter.
Which MLP blocks they skip at inference: block_skip.py.

The paper (arXiv 2402.01911 v2) describes ADA-DEFT only as "layerwise learnable weights" that select MLP blocks to
skip at inference; its equations are not public. This is this project's design.

Training. One logit θ_ℓ per MLP block ℓ (the blocks the DensityTracker hooks, encoder and decoder together).
With D̂_ℓ the block's density loss (mean of s(a) = a²/(a²+ε) over real tokens) and L blocks:

    p = softmax(k·θ)                                   k = DeftConfig.adaptive_logit_scale
    w_ℓ = L·p_ℓ                                        the layer weights; mean 1
    density loss = (1/L) Σ_ℓ w_ℓ·D̂_ℓ + τ·KL(p ‖ uniform)   τ = DeftConfig.adaptive_temperature

and the caller adds coef × density loss to the task loss as usual; θ trains with the PEFT parameters.

Why this form:
- Unnormalised weights would run to zero: that removes the density term, the cheapest way to lower the loss.
  Normalising them (softmax × L, so Σ w = L) keeps the total density pressure of plain DEFT and lets the weights
  only *redistribute* it between blocks. With uniform logits (the start) the loss is exactly plain DEFT's.
- Minimising Σ p_ℓ D̂_ℓ over p alone is linear: its optimum puts all weight on the single sparsest block (a
  second degenerate solution). The KL term to the uniform distribution makes the optimum over p unique and
  smooth: p_ℓ ∝ exp(−D̂_ℓ / τ), a soft-min over the blocks' densities. Blocks whose activations fall easily
  (the task does not need them) get more weight, so more pressure, and end with all-zero activations: those are
  the blocks to skip. Blocks the task needs keep their density and lose weight, so the task is not hurt.
  The KL term is ≥ 0 and 0 at the start, so the density loss stays ≥ 0 and logs like plain DEFT's.
- Adam moves a parameter by about the learning rate per step whatever its gradient, and LoRA learning rates
  (1e-4 .. 1e-3) would move logits of order 1 by too little in a few hundred steps. So the stored parameter is
  θ and the logit is k·θ: an optimizer step moves the logits by about k × lr.

Several processes (DDP, FSDP1/FSDP2, DeepSpeed). Process r computes its own density loss from the D̂_ℓ^r of its rows,

    L_r = Σ_ℓ p_ℓ·D̂_ℓ^r + τ·KL(p ‖ uniform)

and the engine averages the gradients over the W processes, (1/W)·Σ_r ∇L_r. The same p on every process (the
logits are one replicated or gathered parameter), a KL term that does not depend on the data, and a loss linear in
D̂ give (1/W)·Σ_r ∇L_r = ∇[Σ_ℓ p_ℓ·D̄_ℓ + τ·KL(p ‖ uniform)] with D̄_ℓ = (1/W)·Σ_r D̂_ℓ^r, for the logits and for
the PEFT weights alike. When the processes see equally many real entries, D̄_ℓ is the mean over all their rows, so
the gradient is one process's on the whole batch, for any number of processes, with no collective: the same
condition under which plain DEFT's term (and the Trainer's per-process mean of it) equals one process's. (Padding
that leaves the processes different numbers of real tokens weights each process's D̂ equally, exactly as plain
DEFT's term does.) Measured on 2 CPU processes (gloo, integration_tests/test_fsdp.py): the logits' gradient under
FSDP2 and DDP is one process's within 2e-6 relative, at the uniform start (where the KL gradient is 0) and after a
step (where it is not). Summing the densities over processes with a differentiable all-reduce would give the same
gradients at the cost of a collective in every forward and backward.

The weights are an `nn.Parameter` on a small module (`AdaptiveLayerWeights`) registered on the base model as
`deft_adaptive`: optimizers built from `model.parameters()` (HF Trainer, DeepSpeed, FSDP) train it and it is in
the model's state dict. p is computed during each training forward of the base model (a forward pre-hook), where
every engine has the parameter whole: DeepSpeed ZeRO-3 gathers it because the module is called, FSDP1 and FSDP2
because their root unit is unsharded during its forward (after it, FSDP1 may leave this process an empty shard).
The density loss after the forward uses that p, so its gradient reaches the parameter through the engine's own
reduction. Plain DDP is the exception: it marks the parameter unused (its outputs do not reach it), so the HF
plugins keep it out of DDP and average its gradient themselves (deft_common.distributed.keep_out_of_ddp).
PEFT's `save_pretrained` keeps only adapter weights, so `save_layer_weights(model, DIR)` writes them beside the
adapter (DIR/deft_adaptive.json) and `load_layer_weights(model, DIR)` puts them back; on several processes
`save_gathered_layer_weights(model, DIR)` reads a sharded parameter whole first (deft_common.distributed.gathered).
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
from torch import nn

from .architectures import MlpSite, base_model_of, find_mlp_sites
from .config import DeftConfig, DeftConfigError
from .distributed import gathered, is_dtensor, is_main_process

ATTRIBUTE = "deft_adaptive"  # where the weights module sits on the base model
WEIGHTS_FILE = "deft_adaptive.json"  # the file beside a saved adapter
_FORMAT = 1


class AdaptiveLayerWeights(nn.Module):
    """The ADA-DEFT logits of the MLP blocks `names` (in the tracker's order). Call it for p = softmax(k·θ)."""

    def __init__(self, names: list[str], logit_scale: float = 100.0, temperature: float = 0.3):
        super().__init__()
        self.names = list(names)
        self.logit_scale = float(logit_scale)
        self.temperature = float(temperature)
        self.logits = nn.Parameter(torch.zeros(len(self.names), dtype=torch.float32))
        self._last_p: torch.Tensor | None = None  # p of the last loss(), for the logs
        self._forward_p: torch.Tensor | None = None  # p of the last training forward of the base model
        self._forward_hook = None  # that forward's pre-hook (see _put_on)

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits.float() * self.logit_scale, dim=0)

    def during_forward(self, module: nn.Module, args) -> None:
        """Forward pre-hook of the base model: in a training forward, compute p while every data-parallel engine
        has the parameter whole (see the module docstring); loss() uses it."""
        if module.training and torch.is_grad_enabled() and self.logits.requires_grad:
            self._forward_p = self()

    def weights(self) -> dict[str, float]:
        """{block name: w_ℓ = L·p_ℓ} (mean 1): above 1, the block gets more density pressure than plain DEFT's."""
        with torch.no_grad():
            p = self().cpu()  # calling the module lets DeepSpeed ZeRO-3 gather the parameter, where it is hooked
        _check_readable(self, "reading the ADA-DEFT weights", p.numel())
        return _weights_of(self.names, p)

    def log(self) -> dict[str, float]:
        """{"deft/adaptive_weight/<block>": w_ℓ} as the last training forward used them, for the training logs:
        no read of the parameter (so no DeepSpeed ZeRO-3 gather) and one device sync. Empty before any loss()."""
        if self._last_p is None:
            return {}
        values = (self._last_p.float() * len(self.names)).cpu().tolist()
        return {f"deft/adaptive_weight/{name}": value for name, value in zip(self.names, values)}

    def loss(self, layer_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_ℓ p_ℓ·D̂_ℓ + τ·KL(p ‖ uniform) over the blocks in `layer_losses` (p renormalised over them)."""
        unknown = [n for n in layer_losses if n not in self.names]
        if unknown:
            raise DeftConfigError(
                f"ADA-DEFT weights know the MLP blocks {self.names}, but the tracker recorded {unknown[0]!r}; "
                "the weights belong to another layer selection (DeftConfig.layers/modules)"
            )
        p, self._forward_p = self._forward_p, None
        if p is None:  # no training forward of the base model since the last loss (e.g. a loss computed by hand)
            p = self()
        self._last_p = p.detach()
        index = [self.names.index(n) for n in layer_losses]
        if len(index) != len(self.names):
            p = p[index] / p[index].sum()
        losses = torch.stack([v.float() for v in layer_losses.values()])
        kl = (p * torch.log(p.clamp_min(1e-30))).sum() + math.log(len(index))
        return (p.to(losses.device) * losses).sum() + self.temperature * kl.to(losses.device)

    def extra_repr(self) -> str:
        return f"blocks={len(self.names)}, logit_scale={self.logit_scale:g}, temperature={self.temperature:g}"


# ------------------------------------------------------------------------------------------------ weights
def layer_weights(model: nn.Module) -> AdaptiveLayerWeights | None:
    """The ADA-DEFT weights registered on `model` (plain or PEFT-wrapped), or None."""
    module = getattr(base_model_of(model), ATTRIBUTE, None)
    return module if isinstance(module, AdaptiveLayerWeights) else None


def attach_layer_weights(model: nn.Module, config: DeftConfig, sites: list[MlpSite] | None = None) -> AdaptiveLayerWeights:
    """The ADA-DEFT weights of `model`, created (uniform, on the model's device) when it has none yet.

    Call it before building the optimizer, so the optimizer trains them (a DensityTracker with
    DeftConfig(adaptive=True) calls it too, which is enough when the optimizer is built after the tracker)."""
    if not config.adaptive:
        raise DeftConfigError("attach_layer_weights needs DeftConfig(adaptive=True)")
    names = [s.name for s in (sites if sites is not None else find_mlp_sites(model, config))]
    existing = layer_weights(model)
    if existing is not None:
        if existing.names != names:
            raise DeftConfigError(
                f"the model already has ADA-DEFT weights for the MLP blocks {existing.names}, but this DeftConfig "
                f"selects {names}; use the same DeftConfig.layers/modules as when they were made"
            )
        return existing
    return _put_on(model, AdaptiveLayerWeights(names, config.adaptive_logit_scale, config.adaptive_temperature))


def _put_on(model: nn.Module, weights: AdaptiveLayerWeights) -> AdaptiveLayerWeights:
    """Register `weights` on the base model (replacing any there), on the model's device, with the forward
    pre-hook that computes p in each training forward."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "meta":
        weights.to(param.device)
    base = base_model_of(model)
    previous = getattr(base, ATTRIBUTE, None)
    if isinstance(previous, AdaptiveLayerWeights) and previous._forward_hook is not None:
        previous._forward_hook.remove()
        previous._forward_hook = None
    base.add_module(ATTRIBUTE, weights)
    weights._forward_hook = base.register_forward_pre_hook(weights.during_forward)
    return weights


def save_layer_weights(model: nn.Module, directory) -> pathlib.Path:
    """Write the ADA-DEFT weights of `model` to DIRECTORY/deft_adaptive.json (e.g. beside a PEFT adapter saved
    there with save_pretrained, which keeps adapter weights only)."""
    weights = require_weights(model, "save_layer_weights")
    _check_readable(weights, "save_layer_weights")
    return _write(weights, weights.logits, directory)


def _write(weights: AdaptiveLayerWeights, logits: torch.Tensor, directory) -> pathlib.Path:
    """DIRECTORY/deft_adaptive.json of `weights` with the whole `logits` (read by the caller)."""
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    logits = logits.detach().float().cpu()
    record = {
        "format": _FORMAT,
        "blocks": weights.names,
        "logits": logits.tolist(),
        "logit_scale": weights.logit_scale,
        "temperature": weights.temperature,
        # for reading only; loading uses the logits
        "weights": _weights_of(weights.names, torch.softmax(logits * weights.logit_scale, dim=0)),
    }
    (path / WEIGHTS_FILE).write_text(json.dumps(record, indent=2))
    return path / WEIGHTS_FILE


def _weights_of(names: list[str], p: torch.Tensor) -> dict[str, float]:
    return {name: float(v) * len(names) for name, v in zip(names, p.tolist())}


def load_layer_weights(model: nn.Module, directory) -> AdaptiveLayerWeights:
    """Put the weights saved by save_layer_weights(…, DIRECTORY) on `model` (replacing any it has)."""
    path = pathlib.Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise DeftConfigError(
            f"{str(path)!r} does not exist: no ADA-DEFT weights were saved in {str(directory)!r}; after "
            "model.save_pretrained(DIR) call deft_common.save_layer_weights(model, DIR)"
        )
    try:
        record = json.loads(path.read_text())
        names, logits = list(record["blocks"]), [float(v) for v in record["logits"]]
        scale, temperature = float(record["logit_scale"]), float(record["temperature"])
    except (ValueError, KeyError, TypeError) as err:
        raise DeftConfigError(f"{path}: not an ADA-DEFT weights file ({err!r}); write it with save_layer_weights") from err
    known = [s.name for s in find_mlp_sites(model, capture="down_in")]
    missing = [n for n in names if n not in known]
    if missing or len(logits) != len(names):
        raise DeftConfigError(
            f"{path} holds weights for the MLP blocks {names}, which this model does not have "
            f"(first missing: {missing[0] if missing else '-'}; the model has {known}); load it on the model it was trained on"
        )
    weights = AdaptiveLayerWeights(names, scale, temperature)
    with torch.no_grad():
        weights.logits.copy_(torch.tensor(logits))
    return _put_on(model, weights)


def require_weights(model: nn.Module, caller: str) -> AdaptiveLayerWeights:
    weights = layer_weights(model)
    if weights is None:
        raise DeftConfigError(
            f"{caller}: the model has no ADA-DEFT weights; train with DeftConfig(adaptive=True) (the DensityTracker "
            "adds them), or load them with deft_common.load_layer_weights(model, ADAPTER_DIR)"
        )
    return weights


def _check_readable(weights: AdaptiveLayerWeights, caller: str, values: int | None = None) -> None:
    """DeepSpeed ZeRO-3 replaces a parameter's data by an empty placeholder between forwards, FSDP2 holds a shard
    (a DTensor), FSDP1 a view into its sharded flat parameter (empty or partial): reading it then would save or
    return a part or nothing, so refuse with the way out."""
    if is_dtensor(weights.logits):
        raise DeftConfigError(
            f"{caller}: the ADA-DEFT weights are sharded (FSDP2 DTensor); every process must call "
            "deft_common.save_gathered_layer_weights(model, DIR), which gathers them (the HF Trainer plugins do)"
        )
    values = weights.logits.numel() if values is None else values
    if values != len(weights.names):
        raise DeftConfigError(
            f"{caller}: the ADA-DEFT weights hold {values} values for {len(weights.names)} MLP blocks; "
            "the parameter is partitioned (DeepSpeed ZeRO-3) or sharded (FSDP1). Every process must call "
            "deft_common.save_gathered_layer_weights(model, DIR) (DeepSpeed: deft_deepspeed.save_layer_weights, "
            "DeftLossHook.save_layer_weights), which gathers it, or read it inside "
            "deft_common.distributed.gathered(deft_common.layer_weights(model), 'logits', model)"
        )


def save_gathered_layer_weights(model: nn.Module, directory, write: bool | None = None) -> pathlib.Path | None:
    """save_layer_weights for a model trained on several processes: under DeepSpeed ZeRO-3, FSDP1 and FSDP2 the
    weights are sharded, so they are gathered first (deft_common.distributed.gathered), a collective that every
    process must call; `model` is the model as the engine wrapped it (FSDP1 needs its units). `write`: whether this
    process writes the file (default: the main process only). Returns the path written, or None."""
    weights = require_weights(model, "save_gathered_layer_weights")
    if write is None:
        write = is_main_process()
    with gathered(weights, "logits", model) as logits:
        if logits.numel() != len(weights.names):
            raise DeftConfigError(
                f"save_gathered_layer_weights: the gathered ADA-DEFT weights hold {logits.numel()} values for "
                f"{len(weights.names)} MLP blocks; pass the model as the engine wrapped it (e.g. trainer.model)"
            )
        return _write(weights, logits, directory) if write else None
