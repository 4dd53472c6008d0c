"""How the `deft` commands run: quietly, and with their training subprocesses ending when the command ends.

- peft and accelerate import optional backends whenever they are installed, and these print at import:
  bitsandbytes on some CPUs ("Failed to load CPU gemm_4bit_forward from kernels-community"), torchao (libraries it
  cannot load, torch.compile deprecations; Axolotl installs it) and DeepSpeed 0.18 ("Setting accelerator to CPU").
  The quantisation backends are needed only by a quantised model, DeepSpeed by none of the commands, so the
  command marks them absent before anything imports peft (`quiet_imports`), and the training subprocesses do the
  same.
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

QUANTISATION_PACKAGES = ("bitsandbytes", "torchao")  # needed only to load a quantised model
UNUSED_PACKAGES = ("deepspeed",)  # no `deft` command trains with it
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


@contextlib.contextmanager
def quiet_imports(*model_dirs):
    """Within: the optional backends not yet imported are marked absent (the quantisation ones unless one of
    `model_dirs` is quantised), so peft and accelerate find them absent and nothing prints at import. On exit the
    marks are taken off again, so a caller of `main()` (e.g. a test) keeps its own imports."""
    quantised = any(is_quantised(d) for d in model_dirs)
    marked = [p for p in UNUSED_PACKAGES + (() if quantised else QUANTISATION_PACKAGES) if p not in sys.modules]
    for package in marked:
        sys.modules[package] = None  # `import` raises ImportError, find_spec finds nothing
    try:
        yield
    finally:
        for package in marked:
            if sys.modules.get(package, ...) is None:
                del sys.modules[package]


def _start_child(absent: list[str]) -> None:
    for package in absent:
        sys.modules.setdefault(package, None)


def in_subprocess(fn, *args):
    """fn(*args) in a fresh interpreter: its peak memory is its own, and runs cannot disturb each other. It imports
    as quietly as this process (quiet_imports)."""
    context = multiprocessing.get_context("spawn")
    absent = [p for p in UNUSED_PACKAGES + QUANTISATION_PACKAGES if p in sys.modules and sys.modules[p] is None]
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_child,
                                                initargs=(absent,)) as pool:
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
