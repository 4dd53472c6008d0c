"""benchmarks/: the runner end to end on the fixture BERT and a tiny JSONL file (in process, seconds), its row
schema, table.py's tables and plot from the rows, and the crossover measurement on tiny shapes."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
from fixtures import write_labelled_jsonl

pytest.importorskip("peft")
from test_demo import bert_dir  # noqa: E402, F401  (the demo test's fixture model, reused)

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_runner_appends_one_row_and_table_renders_it(bert_dir, tmp_path, capsys):  # noqa: F811
    run, table = load("run"), load("table")
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    out = tmp_path / "results" / "rows.jsonl"
    job = ["--set", f"model={json.dumps(str(bert_dir))}", "--set", f"data={json.dumps(str(data))}",
           "--set", "steps=4", "--set", "batch_size=8", "--set", "max_length=16", "--set", "train_size=24",
           "--set", "eval_size=8", "--set", "grid=[0.9,0.99]", "--out", str(out), "--in-process"]
    for seed in (0, 1):
        run.main([*job, "--set", f"seed={seed}"])
    # a DEFT-only variant: compared with the PEFT run of the row with the same job and seed
    run.main([*job, "--set", "seed=0", "--set", "runs=deft", "--set", "deft.setpoint_dense_every=2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3

    row = rows[0]
    assert row["schema"] == run.SCHEMA == 1
    assert set(row) == {"schema", "name", "commit", "dirty", "date", "machine", "spec", "data", "figures",
                        "wall_seconds"}
    assert row["commit"] is None or len(row["commit"]) == 40
    assert set(row["machine"]) >= {"cpu", "torch_threads", "torch", "device"}
    spec = row["spec"]
    assert spec["seed"] == 0 and spec["settings"]["steps"] == 4 and spec["grid"] == [0.0, 0.9, 0.99]
    assert spec["deft_config"]["sparsity_setpoint"] == 0.995 and spec["deft_config"]["setpoint_ramp_steps"] == 2
    assert row["data"] == {"train_texts": 24, "held_out_texts": 8, "labels": [0, 1]}
    for name in ("peft", "deft"):
        figures = row["figures"][name]
        assert [p["sparsity"] for p in figures["frontier"]] == [0.0, 0.9, 0.99]
        assert figures["frontier"][0]["accuracy"] == figures["accuracy"]
        assert figures["train_seconds"] > 0 and figures["usable_sparsity"] in (None, 0.0, 0.9, 0.99)
    assert row["figures"]["peft"]["training_density"] is None and 0 < row["figures"]["deft"]["training_density"] < 1
    assert list(rows[2]["figures"]) == ["deft"] and rows[2]["figures"]["deft"]["usable_sparsity"] is None
    assert rows[2]["spec"]["deft_config"]["setpoint_dense_every"] == 2

    capsys.readouterr()
    text = table.main([str(out), "--at", "0.99", "--plot", "the demo default", "--plot-out", str(tmp_path / "f.png")])
    lines = text.splitlines()
    default = next(line for line in lines if line.startswith("| the demo default | 0,1 |"))
    assert "±" in default  # two seeds: mean ± sd
    assert any(line.startswith("| deft.setpoint_dense_every=2 | 0 |") for line in lines)
    peft0 = rows[0]["figures"]["peft"]
    assert any(line.startswith(f"| the demo default | 0 | {peft0['accuracy']:.3f} |") for line in lines)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crossover_runs_on_tiny_shapes():
    rows = load("crossover").measure_crossover(densities=(0.5,), rounds=1, tiny=True)
    assert {row["density"] for row in rows} == {0.5} and all(row["speedup"] > 0 for row in rows)


def test_runner_records_the_lm_job_and_its_failures(tmp_path):
    """`--set job=lm`: the LM job's row (both runs' perplexity frontiers at both capture points, DEFT's usable
    sparsity against the row's PEFT perplexity, the decode rows); a run that fails is a row too, and exit status 1."""
    pytest.importorskip("trl")
    from fixtures import save_model_dir
    from test_demo_lm import sft_records, write_jsonl

    run = load("run")
    model = save_model_dir("llama", tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    out = tmp_path / "lm.jsonl"
    job = ["--set", "job=lm", "--set", f"model={json.dumps(str(model))}", "--set", f"data={json.dumps(str(data))}",
           "--set", "batch_size=4", "--set", "max_length=48", "--set", "train_size=32", "--set", "eval_size=8",
           "--set", "calibration_texts=8", "--set", "decode_tokens=4", "--set", "decode_rounds=1",
           "--set", "grid=[0.5]", "--out", str(out), "--in-process"]
    row = run.main([*job, "--set", "steps=6", "--set", "learning_rate=0.01", "--name", "tiny"])
    assert row["job"] == "lm" and row["data"] == {"train_texts": 32, "held_out_texts": 8, "format": "chat"}
    assert row["spec"]["deft_config"]["sparsity_setpoint"] == 0.5 and row["spec"]["grid"] == [0.0, 0.5]
    peft, deft = row["figures"]["peft"], row["figures"]["deft"]
    for figures in (peft, deft):
        assert {(p["sparsity"], p["capture"]) for p in figures["frontier"]} == {
            (s, c) for s in (0.0, 0.5) for c in ("act", "down_in")}
        assert figures["perplexity"] < figures["base"]["perplexity"]
        assert set(figures["usable_sparsity"]) == {"act", "down_in"}
    assert {d["kernel"] for d in deft["decode"]} == {"dense", "mask", "sparse"} and "decode" not in peft
    assert 0 < deft["training_density"] < 1

    # a learning rate of 1e-12 cannot improve on the base model: PEFT is refused, DEFT not trained, the row kept
    with pytest.raises(SystemExit, match="peft: refused"):
        run.main([*job, "--set", "steps=2", "--set", "learning_rate=1e-12", "--name", "no learning"])
    failed = json.loads(out.read_text().splitlines()[-1])
    assert failed["name"] == "no learning" and list(failed["figures"]) == ["peft"]
    assert failed["figures"]["peft"]["failure"].startswith("refused: ")

    text = load("table").main([str(out)])  # the LM job's tables: the row, and the failure listed
    assert any(line.startswith("| tiny | 0 | ") for line in text.splitlines())
    assert "failed runs:" in text and "- no learning, seed 0: peft: refused: " in text
