"""How the `deft` commands run: quietly, and with their training subprocesses ending when the command ends.

- peft imports bitsandbytes whenever it is installed, and bitsandbytes prints warnings at import on some CPUs
  (e.g. "Failed to load CPU gemm_4bit_forward from kernels-community"), once per process. A model that is not
  quantised does not need it, so the command marks it absent before anything imports peft (`quiet_imports`), and
  the training subprocesses do the same.
- `deft demo` and `deft bench` train in spawned subprocesses (`in_subprocess`). A SIGTERM of the command
  (`kill PID`) ends them first, then the command (`ending_children_on_sigterm`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import pathlib
import signal
import sys
import threading

QUANTISATION_PACKAGE = "bitsandbytes"
_CHILD_EXIT_SECONDS = 5  # how long a SIGTERM waits for the training subprocesses before it kills them


def is_quantised(model_dir) -> bool:
    """Whether the model folder's config.json declares a quantisation (then bitsandbytes may be needed)."""
    config = pathlib.Path(model_dir) / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        return False
    try:
        return "quantization_config" in json.loads(config.read_text())
    except ValueError:
        return False  # transformers reports an unreadable config.json itself, with its path


def quiet_imports(*model_dirs) -> None:
    """Keep bitsandbytes unimported in this process unless one of `model_dirs` is quantised: peft then finds no
    bitsandbytes (it imports it only to support quantised layers) and nothing prints at import."""
    if QUANTISATION_PACKAGE in sys.modules or any(is_quantised(d) for d in model_dirs):
        return
    sys.modules[QUANTISATION_PACKAGE] = None  # `import bitsandbytes` raises ImportError; find_spec finds nothing


def _start_child(quiet: bool) -> None:
    if quiet:
        quiet_imports()


def in_subprocess(fn, *args):
    """fn(*args) in a fresh interpreter: its peak memory is its own, and runs cannot disturb each other. It imports
    as quietly as this process (quiet_imports)."""
    context = multiprocessing.get_context("spawn")
    quiet = sys.modules.get(QUANTISATION_PACKAGE, ...) is None
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_child,
                                                initargs=(quiet,)) as pool:
        return pool.submit(fn, *args).result()


@contextlib.contextmanager
def ending_children_on_sigterm():
    """Within: a SIGTERM ends this process's subprocesses (SIGTERM, then SIGKILL after a few seconds), then this
    process, by SIGTERM as before. Outside the main thread signals cannot be handled, so nothing changes there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def end_children_then_self(signum, frame):
        children = multiprocessing.active_children()
        for child in children:
            child.terminate()
        for child in children:
            child.join(_CHILD_EXIT_SECONDS)
            if child.is_alive():
                child.kill()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, end_children_then_self)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
