"""The examples in examples/, run the way a user runs them (`python examples/<name>.py ...` in a subprocess, after
`python examples/make_tiny_model.py`), so that they cannot rot. Each example prints the logged DEFT density of its
first and last log; with DEFT on it must fall, and end below the same run with `--coef 0` (density measured only).

The tiny model is the ReLU OPT fixture: its MLP activations have exact zeros, so the density (|a| > 0) responds
within the examples' 30 steps.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
from processes import ROOT, subprocess_env

EXAMPLES = ROOT / "examples"
DENSITY_LINE = re.compile(r"^deft/density: ([0-9.]+) \(first log\) -> ([0-9.]+) \(last log\)$", re.MULTILINE)


def _run(args: list[str], cwd: pathlib.Path = ROOT) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args} failed:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("deft-tiny")
    _run([str(EXAMPLES / "make_tiny_model.py"), str(folder), "--family", "opt"])
    return folder


def _densities(script: str, tiny: pathlib.Path, coef: float, *extra: str) -> tuple[float, float]:
    """(first, last) logged deft/density of one run of examples/<script> on the tiny model."""
    output = _run([str(EXAMPLES / script), "--model", str(tiny / "model"), "--data", str(tiny / "text.jsonl"),
                   "--coef", str(coef), *extra])
    match = DENSITY_LINE.search(output)
    assert match, f"examples/{script} printed no density line:\n{output[-3000:]}"
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("script,needs", [("hf_trainer.py", "peft"), ("trl_sft.py", "trl"),
                                          ("deepspeed_loop.py", "deepspeed")])
def test_example_lowers_density_below_training_without_deft(script, needs, tiny, tmp_path):
    if importlib.util.find_spec(needs) is None:
        pytest.skip(f"examples/{script} needs {needs}, which this environment does not have")
    # the raw DeepSpeed loop writes nothing (its config is examples/deepspeed_zero2.json, ZeRO-2)
    extra = [] if script == "deepspeed_loop.py" else ["--output-dir", str(tmp_path / "out")]
    first, last = _densities(script, tiny, 1.0, *extra)
    _, last_without_deft = _densities(script, tiny, 0.0, *extra)
    assert 0.0 < last < first <= 1.0
    assert last < 0.8 * last_without_deft, (first, last, last_without_deft)


def test_axolotl_example_trains_and_logs_density(tmp_path):
    """examples/axolotl/deft_lora.yml through `python -m axolotl.cli.train` (what `axolotl train` runs), on the tiny
    Llama it expects, with /tmp/deft-tiny/ pointed at a temporary folder."""
    if importlib.util.find_spec("axolotl") is None:
        pytest.skip("examples/axolotl/deft_lora.yml needs axolotl (the axolotl test environment)")
    _run([str(EXAMPLES / "make_tiny_model.py"), str(tmp_path)])
    config = tmp_path / "deft_lora.yml"
    config.write_text((EXAMPLES / "axolotl" / "deft_lora.yml").read_text().replace("/tmp/deft-tiny/", f"{tmp_path}/"))
    output = _run(["-m", "axolotl.cli.train", str(config)], cwd=tmp_path)
    logs = re.findall(r"'deft/density': '?([0-9.e-]+)'?", output)
    assert len(logs) == 10, output[-3000:]  # max_steps: 10, logging_steps: 1
    assert all(0.0 < float(value) <= 1.0 for value in logs)
    assert "DEFT: MLP activation density" in output  # the plugin's summary after training
