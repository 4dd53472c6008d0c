"""Gradient checkpointing and the density term.

Reentrant checkpointing runs each layer's first forward under `no_grad`, so the activations DEFT sees carry no
gradient and the density term silently trains nothing. Non-reentrant checkpointing is fine (the hooks do the same
tensor work in the recompute). transformers stores the checkpoint function as a `functools.partial` on every
layer that has `gradient_checkpointing = True`; its `use_reentrant` keyword decides (torch's default is reentrant).
"""

from __future__ import annotations

import functools

from torch import nn

from .errors import DeftCheckpointingError


REENTRANT_FIX = (
    "enable gradient checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False} "
    "(TrainingArguments or model.gradient_checkpointing_enable), or call "
    "deft_common.make_checkpointing_non_reentrant(model)"
)


def _checkpointed_layers(model: nn.Module):
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None:
                yield module, func


def _is_reentrant(func) -> bool:
    if isinstance(func, functools.partial):
        return bool(func.keywords.get("use_reentrant", True))
    return True  # an unknown checkpoint function: assume torch's default


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    return any(_is_reentrant(func) for _, func in _checkpointed_layers(model))


def make_checkpointing_non_reentrant(model: nn.Module) -> int:
    """Switch every checkpointed layer of `model` to non-reentrant checkpointing; returns how many changed."""
    changed = 0
    for module, func in _checkpointed_layers(model):
        if not _is_reentrant(func):
            continue
        if not isinstance(func, functools.partial):
            raise DeftCheckpointingError(
                f"{type(module).__name__} uses a custom checkpoint function that DEFT cannot switch; {REENTRANT_FIX}"
            )
        module._gradient_checkpointing_func = functools.partial(func.func, *func.args, **{**func.keywords, "use_reentrant": False})
        changed += 1
    return changed


def check_checkpointing(model: nn.Module) -> None:
    if uses_reentrant_checkpointing(model):
        raise DeftCheckpointingError(
            "the model uses reentrant gradient checkpointing, which gives the DEFT density term no gradient; "
            + REENTRANT_FIX
        )
