"""examples/axolotl/deft_lm_sft.yml, the DEFT run of `deft demo --job lm` through Axolotl, run the way its header
says (`python -m deft_cli.demo.lm_data`, then `python -m axolotl.cli.train`), on the tiny fixture Llama (its
tokenizer has a chat template) and tiny prompt/completion data, with /tmp/deft-lm/ pointed at a temporary folder
and the steps (and the set-point's ramp) cut to a few."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from fixtures import make_texts, save_model_dir
from processes import ROOT, subprocess_env

EXAMPLE = ROOT / "examples" / "axolotl" / "deft_lm_sft.yml"
STEPS, RAMP = 6, 3


def _run(args, cwd) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args} failed:\n{output[-6000:]}"
    return output


def test_lm_data_writes_the_training_records_as_chat_messages(tmp_path):
    records = [{"prompt": f"Write story {i}.", "completion": text} for i, text in enumerate(make_texts(40))]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from deft_cli.demo.lm_data import main

    assert main([str(tmp_path / "sft.jsonl"), "--data", str(tmp_path / "pc.jsonl"), "--train-size", "24",
                 "--eval-size", "8"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    assert all([m["role"] for m in line["messages"]] == ["user", "assistant"] for line in lines)
    by_prompt = {r["prompt"]: r["completion"] for r in records}
    assert all(by_prompt[line["messages"][0]["content"]] == line["messages"][1]["content"] for line in lines)


def test_the_example_deft_block_is_the_demos_deft_run():
    """The YAML's `deft:` block and its max_steps are the LM job's defaults (deft_cli.demo.lm_deft_config)."""
    yaml = pytest.importorskip("yaml")
    from deft_cli.demo import LmSettings, lm_deft_config

    example = yaml.safe_load(EXAMPLE.read_text())
    assert example["max_steps"] == LmSettings().steps
    expected = lm_deft_config(example["max_steps"]).to_dict()
    assert {key: expected[key] for key in example["deft"]} == example["deft"]


def test_axolotl_lm_example_trains_with_the_setpoint(tmp_path):
    if importlib.util.find_spec("axolotl") is None:
        pytest.skip("examples/axolotl/deft_lm_sft.yml needs axolotl (the axolotl test environment)")
    save_model_dir("llama", tmp_path / "model")
    records = [{"prompt": "Write a happy story." if i % 2 else "Write a sad story.", "completion": text}
               for i, text in enumerate(make_texts(40))]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _run(["-m", "deft_cli.demo.lm_data", str(tmp_path / "sft.jsonl"), "--data", str(tmp_path / "pc.jsonl"),
          "--train-size", "24", "--eval-size", "8"], cwd=tmp_path)
    text = EXAMPLE.read_text().replace("/tmp/deft-lm/", f"{tmp_path}/")
    for key, value in (("max_steps", STEPS), ("setpoint_ramp_steps", RAMP), ("warmup_steps", 1)):
        text, count = re.subn(rf"^(\s*{key}: )\d+", rf"\g<1>{value}", text, flags=re.MULTILINE)
        assert count == 1, key
    config = tmp_path / "deft_lm_sft.yml"
    config.write_text(text)
    output = _run(["-m", "axolotl.cli.train", str(config)], cwd=tmp_path)
    densities = re.findall(r"'deft/density': '?([0-9.e-]+)'?", output)
    setpoints = [float(v) for v in re.findall(r"'deft/sparsity_setpoint': '?([0-9.e-]+)'?", output)]
    assert len(densities) == STEPS, output[-3000:]  # max_steps, logging_steps: 1
    assert setpoints and max(setpoints) == pytest.approx(0.5) and setpoints[0] < 0.5  # ramped to the set-point
    assert "DEFT: MLP activation density" in output
