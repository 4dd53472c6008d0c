"""Helpers for training on several processes, for every adapter: summing counts over the processes of a
torch.distributed group, which process writes files, and gathering a DeepSpeed ZeRO-3 partitioned parameter.

Each one is a no-op (or the single-process answer) when torch.distributed is not initialised or the parameter is
not partitioned, so callers never check for distributed training or DeepSpeed themselves.
"""

from __future__ import annotations

import contextlib

import torch


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


def gathered(param: torch.Tensor, modifier_rank: int | None = None):
    """A context in which a ZeRO-3 partitioned `param` holds its full data (a no-op for any other tensor); with
    `modifier_rank`, that rank's changes are written back to every partition on exit. A collective under ZeRO-3."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed  # only reached for a parameter DeepSpeed partitioned, so it is installed and imported

    return deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank)
