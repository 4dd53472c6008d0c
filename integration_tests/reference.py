"""The DEFT loss and gradients computed by hand with deft_common, to check every framework adapter against.

    loss, grads = reference_step(model, batch, DeftConfig(coef=1.0))   # one forward + backward, no framework
    trainer = Trainer(..., callbacks=[capture := GradCapture()]); trainer.train()
    assert_grads_close(capture.grads, grads)

Helpers: lora_model (a LoRA-wrapped fixture model with non-zero adapters), disable_dropout (so that a framework
run and the reference see the same activations), dataset_from_batch (a batch as a datasets.Dataset whose rows come
back unchanged through transformers.default_data_collator), assert_ada_deft_reloads (ADA-DEFT weights an adapter
saved: loaded into a fresh model they skip the blocks they choose).
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn
from transformers import TrainerCallback

from deft_common import DeftConfig, DensityController, DensityTracker


def controller_weights(config: DeftConfig, densities: list[float]) -> list[float]:
    """The density weight of each step when a DensityController is fed each step's density after that step:
    0 for the first step, then its weight after densities[0], after densities[1], ..."""
    controller = DensityController(config)
    return [0.0] + [controller.update(density) for density in densities[:-1]]


def reference_step(model: nn.Module, batch: dict, config: DeftConfig, step: int = 0) -> tuple[float, dict]:
    """loss = outputs.loss + coef_at(step) × density loss for one batch, and the gradient of every trainable
    parameter (by name), computed straight from deft_common. The model's .grad fields are cleared after."""
    tracker = DensityTracker(model, config)
    try:
        model.zero_grad(set_to_none=True)
        with tracker.record(**tracker.masks_for(batch)):
            outputs = model(**batch)
        loss = outputs.loss + config.coef_at(step) * tracker.density_loss()
        loss.backward()
        grads = trainable_grads(model)
    finally:
        tracker.remove()
        model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def disable_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def lora_model(model: nn.Module, seed: int = 0, r: int = 4) -> nn.Module:
    """`model` with LoRA on every linear layer. The adapters start non-zero (init_lora_weights=False), so both LoRA
    matrices get gradients at the first step."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(model, config)


def dataset_from_batch(batch: dict):
    """The rows of a make_batch() batch as a datasets.Dataset (use transformers.default_data_collator)."""
    import datasets

    return datasets.Dataset.from_dict({key: value.tolist() for key, value in batch.items()})


def trainable_grads(model: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_close(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-8) -> None:
    """Same names, and per tensor ||actual - expected|| <= rtol * ||expected|| + atol. A norm-wise test: a wrong
    scale is far outside it, while float reordering stays inside (also through the steep surrogate gradient near 0
    that single entries of ReLU models get)."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))[:5]
    for name, want in expected.items():
        error = (actual[name].double() - want.double()).norm().item()
        scale = want.double().norm().item()
        assert error <= rtol * scale + atol, f"{name}: |diff| {error:.3g} vs |expected| {scale:.3g}"


class GradCapture(TrainerCallback):
    """Keeps the gradients of the first optimizer step (after accumulation, before the optimizer and zero_grad).
    Disable gradient clipping (max_grad_norm=0) to see the raw gradients."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = trainable_grads(model)


def assert_ada_deft_reloads(directory, fresh: nn.Module, trained_logits: torch.Tensor | None = None) -> list[str]:
    """The ADA-DEFT weights a framework saved in `directory` were trained (not the uniform start: they were in the
    optimizer and got gradient), equal `trained_logits` when given, and loaded into `fresh` (an untrained model of
    the same architecture, plain or PEFT) choose one block that apply_ada_deft then skips. Returns that block."""
    from deft_common import DeftConfig, apply_ada_deft, choose_blocks_to_skip, find_mlp_sites, load_layer_weights
    from deft_common.adaptive import WEIGHTS_FILE

    directory = pathlib.Path(directory)
    assert (directory / WEIGHTS_FILE).is_file(), sorted(p.name for p in directory.iterdir())
    loaded = load_layer_weights(fresh, directory)
    logits = loaded.logits.detach().cpu()
    assert logits.abs().max() > 0 and logits.max() > logits.min(), f"untrained ADA-DEFT weights: {logits}"
    if trained_logits is not None:
        assert torch.allclose(logits, trained_logits.detach().cpu().float())
    chosen = choose_blocks_to_skip(fresh, budget=1)
    blocks = [site.name for site in find_mlp_sites(fresh, DeftConfig(capture="down_in"))]
    report = apply_ada_deft(fresh, DeftConfig(adaptive=True, skip_budget=1))
    assert report.blocks == chosen and len(chosen) == 1 and report.freed_parameters > 0
    assert [site.name for site in find_mlp_sites(fresh, DeftConfig(capture="down_in"))] == [
        b for b in blocks if b not in chosen
    ]
    return chosen
