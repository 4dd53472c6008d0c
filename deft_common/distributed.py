"""Helpers for training on several processes, for every adapter: summing counts over the processes of a
torch.distributed group, which process writes files, reading (and writing) a parameter that a data-parallel engine
shards, and keeping a parameter used after the forward out of DDP's unused-parameter bookkeeping.

Each one is a no-op (or the single-process answer) when torch.distributed is not initialised or the parameter is
not sharded, so callers never check for distributed training, DeepSpeed or FSDP themselves.

Sharded parameters (`gathered`), the one way every DEFT caller reads or restores one:

    DeepSpeed ZeRO-3     the parameter has `ds_id`; its data is an empty placeholder outside a forward:
                         deepspeed.zero.GatheredParameters
    FSDP2 (fully_shard)  the parameter is a DTensor (a shard per process): DTensor.full_tensor(), and on a write
                         the changed tensor is distributed back into the shards
    FSDP1 (FullyShardedDataParallel, flat parameters)
                         the parameter is a view into its unit's sharded flat parameter (empty or partial on most
                         processes): FullyShardedDataParallel.summon_full_params on the innermost FSDP unit that
                         holds the module, recurse=False (only that unit is unsharded)
    DDP, one process     the parameter itself
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of the process group, or the only process: the one that writes shared files."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process, in place (returned for convenience). A collective when torch.distributed
    is initialised: every process must call it, with a tensor of the same shape."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def is_dtensor(tensor) -> bool:
    """An FSDP2 (or tensor-parallel) DTensor: each process holds a shard, `full_tensor()` gathers the whole."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


def fsdp1_unit_of(module: nn.Module, model: nn.Module | None) -> nn.Module | None:
    """The innermost FSDP1 `FullyShardedDataParallel` unit of `model` whose flat parameter holds `module`'s own
    parameters, or None (no FSDP1 in `model`, or `model` not given)."""
    if model is None:
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return None
    owner = None
    for unit in FullyShardedDataParallel.fsdp_modules(model):  # pre-order: a later match lies deeper
        if any(m is module for m in unit.modules()):
            owner = unit
    return owner


@contextlib.contextmanager
def gathered(module: nn.Module, name: str, model: nn.Module | None = None,
             modifier_rank: int | None = None) -> Iterator[torch.Tensor]:
    """A context that yields the whole of `module`'s parameter `name` as a plain tensor, however a data-parallel
    engine shards it (see the module docstring): DeepSpeed ZeRO-3, FSDP2 (DTensor) and FSDP1 (flat parameters;
    give `model`, the FSDP-wrapped model, so that its unit is found). A collective when the parameter is sharded:
    every process must enter it. Read it, or change it in place (under torch.no_grad()) with `modifier_rank`: then
    that rank's values are written to every process's copy or shard on exit. Not inside a forward or backward."""
    param = getattr(module, name)
    if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed  # only reached for a parameter DeepSpeed partitioned, so it is installed and imported

        with deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank):
            yield param
        return
    if is_dtensor(param):  # FSDP2
        full = param.full_tensor()
        yield full
        if modifier_rank is not None:
            _broadcast(full, modifier_rank)
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(full.detach().to(param.dtype), param.device_mesh, param.placements)
            with torch.no_grad():
                param.to_local().copy_(shard.to_local())
        return
    unit = fsdp1_unit_of(module, model)
    if unit is not None:  # FSDP1: unshard the unit that holds the parameter; `writeback` keeps in-place changes
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=modifier_rank is not None):
            full = getattr(module, name)  # without use_orig_params FSDP1 swaps the attribute for a view
            yield full
            if modifier_rank is not None:
                _broadcast(full, modifier_rank)
        return
    yield param
    if modifier_rank is not None:
        _broadcast(param, modifier_rank)


def _broadcast(tensor: torch.Tensor, src: int) -> None:
    """Every process's `tensor` becomes rank `src`'s (in place)."""
    if is_distributed():
        with torch.no_grad():
            buffer = tensor.detach().clone()  # broadcast needs a tensor that does not require grad
            torch.distributed.broadcast(buffer, src=src)
            tensor.copy_(buffer)


def keep_out_of_ddp(model: nn.Module, param: nn.Parameter) -> bool:
    """Prepare `param`, a trainable parameter of `model` that is used after the forward (ADA-DEFT's logits, read by
    the density loss), for `DistributedDataParallel(model)`.

    DDP with find_unused_parameters=True (the HF Trainer's default for a PEFT model) marks every parameter that the
    forward's outputs do not reach as unused and ready at the end of the forward; the gradient that backward then
    brings fails with "Expected to mark a variable ready only once". So DDP is told to ignore `param`
    (`model._ddp_params_and_buffers_to_ignore`, read when DDP wraps `model`: call this before), and a hook averages
    its gradient over the processes each time backward accumulates it: the average of the sums over micro-batches
    equals the sum of their averages, so gradient accumulation (DDP's no_sync) changes nothing. Returns whether it
    changed anything (False when `param` is not a parameter of `model`, or was already kept out)."""
    name = next((n for n, p in model.named_parameters() if p is param), None)
    if name is None:
        return False
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    if name in ignored and getattr(param, "_deft_ddp_average", False):
        return False
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(set(ignored) | {name}))
    if not getattr(param, "_deft_ddp_average", False):
        param.register_post_accumulate_grad_hook(_average_gradient)
        param._deft_ddp_average = True
    return True


def _average_gradient(param: torch.Tensor) -> None:
    if param.grad is not None and is_distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(param.grad)
        param.grad.div_(torch.distributed.get_world_size())
