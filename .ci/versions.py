"""Print the versions of the frameworks a tox environment resolved to (absent ones say so)."""

from importlib.metadata import PackageNotFoundError, version

import torch

print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
for name in ("transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "bitsandbytes", "axolotl",
             "sentence-transformers", "pytest"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name} not installed")
