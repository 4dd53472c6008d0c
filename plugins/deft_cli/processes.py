"""How the `deft` commands run: quietly, and with their training subprocesses ending when the command ends.

- peft and accelerate import optional backends whenever they are installed, and these print at import:
  bitsandbytes on some CPUs ("Failed to load CPU gemm_4bit_forward from kernels-community"), torchao (libraries it
  cannot load, torch.compile deprecations; Axolotl installs it) and DeepSpeed 0.18 ("Setting accelerator to CPU").
  The quantisation backends are needed only by a quantised model, DeepSpeed by none of the commands, so the
  command marks them absent before anything imports peft (`quiet_imports`), and the training subprocesses do the
  same.
- Messages that say nothing to a `deft` user and still print where those packages are imported anyway (a
  quantised model needs bitsandbytes; another caller may have imported DeepSpeed) or that come from the packages
  the commands use (peft asks transformers' deprecated `is_gradient_checkpointing`) are silenced one by one, by
  their exact source and text (`quiet_messages`, `QUIET_WARNINGS`, `QUIET_LOG_RECORDS`); nothing else is.
- `deft demo` and `deft bench` train in spawned subprocesses (`in_subprocess`). A SIGTERM of the command
  (`kill PID`) ends them first, then the command (`ending_children_on_sigterm`). A Ctrl-C (KeyboardInterrupt)
  reaches the command only: the subprocess ignores SIGINT, and the command kills it before the KeyboardInterrupt
  goes on. A subprocess whose command is gone however it ended (`kill -9` included, where nothing in the command
  runs) ends itself: on Linux the kernel sends it SIGKILL (PR_SET_PDEATHSIG), elsewhere a thread in it notices.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time
import warnings

QUANTISATION_PACKAGES = ("bitsandbytes", "torchao")  # needed only to load a quantised model
UNUSED_PACKAGES = ("deepspeed",)  # no `deft` command trains with it
# (category, message start, module that warns) of the Python warnings silenced, each on its own
QUIET_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),  # asked by peft
)
# logger name -> starts of the messages of that logger silenced (the logger's other messages still show)
QUIET_LOG_RECORDS = {
    "DeepSpeed": ("Setting accelerator to CPU",),  # deepspeed.accelerator.real_accelerator, at import
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),  # at import, on AVX512-BF16 CPUs
}
_CHILD_EXIT_SECONDS = 5  # how long a SIGTERM waits for the training subprocesses before it kills them
_PARENT_POLL_SECONDS = 0.5  # how often a subprocess checks that its command is still there (where no prctl)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def is_quantised(model_dir) -> bool:
    """Whether the model folder's config.json declares a quantisation (then bitsandbytes may be needed)."""
    config = pathlib.Path(model_dir) / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        return False
    try:
        return "quantization_config" in json.loads(config.read_text())
    except ValueError:
        return False  # transformers reports an unreadable config.json itself, with its path


