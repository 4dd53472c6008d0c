"""`axolotl train CONFIG` (python -m axolotl.cli.train CONFIG) under FSDP2 on CPU processes, for test_fsdp.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 axolotl_fsdp_launch.py CONFIG.yml

ACCELERATE_USE_CPU=true (what `accelerate launch --cpu` sets; Axolotl has no `use_cpu` setting): without it
accelerate's PartialState gives a process without a GPU DistributedType.NO, and transformers' Trainer refuses FSDP
("Using fsdp only works in distributed training"); with it, MULTI_CPU on gloo. Then two patches of third-party code,
in these processes only, before Axolotl's modules are imported; then Axolotl's own CLI module runs as
`python -m axolotl.cli.train` runs it:

1. accelerate: fsdp_worker.force_fsdp_on_cpu(), as for the HF Trainer FSDP runs: AcceleratorState.__init__ is
   wrapped so that a MULTI_CPU state given an FSDP plugin becomes DistributedType.FSDP with that plugin (accelerate
   switches to FSDP only for GPU-like backends), with ACCELERATE_TORCH_DEVICE=cpu, and FSDP is written into
   PartialState's shared state too, as accelerate's own GPU path ends
   (`PartialState._shared_state["distributed_type"] = self.distributed_type`). Axolotl constructs AcceleratorState()
   again after the trainer is built, and each construction copies PartialState's shared state over the
   accelerator's: without that line the state falls back to MULTI_CPU before the first step (the model stays
   sharded, but accelerator.is_fsdp2 turns False for the backward, clipping and saving).
2. Axolotl 0.19: `axolotl.utils.distributed.build_parallelism_config` (called by the model loader to build the
   FSDP2 device mesh) calls `ParallelismConfig.build_device_mesh("cuda")` unconditionally, and torch's
   init_device_mesh then calls torch.cuda.set_device. The wrapper runs the same function with
   build_device_mesh's device type "cuda" replaced by "cpu" (the mesh's ranks, dimensions and names unchanged).
   loaders/model.py and core/builders/base.py bind the name at import, so it is replaced before they are imported.

Everything else (config validation, the DEFT plugin, the trainer, fully_shard, the optimizer, saving) is Axolotl's,
accelerate's and transformers' own code.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys

from fsdp_worker import force_fsdp_on_cpu  # this folder is sys.path[0] when run as a script

def build_device_mesh_on_cpu() -> None:
    """Patch 2 (see the module docstring)."""
    import axolotl.utils.distributed as distributed
    from accelerate.utils import ParallelismConfig

    assert "axolotl.loaders.model" not in sys.modules, "patch before Axolotl's model loader binds the name"
    original = distributed.build_parallelism_config

    @functools.wraps(original)
    def build_parallelism_config_on_cpu(cfg):
        build = ParallelismConfig.build_device_mesh

        def build_on_cpu(self, device_type):
            return build(self, "cpu" if device_type == "cuda" else device_type)

        ParallelismConfig.build_device_mesh = build_on_cpu
        try:
            return original(cfg)
        finally:
            ParallelismConfig.build_device_mesh = build

    distributed.build_parallelism_config = build_parallelism_config_on_cpu


if __name__ == "__main__":
    os.environ["ACCELERATE_USE_CPU"] = "true"
    force_fsdp_on_cpu()
    build_device_mesh_on_cpu()
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)
