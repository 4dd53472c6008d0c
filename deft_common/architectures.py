"""Where each architecture's MLP activations live.

MLP blocks are found structurally, not from a list of class names: a block is a module that holds a
down-projection (`down_proj`, `wo`, `c_proj`, `fc2`, ...) next to an activation module or an up-projection.
That one rule covers Llama, Mistral, Qwen2, Gemma, Phi, Phi-3, GPT-2, OPT and T5 (ReLU and gated), and
keeps working for fused MLPs such as Liger's (no activation module, but a down-projection). BERT and RoBERTa
split their MLP over two sibling modules (`intermediate` and `output.dense`) and get one extra rule.

Names are module paths relative to the base model, so they are the same with or without a PEFT wrapper, and
without the segments that wrappers insert (FSDP1's `_fsdp_wrapped_module`, activation checkpointing's
`_checkpoint_wrapped_module`, torch.compile's `_orig_mod`): metric keys and deft_thresholds.json name the blocks of
the plain model, whatever wrapped it in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import DeftConfig
from .errors import DeftConfigError

ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation")
DOWN_PROJ_ATTRS = ("down_proj", "wo", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2")
UP_PROJ_ATTRS = ("gate_proj", "up_proj", "gate_up_proj", "wi", "wi_0", "wi_1", "c_fc", "fc1", "dense_h_to_4h", "fc_in", "w1")


@dataclass(frozen=True)
class MlpSite:
    """One MLP block and its two capture points."""

    name: str  # module path of the block, relative to the base model
    stack: str  # "encoder" or "decoder"
    act: nn.Module | None  # the activation module (capture="act"), None when the MLP has none (fused, callable act)
    down: nn.Module | None  # the down-projection (capture="down_in")

    def capture_module(self, capture: str) -> nn.Module | None:
        return self.act if capture == "act" else self.down


# Attributes through which a wrapper holds the module it wraps; their names never appear in DEFT's block names.
WRAPPER_ATTRS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def base_model_of(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (and under DDP/DeepSpeed `.module`, FSDP1, checkpoint and torch.compile
    wrappers), else the model itself."""
    while True:
        inner = next((getattr(model, a) for a in WRAPPER_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None)
        if inner is None and isinstance(getattr(model, "module", None), nn.Module) and not _has_own_params(model):
            inner = model.module
        if inner is None:
            break
        model = inner
    get_base = getattr(model, "get_base_model", None)
    return base_model_of(get_base()) if callable(get_base) else model


def block_name(path: str) -> str:
    """A module path without the segments wrappers insert (`layers.0._checkpoint_wrapped_module.mlp` ->
    `layers.0.mlp`)."""
    return ".".join(part for part in path.split(".") if part not in WRAPPER_ATTRS)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _child(module: nn.Module, attrs: tuple[str, ...]) -> nn.Module | None:
    for attr in attrs:
        child = getattr(module, attr, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _stack_of(name: str) -> str:
    parts = name.split(".")
    if "encoder" in parts:
        return "encoder"
    return "decoder"  # decoder stacks of encoder-decoders, and every decoder-only LM


def split_mlp(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(intermediate, output) of a BERT / RoBERTa layer, whose MLP is split over these two siblings:
    act(dense(x)) lives in `intermediate`, the down-projection is `output.dense`. None for any other block."""
    intermediate, output = getattr(block, "intermediate", None), getattr(block, "output", None)
    if isinstance(intermediate, nn.Module) and isinstance(getattr(output, "dense", None), nn.Module):
        return intermediate, output
    return None


def down_projection(block: nn.Module) -> nn.Module | None:
    """The down-projection of an MLP block (a BERT-style layer's `output.dense`), or None."""
    split = split_mlp(block)
    return split[1].dense if split is not None else _child(block, DOWN_PROJ_ATTRS)


def up_projection(block: nn.Module) -> nn.Module | None:
    """The layer that feeds an MLP block's activation (a BERT-style layer's `intermediate.dense`; for gated MLPs
    the first of gate/up), or None."""
    split = split_mlp(block)
    if split is not None:
        dense = getattr(split[0], "dense", None)
        return dense if isinstance(dense, nn.Module) else None
    return _child(block, UP_PROJ_ATTRS)


def unwrapped(layer: nn.Module) -> nn.Module:
    """The layer under a LoRA wrapper (`base_layer`, which holds the weight and bias), else the layer itself."""
    return getattr(layer, "base_layer", layer)


@dataclass(frozen=True)
class GatedMlp:
    """The parts of a gated MLP block: down(between(act(gate(x)) * up(x))). `gate_rows` / `up_rows` slice the output
    features of a fused projection (Phi-3's gate_up_proj: gate first, then up), else None."""

    gate: nn.Module
    up: nn.Module
    down: nn.Module
    between: nn.Module | None = None  # T5's dropout between the product and wo
    gate_rows: slice | None = None
    up_rows: slice | None = None


def gated_mlp(block: nn.Module) -> GatedMlp | None:
    """The gate, up- and down-projection of a gated MLP block (Llama, Mistral, Qwen, Gemma, Phi-3, gated T5), None for
    a non-gated one."""
    has = lambda *attrs: all(isinstance(getattr(block, a, None), nn.Module) for a in attrs)
    if has("gate_proj", "up_proj", "down_proj"):
        return GatedMlp(block.gate_proj, block.up_proj, block.down_proj)
    if has("gate_up_proj", "down_proj"):
        width = block.gate_up_proj.weight.shape[0] // 2
        return GatedMlp(block.gate_up_proj, block.gate_up_proj, block.down_proj,
                        gate_rows=slice(0, width), up_rows=slice(width, None))
    if has("wi_0", "wi_1", "wo"):
        return GatedMlp(block.wi_0, block.wi_1, block.wo, between=getattr(block, "dropout", None))
    return None


def width_of(site: MlpSite) -> int | None:
    """Hidden units at the block's capture points: the down-projection's input size (None when it is not a known
    layer)."""
    down = unwrapped(site.down)
    for attr in ("in_features", "nx"):  # nn.Linear (and bitsandbytes' subclasses); GPT-2's Conv1D
        value = getattr(down, attr, None)
        if isinstance(value, int):
            return value
    return None


def _as_site(name: str, module: nn.Module) -> MlpSite | None:
    split = split_mlp(module)
    if split is not None:
        return MlpSite(name, _stack_of(name), _child(split[0], ACTIVATION_ATTRS), split[1].dense)
    down = _child(module, DOWN_PROJ_ATTRS)
    if down is None:
        return None
    act = _child(module, ACTIVATION_ATTRS)
    if act is None and _child(module, UP_PROJ_ATTRS) is None:
        return None  # e.g. GPT-2 attention: has `c_proj` but is no MLP
    return MlpSite(name, _stack_of(name), act, down)


def find_mlp_sites(model: nn.Module, config: DeftConfig | None = None, *, capture: str | None = None
                   ) -> list[MlpSite]:
    """The MLP blocks of `model` (a plain or PEFT-wrapped HF model) selected by `config.layers` / `config.modules`
    (no config: every block), in forward order (encoder first), each with a module to hook at `capture` (default
    `config.capture`). Raises DeftConfigError when nothing usable is found."""
    config = config if config is not None else DeftConfig(coef=0.0)
    capture = capture if capture is not None else config.capture
    base = base_model_of(model)
    if config.modules:
        sites = _sites_from_patterns(base, config.modules)
    else:
        sites = []
        for path, module in base.named_modules():
            name = block_name(path)
            if any(name == found.name or name.startswith(found.name + ".") for found in sites):
                continue  # never look for an MLP inside an MLP (LoRA wrappers, nested projections, wrappers)
            site = _as_site(name, module)
            if site is not None:
                sites.append(site)
        if not sites:
            raise DeftConfigError(
                f"no MLP block found in {type(base).__name__}: DEFT knows blocks holding a down-projection "
                f"({', '.join(DOWN_PROJ_ATTRS)}) next to an activation or up-projection. "
                "Name the modules to hook with DeftConfig(modules=[<regex>, ...])."
            )
    sites = _select_layers(sites, config.layers)
    missing = [s.name for s in sites if s.capture_module(capture) is None]
    if missing:
        hint = (
            "its activation is fused or a plain function (e.g. Liger kernels); use capture='down_in'"
            if capture == "act"
            else "name the modules with DeftConfig(modules=...)"
        )
        raise DeftConfigError(
            f"capture={capture!r}: {len(missing)} MLP block(s) have no module to hook "
            f"(first: {missing[0]}); {hint}"
        )
    return sites


def _sites_from_patterns(base: nn.Module, patterns: list[str]) -> list[MlpSite]:
    sites = []
    for path, module in base.named_modules():
        name = block_name(path)
        if name and any(re.search(p, name) for p in patterns) and name not in [s.name for s in sites]:
            sites.append(MlpSite(name, _stack_of(name), module, module))
    if not sites:
        raise DeftConfigError(
            f"DeftConfig.modules={patterns!r} matches no module of {type(base).__name__}; "
            "print [n for n, _ in model.named_modules()] to see the names"
        )
    return sites


def _select_layers(sites: list[MlpSite], layers) -> list[MlpSite]:
    if layers is None:
        return sites
    if isinstance(layers[0], int):
        out_of_range = [i for i in layers if i >= len(sites)]
        if out_of_range:
            raise DeftConfigError(
                f"DeftConfig.layers: index {out_of_range[0]} is out of range; this model has {len(sites)} "
                f"MLP layers, indices 0..{len(sites) - 1} (encoder first, then decoder)"
            )
        return [sites[i] for i in layers]
    chosen = [s for s in sites if any(re.search(p, s.name) for p in layers)]
    if not chosen:
        raise DeftConfigError(
            f"DeftConfig.layers={layers!r} matches no MLP block; the blocks are named like {sites[0].name!r}"
        )
    return chosen