class _DropMessages(logging.Filter):
    """A logger's filter that drops the records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def _silence_messages() -> list[tuple[logging.Logger, logging.Filter]]:
    """Install the filters of QUIET_WARNINGS and QUIET_LOG_RECORDS; the logging filters added (to remove)."""
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    added = []
    for name, starts in QUIET_LOG_RECORDS.items():
        logger, drop = logging.getLogger(name), _DropMessages(starts)
        logger.addFilter(drop)  # kept when the package configures its logger later (it adds handlers only)
        added.append((logger, drop))
    return added


@contextlib.contextmanager
def quiet_messages():
    """Within: the third-party messages of QUIET_WARNINGS and QUIET_LOG_RECORDS are not shown (each matched by
    its source and text, nothing else); on exit the filters are taken off again."""
    with warnings.catch_warnings():
        added = _silence_messages()
        try:
            yield
        finally:
            for logger, drop in added:
                logger.removeFilter(drop)


@contextlib.contextmanager
def quiet_imports(*model_dirs):
    """Within: the optional backends not yet imported are marked absent (the quantisation ones unless one of
    `model_dirs` is quantised), so peft and accelerate find them absent and nothing prints at import, and the
    messages of `quiet_messages` are silenced. On exit the marks are taken off again, so a caller of `main()`
    (e.g. a test) keeps its own imports."""
    quantised = any(is_quantised(d) for d in model_dirs)
    marked = [p for p in UNUSED_PACKAGES + (() if quantised else QUANTISATION_PACKAGES) if p not in sys.modules]
    for package in marked:
        sys.modules[package] = None  # `import` raises ImportError, find_spec finds nothing
    try:
        with quiet_messages():
            yield
    finally:
        for package in marked:
            if sys.modules.get(package, ...) is None:
                del sys.modules[package]


def _kill_on_parent_death() -> bool:
    """Linux: the kernel sends this process SIGKILL when its parent ends. Whether that could be arranged. (The
    kernel's parent is the thread that started this process: in_subprocess's caller, which waits for it.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_gone(parent_pid: int) -> bool:
    if os.name == "nt":  # getppid() keeps the creator's pid there; the parent's process handle tells
        parent = multiprocessing.parent_process()
        return parent is not None and not parent.is_alive()
    return os.getppid() != parent_pid  # an orphan is adopted by another process


def _end_when_parent_ends(parent_pid: int) -> None:
    """Everywhere: a daemon thread ends this process once its parent is gone."""

    def watch():
        while not _parent_gone(parent_pid):
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="deft-parent-watch", daemon=True).start()


def _start_child(absent: list[str], parent_pid: int) -> None:
    """The subprocess's first code (the pool's initializer): it never outlives the command, leaves Ctrl-C to it,
    and marks the packages absent that the command marks."""
    # A Ctrl-C in a terminal reaches the whole process group; the command ends this process itself. SIGINT is
    # blocked from before this process started (in_subprocess): ignored first, then unblocked, a pending one is lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _kill_on_parent_death()
    if _parent_gone(parent_pid):  # the parent ended before the prctl above: nobody waits for this process
        os._exit(1)
    _end_when_parent_ends(parent_pid)
    for package in absent:
        sys.modules.setdefault(package, None)
    _silence_messages()  # for good: this process ends with its task


@contextlib.contextmanager
def _sigint_blocked():
    """Within: SIGINT is held back from this thread, and a process it starts begins with SIGINT blocked (the mask
    is inherited), so a Ctrl-C while it starts cannot interrupt its imports. A SIGINT that arrives meanwhile is
    delivered to this process on exit."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _kill_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(_CHILD_EXIT_SECONDS)


# A subprocess killed on Ctrl-C cannot unregister the semaphores it made (tqdm's lock, the pool's queues);
# multiprocessing's resource tracker removes them when this process exits and says so, "resource_tracker: There appear
# to be 1 leaked semaphore objects to clean up at shutdown", after the command's last line. The tracker process takes
# its warning filters from sys.warnoptions when it starts (with the first subprocess): that one message is silenced
# there, the clean-up itself is not.
TRACKER_LEAK_WARNING = "ignore:resource_tracker:UserWarning"


def in_subprocess(fn, *args):
    """fn(*args) in a fresh interpreter: its peak memory is its own, and runs cannot disturb each other. It imports
    as quietly as this process (quiet_imports). The subprocess ends with this process however it ends, and a
    KeyboardInterrupt here kills it before it goes on."""
    if TRACKER_LEAK_WARNING not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_LEAK_WARNING)
    context = multiprocessing.get_context("spawn")
    absent = [p for p in UNUSED_PACKAGES + QUANTISATION_PACKAGES if p in sys.modules and sys.modules[p] is None]
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start_child,
                                                initargs=(absent, os.getpid())) as pool:
        try:
            with _sigint_blocked():
                future = pool.submit(fn, *args)  # starts the subprocess
            return future.result()
        except BaseException as err:
            if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: the subprocess may still run
                _kill_workers(pool)
            raise


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
