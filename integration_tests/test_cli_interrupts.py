"""A `deft` command's training subprocess (`in_subprocess`) never outlives the command: not when the command is
killed with SIGKILL (nothing in the command can run then), and not on Ctrl-C, which also ends the command with one
line on stderr and exit status 130 instead of a KeyboardInterrupt traceback, and leaves no empty output folder."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from fixtures import save_model_dir, write_labelled_jsonl
from processes import subprocess_env

psutil = pytest.importorskip("psutil")

# The function the worker runs: it makes a semaphore (as tqdm's lock or a DataLoader's queue do; a worker killed on
# Ctrl-C never unregisters it), writes its pid where the test finds it, then blocks for good.
BLOCKER = '''
import multiprocessing
import os
import pathlib
import time


def block(pid_file):
    lock = multiprocessing.get_context("spawn").Lock()
    pathlib.Path(pid_file).write_text(str(os.getpid()))
    time.sleep(3600)
'''

# A `deft`-like command: the real `deft` entry point (`deft_cli.cli.main`) with one more command, `block`, whose
# handler runs the blocking function in a worker as `deft demo` runs its trainings.
COMMAND = '''
import sys

sys.path.insert(0, {tmp!r})
import blocker
from deft_cli import cli
from deft_cli.processes import in_subprocess

build_parser = cli.build_parser


def with_block_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    block = commands.add_parser("block")
    block.set_defaults(handler=lambda args: in_subprocess(blocker.block, {pid_file!r}))
    return parser


cli.build_parser = with_block_command
sys.exit(cli.main(["block"]))
'''


def sigint_as_in_a_terminal() -> None:
    """Run in the child before exec: SIGINT back to its default. A test run started in the background (`cmd &` in a
    script, as CI may be) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_command(tmp_path: pathlib.Path, **popen) -> tuple[subprocess.Popen, pathlib.Path]:
    (tmp_path / "blocker.py").write_text(BLOCKER)
    pid_file = tmp_path / "worker.pid"
    script = COMMAND.format(tmp=str(tmp_path), pid_file=str(pid_file))
    command = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal, **popen)
    return command, pid_file


def training_children(parent: psutil.Process) -> list[psutil.Process]:
    """The worker subprocesses; spawn also starts a resource tracker, which is no worker."""
    children = []
    for child in parent.children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


def wait_for(condition, timeout: float, what: str, command: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if command.poll() is not None:
            pytest.fail(f"the command ended before {what}: {command.returncode}, {command.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s")


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie (an orphan's exit status is collected by whatever adopted it, which may be slow to)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_ends(processes: list[psutil.Process], timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(ended(p) for p in processes):
        time.sleep(0.1)
    alive = [p for p in processes if not ended(p)]
    for process in alive:
        process.kill()  # leave no orphan behind a failing test
    assert alive == [], f"still running after the command ended: {alive}"


@pytest.mark.parametrize("when", ["running", "starting"])
def test_sigkill_of_the_command_ends_its_worker(tmp_path, when):
    """`kill -9` of the command: its worker, blocked in its task (or still starting), ends within seconds."""
    command, pid_file = start_command(tmp_path)
    try:
        parent = psutil.Process(command.pid)
        if when == "running":
            wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 120, "worker running its task", command)
            workers = [psutil.Process(int(pid_file.read_text()))]
        else:
            workers = wait_for(lambda: training_children(parent), 120, "worker process", command)
        command.kill()
        command.wait(timeout=10)
        assert_ends(workers)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


@pytest.mark.parametrize("to", ["command", "process group"])
def test_ctrl_c_prints_one_line_exits_130_and_ends_the_worker(tmp_path, to):
    """SIGINT to the command (`kill -INT`), or to its whole process group as Ctrl-C in a terminal sends it (the
    worker gets it too): one line, status 130, no worker left."""
    command, pid_file = start_command(tmp_path, start_new_session=True)
    worker = None
    try:
        wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 120, "worker running its task", command)
        worker = psutil.Process(int(pid_file.read_text()))
        if to == "command":
            command.send_signal(signal.SIGINT)
        else:
            os.killpg(command.pid, signal.SIGINT)
        _, stderr = command.communicate(timeout=30)
        assert stderr.lstrip("\n").splitlines() == ["deft block: interrupted"]  # on a line of its own
        assert command.returncode == 130
        assert_ends([worker])
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
        if worker is not None and not ended(worker):
            worker.kill()  # a failing test leaves no orphan


def test_ctrl_c_of_the_demo(tmp_path):
    """A real `deft demo`, Ctrl-C (SIGINT to its process group) while its training subprocess trains."""
    pytest.importorskip("peft")
    model = save_model_dir("bert", tmp_path / "bert", task="cls")
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    demo = subprocess.Popen([sys.executable, "-m", "deft_cli.cli", "demo", "--model", str(model), "--data", str(data),
                             "--out", str(tmp_path / "out"), "--steps", "100000", "--batch-size", "4",
                             "--max-length", "16", "--train-size", "24", "--eval-size", "8"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    try:
        parent = psutil.Process(demo.pid)
        children = wait_for(lambda: training_children(parent), 120, "training subprocess", demo)
        time.sleep(3)  # into training
        os.killpg(demo.pid, signal.SIGINT)
        _, stderr = demo.communicate(timeout=30)
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == "deft demo: interrupted", stderr
        assert demo.returncode == 130
        assert_ends(children)
        assert not (tmp_path / "out").exists()  # made only when there is something to write
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
