"""The `deft` command as a user starts it, in a subprocess: it starts quietly (no third-party warnings, bitsandbytes
not imported for a model that is not quantised), the demo prints where its whole run stands, and a plain SIGTERM
ends its training subprocesses too."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from fixtures import save_model_dir, write_labelled_jsonl
from processes import subprocess_env

psutil = pytest.importorskip("psutil")
pytest.importorskip("peft")

DEFT = [sys.executable, "-m", "deft_cli.cli"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_model_dir("bert", tmp_path_factory.mktemp("models") / "bert", task="cls")


def messages(stderr: str) -> list[str]:
    """The lines of `stderr` other than progress bars (tqdm redraws them with carriage returns)."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line and not PROGRESS_BAR.search(line)]


PROGRESS_BAR = re.compile(r"\d+%\|.*\| \d+/\d+ \[")


def test_help_prints_nothing_on_stderr():
    done = subprocess.run([*DEFT, "--help"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout
    assert done.stderr == ""


def test_density_imports_no_bitsandbytes_and_warns_nothing(bert_dir, tmp_path):
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes warns at import on some CPUs; the
    command keeps it out for a model that is not quantised (the warning itself needs such a CPU to show)."""
    data = write_labelled_jsonl(tmp_path / "texts.jsonl", n=8)
    # peft is imported inside the command's quiet_imports (the marks end with the command), as a command would.
    script = ("import sys\nfrom deft_cli.cli import main\nfrom deft_cli.processes import quiet_imports\n"
              "with quiet_imports():\n    code = main(sys.argv[1:])\n    import peft\n"
              "    print('bitsandbytes loaded:', sys.modules.get('bitsandbytes') is not None)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "density", str(bert_dir), "--data", str(data),
                           "--max-length", "16"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes loaded: False" in done.stdout
    assert messages(done.stderr) == []


def test_demo_prints_progress_and_no_third_party_warnings(bert_dir, tmp_path):
    """`deft demo` as a user runs it: on stderr only the progress bars and the overall line after each of the
    six phases (peft's is_gradient_checkpointing FutureWarning, DeepSpeed's and bitsandbytes' notices silenced)."""
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    done = subprocess.run([*DEFT, "demo", "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                           "--steps", "3", "--batch-size", "8", "--max-length", "16", "--train-size", "24",
                           "--eval-size", "8"], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = messages(done.stderr)
    assert lines[0].startswith("overall: 6 phases (PEFT training, PEFT evaluation, PEFT frontier, DEFT training")
    overall = [line for line in lines[1:] if line.startswith("overall: ")]
    assert [line.split(" phases done")[0] for line in overall] == [f"overall: {i} of 6" for i in range(1, 7)]
    assert all(" left" in line for line in overall[:-1]) and overall[-1].endswith("all done")
    assert [line for line in lines[1:] if not line.startswith("overall: ")] == []
    assert "Accuracy-sparsity frontier" in done.stdout


def test_sigterm_of_the_demo_ends_its_training_subprocess(bert_dir, tmp_path):
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    demo = subprocess.Popen([*DEFT, "demo", "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                             "--steps", "100000", "--batch-size", "4", "--max-length", "16", "--train-size", "24",
                             "--eval-size", "8"], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        parent = psutil.Process(demo.pid)
        deadline = time.monotonic() + 120
        children = []
        while not children and time.monotonic() < deadline and demo.poll() is None:
            # the training subprocess; spawn also starts a resource tracker, which is no training child
            children = [c for c in parent.children(recursive=True)
                        if "multiprocessing.resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert children, f"the demo started no training subprocess: {demo.poll()=}, {demo.stderr.read() if demo.poll() is not None else ''}"
        time.sleep(2)  # into training
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=20) == -signal.SIGTERM
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"still running after the demo was stopped: {alive}"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_main_in_process_leaves_the_callers_imports(bert_dir, tmp_path):
    """The backends marked absent while a command runs are importable again afterwards (tests call main())."""
    import importlib.util

    from deft_cli.cli import main
    from deft_cli.processes import QUANTISATION_PACKAGES, UNUSED_PACKAGES

    installed = [p for p in UNUSED_PACKAGES + QUANTISATION_PACKAGES if p not in sys.modules and
                 importlib.util.find_spec(p) is not None]
    data = write_labelled_jsonl(tmp_path / "texts.jsonl", n=8)
    assert main(["density", str(bert_dir), "--data", str(data), "--max-length", "16"]) == 0
    assert [p for p in installed if importlib.util.find_spec(p) is None] == []
