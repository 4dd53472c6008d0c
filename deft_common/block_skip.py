"""ADA-DEFT, inference: choose the MLP blocks to skip from the learned layer weights (adaptive_weights.py), and
skip them.

Inference. `choose_blocks_to_skip` ranks blocks by weight and takes a budget (a number of blocks or a fraction)
or those whose weight is at least a threshold; `skip_mlp_blocks` replaces each chosen MLP by what it computes when
all its activations are zero: the down-projection's bias (zero when it has none), so

    Llama / Mistral / T5 (no bias):  h + MLP(h)        ->  h
    GPT-2 / Phi (bias b):            h + MLP(h)        ->  h + b
    BERT / RoBERTa (post-LN):        LN(h + MLP(h))    ->  LN(h + b)

A block DEFT drove to density 0 is thereby skipped exactly, and its up/down-projection weights are freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adaptive_weights import require_weights
from .architectures import base_model_of, down_projection, find_mlp_sites, split_mlp, unwrapped
from .config import DeftConfig, DeftConfigError, check_skip_budget, check_skip_threshold

def choose_blocks_to_skip(model: nn.Module, budget: int | float | None = None, threshold: float | None = None) -> list[str]:
    """The MLP blocks to skip, from the model's ADA-DEFT weights, in forward order.

    budget:    a number of blocks (int >= 1), or a fraction of them (float in (0, 1), rounded): the blocks with the
               largest weights.
    threshold: every block whose weight w_ℓ (mean 1 over the blocks) is at least this.
    Exactly one of the two."""
    weights = require_weights(model, "choose_blocks_to_skip")
    if (budget is None) == (threshold is None):
        raise DeftConfigError(
            "choose how many MLP blocks ADA-DEFT skips: give either a budget (a number of blocks, or a fraction such "
            "as 0.5) or a weight threshold (e.g. 1.5), not both and not neither (DeftConfig.skip_budget / skip_threshold)"
        )
    w = weights.weights()
    n = len(w)
    if max(w.values()) - min(w.values()) < 1e-6:
        raise DeftConfigError(
            "the ADA-DEFT weights are all equal, so they were never trained: the density term had no weight "
            "(coef 0) or the weights were not in the optimizer; build the optimizer after the DensityTracker "
            "(or after deft_common.attach_layer_weights) so it holds model.parameters() including them"
        )
    ranked = sorted(w, key=lambda name: -w[name])
    if budget is not None:
        count = budget_to_count(budget, n)
        chosen = set(ranked[:count])
    else:
        check_skip_threshold(threshold)
        chosen = {name for name, value in w.items() if value >= threshold}
        if not chosen:
            raise DeftConfigError(
                f"no MLP block has an ADA-DEFT weight >= skip threshold {threshold:g} (largest: {max(w.values()):.3g} "
                f"for {ranked[0]}); lower the threshold or give a budget"
            )
    return [name for name in weights.names if name in chosen]


def budget_to_count(budget, blocks: int) -> int:
    """How many of `blocks` MLP blocks a skip budget means (raises DeftConfigError for a bad budget)."""
    check_skip_budget(budget)
    count = budget if isinstance(budget, int) else round(budget * blocks)
    if count < 1:
        raise DeftConfigError(f"skip budget {budget!r} of {blocks} MLP blocks rounds to 0 blocks; use a larger fraction or a number >= 1")
    if count > blocks:
        raise DeftConfigError(f"skip budget {budget!r} asks for {count} MLP blocks but the model has {blocks}")
    return count


# ------------------------------------------------------------------------------------------------ skipping
@dataclass
class SkipReport:
    blocks: list[str]  # the MLP blocks now skipped
    freed_parameters: int  # parameters removed from the model
    freed_bytes: int


class SkippedMlp(nn.Module):
    """Stands in for an MLP whose activations are all zero: returns its down-projection bias (or zeros)."""

    def __init__(self, bias: torch.Tensor | None, name: str):
        super().__init__()
        self.skipped = name
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states.new_zeros(hidden_states.shape)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"skipped MLP {self.skipped!r}"


class SkippedIntermediate(nn.Module):
    """BERT-style `intermediate` of a skipped MLP: hands its input on untouched (SkippedOutput ignores it)."""

    def forward(self, hidden_states):
        return hidden_states


class SkippedOutput(nn.Module):
    """BERT-style `output` of a skipped MLP: LayerNorm(residual + down-projection bias), what the block
    computes when its activations are all zero."""

    def __init__(self, bias: torch.Tensor | None, layer_norm: nn.Module, name: str):
        super().__init__()
        self.skipped = name
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.LayerNorm = layer_norm

    def forward(self, hidden_states, input_tensor, *args, **kwargs):
        return self.LayerNorm(input_tensor if self.bias is None else input_tensor + self.bias.to(input_tensor.dtype))

    def extra_repr(self) -> str:
        return f"skipped MLP {self.skipped!r}"


def skip_mlp_blocks(model: nn.Module, names: list[str]) -> SkipReport:
    """Replace the MLP blocks `names` of `model` (plain or PEFT-wrapped) by their zero-activation output (see the
    module docstring) and drop their weights. For inference: remove any DensityTracker on the model first."""
    base = base_model_of(model)
    sites = {s.name: s for s in find_mlp_sites(model, capture="down_in")}
    if not names:
        raise DeftConfigError("skip_mlp_blocks: no MLP block named; pass the names choose_blocks_to_skip returns")
    for name in names:
        if name not in sites:
            raise DeftConfigError(
                f"skip_mlp_blocks: {name!r} is not an MLP block of this model (already skipped?); its blocks are {list(sites)}"
            )
        hooked = [m for m in (sites[name].act, sites[name].down) if m is not None and (m._forward_hooks or m._forward_pre_hooks)]
        if hooked:
            raise DeftConfigError(
                f"skip_mlp_blocks: {name} still has forward hooks (a DensityTracker?), which would keep its weights "
                "alive; call tracker.remove() before skipping blocks"
            )
    freed_params = freed_bytes = 0
    for name in names:
        block = base.get_submodule(name)
        old, new = _replace(base, name, block)
        kept = {id(p) for m in new for p in m.parameters()}
        for module in old:
            for p in module.parameters():
                if id(p) not in kept:
                    freed_params += p.numel()
                    freed_bytes += p.numel() * p.element_size()
        for module in new:
            for p in module.parameters():
                if not any(p is q for m in old for q in m.parameters()):
                    freed_params -= p.numel()
                    freed_bytes -= p.numel() * p.element_size()
    return SkipReport(list(names), freed_params, freed_bytes)


def _bias_of(linear: nn.Module | None) -> torch.Tensor | None:
    bias = getattr(unwrapped(linear), "bias", None) if linear is not None else None  # LoRA adds no bias
    return bias if isinstance(bias, torch.Tensor) else None


def _replace(base: nn.Module, name: str, block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Swap in the skipped form of `block`; returns (removed modules, new modules)."""
    split = split_mlp(block)
    if split is not None:
        intermediate, output = split
        layer_norm = getattr(output, "LayerNorm", None)
        if not isinstance(layer_norm, nn.Module):
            raise DeftConfigError(f"skip_mlp_blocks: {name}.output has no LayerNorm; skipping knows BERT-style post-LN layers only")
        new_output = SkippedOutput(_bias_of(output.dense), layer_norm, name)
        new_intermediate = SkippedIntermediate()
        block.intermediate, block.output = new_intermediate, new_output
        return [intermediate, output], [new_intermediate, new_output]
    if any(("attn" in child or "attention" in child) for child, _ in block.named_children()):
        raise DeftConfigError(
            f"skip_mlp_blocks: the MLP of {name} is not a module of its own (its projections sit directly on the "
            "transformer layer, e.g. OPT), so it cannot be swapped out; ADA-DEFT skipping supports Llama-style, "
            "T5, GPT-2-style and BERT-style blocks"
        )
    parent_name, _, attr = name.rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    new = SkippedMlp(_bias_of(down_projection(block)), name)
    setattr(parent, attr, new)
    return [block], [new]


def apply_ada_deft(model: nn.Module, config: DeftConfig | None = None, budget: int | float | None = None,
                   threshold: float | None = None) -> SkipReport:
    """Choose the blocks to skip from the model's ADA-DEFT weights and skip them. The budget or threshold comes
    from the arguments, else from config.skip_budget / config.skip_threshold."""
    if budget is None and threshold is None and config is not None:
        budget, threshold = config.skip_budget, config.skip_threshold
    return skip_mlp_blocks(model, choose_blocks_to_skip(model, budget=budget, threshold=threshold))
