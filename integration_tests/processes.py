"""Environment for the tests that run DEFT in a subprocess (DeepSpeed workers, Axolotl, the examples), and the
end of a multi-process worker.

    env = subprocess_env()                # PYTHONPATH with the source tree, single-process torch.distributed
    subprocess.run([sys.executable, script, ...], env=env)

    end_distributed_worker()              # the last line of a torch.distributed.run worker
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
    the variables of a one-process torch.distributed group on a free port, a DeepSpeed JIT op cache per
    version (a cache built by another deepspeed fails with AttributeError at import), and PYTHONFAULTHANDLER, so
    that a process killed by a signal (SIGABRT, SIGSEGV) prints the Python stack of each thread into the output
    the test reports."""
    env = dict(os.environ)
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    try:
        deepspeed = version("deepspeed")
    except PackageNotFoundError:
        deepspeed = "none"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-deepspeed{deepspeed}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(pathlib.Path(tempfile.gettempdir()) / "deft_torch_extensions" / tag))
    return env


def end_distributed_worker() -> None:
    """The last call of a worker under torch.distributed.run, once rank 0 has saved the results.

    DDP keeps its own reference to the gloo group, so the group's threads (gloo_tcp_loop, pt_gloo_runloop) outlive
    destroy_process_group (measured, with a bare DDP module too) and are still running when the interpreter tears
    down at exit. A rank of the HF DDP worker was killed by SIGABRT ("terminate called without an active
    exception") after its training: in 3 of the last 7 full test runs, never in 108 launches of the worker on
    its own (60 of them beside a full test run); where exactly is not known. So: a barrier (no rank leaves while
    another still talks to it), the group destroyed as torch asks, output flushed, then os._exit(0), which ends
    the process without that teardown. A failure before this call still fails the worker, with its traceback;
    PYTHONFAULTHANDLER (subprocess_env) prints the Python stacks of a rank killed by a signal."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
