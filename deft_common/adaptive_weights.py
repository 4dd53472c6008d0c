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

The weights are an `nn.Parameter` on a small module (`AdaptiveLayerWeights`) registered on the base model as
`deft_adaptive`: optimizers built from `model.parameters()` (HF Trainer, DeepSpeed) train it, it is in the model's
state dict, and DeepSpeed ZeRO-3 gathers it because its weights are read by calling the module.
PEFT's `save_pretrained` keeps only adapter weights, so `save_layer_weights(model, DIR)` writes them beside the
adapter (DIR/deft_adaptive.json) and `load_layer_weights(model, DIR)` puts them back.
"""

from __future__ import annotations

import json
import math
import pathlib

import torch
from torch import nn

from .architectures import MlpSite, base_model_of, find_mlp_sites
from .config import DeftConfig, DeftConfigError
from .distributed import gathered, is_main_process

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

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits.float() * self.logit_scale, dim=0)

    def weights(self) -> dict[str, float]:
        """{block name: w_ℓ = L·p_ℓ} (mean 1): above 1, the block gets more density pressure than plain DEFT's."""
        with torch.no_grad():
            p = self().cpu()  # calling the module lets DeepSpeed ZeRO-3 gather the parameter, where it is hooked
        _check_readable(self, "reading the ADA-DEFT weights", p.numel())
        return {name: float(v) * len(self.names) for name, v in zip(self.names, p)}

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
    """Register `weights` on the base model (replacing any there), on the model's device."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "meta":
        weights.to(param.device)
    base_model_of(model).add_module(ATTRIBUTE, weights)
    return weights


def save_layer_weights(model: nn.Module, directory) -> pathlib.Path:
    """Write the ADA-DEFT weights of `model` to DIRECTORY/deft_adaptive.json (e.g. beside a PEFT adapter saved
    there with save_pretrained, which keeps adapter weights only)."""
    weights = require_weights(model, "save_layer_weights")
    _check_readable(weights, "save_layer_weights")
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "format": _FORMAT,
        "blocks": weights.names,
        "logits": weights.logits.detach().float().cpu().tolist(),
        "logit_scale": weights.logit_scale,
        "temperature": weights.temperature,
        "weights": weights.weights(),  # for reading only; loading uses the logits
    }
    (path / WEIGHTS_FILE).write_text(json.dumps(record, indent=2))
    return path / WEIGHTS_FILE


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
    """DeepSpeed ZeRO-3 replaces a parameter's data by an empty placeholder between forwards: reading it then
    would save or return nothing, so refuse with the way out."""
    values = weights.logits.numel() if values is None else values
    if values != len(weights.names):
        raise DeftConfigError(
            f"{caller}: the ADA-DEFT weights hold {values} values for {len(weights.names)} MLP blocks; "
            "the parameter is partitioned (DeepSpeed ZeRO-3). Use deft_deepspeed.save_layer_weights(model, DIR) "
            "(DeftLossHook.save_layer_weights), which gathers it, or read it inside "
            "deepspeed.zero.GatheredParameters([deft_common.layer_weights(model).logits])"
        )



def save_gathered_layer_weights(model: nn.Module, directory, write: bool | None = None) -> pathlib.Path | None:
    """save_layer_weights for a model trained on several processes: under DeepSpeed ZeRO-3 the weights are
    partitioned, so they are gathered first, a collective that every process must call. `write`: whether this
    process writes the file (default: the main process only). Returns the path written, or None."""
    weights = require_weights(model, "save_gathered_layer_weights")
    if write is None:
        write = is_main_process()
    with gathered(weights.logits):
        return save_layer_weights(model, directory) if write else None
