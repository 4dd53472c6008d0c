"""Environment for the tests that run DEFT in a subprocess (DeepSpeed workers, Axolotl, the examples).

    env = subprocess_env()                # PYTHONPATH with the source tree, single-process torch.distributed
    subprocess.run([sys.executable, script, ...], env=env)
"""

from __future__ import annotations

import os
import pathlib
import socket
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict:
    """os.environ plus: the source tree on PYTHONPATH (deft_common, deft_hf, ... importable without installing),
    the variables of a one-process torch.distributed group on a free port, and a DeepSpeed JIT op cache per
    version (a cache built by another deepspeed fails with AttributeError at import)."""
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    try:
        deepspeed = version("deepspeed")
    except PackageNotFoundError:
        deepspeed = "none"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-deepspeed{deepspeed}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(pathlib.Path(tempfile.gettempdir()) / "deft_torch_extensions" / tag))
    return env
