"""`deft sparsify`, `deft density --thresholds` and the accuracy–sparsity frontier on fixture models."""

import json

import pytest
import torch

from deft_cli.cli import main
from deft_cli.frontier import SPARSITY_GRID, accuracy_frontier, usable_sparsity
from deft_common import SparsityThresholds
from fixtures import make_batch, make_model, save_model_dir, write_text_jsonl

pytest.importorskip("peft")


def _run_json(capsys, argv) -> dict:
    capsys.readouterr()  # drop what building the fixtures printed (e.g. DeepSpeed's accelerator notice)
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_sparsify_writes_thresholds_and_reports_held_out_figures(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "llama")
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=48)
    result = _run_json(capsys, ["sparsify", str(model_dir), "--data", str(data), "--sparsity", "0.8",
                                "--max-length", "32", "--json"])
    assert result["thresholds_file"] == str(model_dir / "deft_thresholds.json")  # default: the model folder
    thresholds = SparsityThresholds.load(model_dir)
    assert [layer["layer"] for layer in result["layers"]] == list(thresholds.thresholds)
    assert result["calibration_texts"] == result["held_out_texts"] == 24
    for layer in result["layers"]:
        assert layer["threshold"] == thresholds.thresholds[layer["layer"]] > 0
        assert layer["calibrated_density"] == pytest.approx(0.2, abs=1e-6)
        assert abs(layer["held_out_density"] - 0.2) < 0.06
        assert 0 < layer["relative_error"] < 1
    ppl = result["perplexity"]
    assert ppl["dense"] > 1 and ppl["sparse"] > 1 and ppl["sparse"] != ppl["dense"]

    dense = _run_json(capsys, ["density", str(model_dir), "--data", str(data), "--max-length", "32",
                               "--threshold", "0", "--json"])
    sparse = _run_json(capsys, ["density", str(model_dir), "--data", str(data), "--max-length", "32",
                                "--threshold", "0", "--thresholds", str(model_dir), "--json"])
    assert dense["density"] > 0.99
    assert abs(sparse["density"] - 0.2) < 0.06


def test_down_in_thresholds_are_measured_at_the_down_projection_input(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "llama")
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=48)
    result = _run_json(capsys, ["sparsify", str(model_dir), "--data", str(data), "--sparsity", "0.9",
                                "--capture", "down_in", "--max-length", "32", "--json"])
    for layer in result["layers"]:
        assert abs(layer["held_out_density"] - 0.1) < 0.05, layer
    measured = _run_json(capsys, ["density", str(model_dir), "--data", str(data), "--max-length", "32",
                                  "--threshold", "0", "--thresholds", str(model_dir), "--json"])
    assert abs(measured["density"] - 0.1) < 0.05


def test_sparsify_says_when_it_replaces_a_thresholds_file(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "llama")
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=16)
    argv = ["sparsify", str(model_dir), "--data", str(data), "--sparsity", "0.5", "--max-length", "16", "--json"]
    _run_json(capsys, argv)
    assert "replaced" not in capsys.readouterr().err
    assert main(argv) == 0
    assert f"replaced the deft_thresholds.json that was in {model_dir}; give --out DIR" in capsys.readouterr().err


def test_sparsify_bad_input(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "llama")
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=8)
    assert main(["sparsify", str(model_dir), "--data", str(data), "--sparsity", "1.0"]) == 2
    assert "[0, 1)" in capsys.readouterr().err
    assert main(["density", str(model_dir), "--data", str(data), "--thresholds", str(tmp_path)]) == 2
    assert "deft_thresholds.json" in capsys.readouterr().err


def test_frontier_density_falls_with_the_grid_and_usable_sparsity():
    model = make_model("bert").eval()
    calibration = [make_batch("bert", batch_size=4, seq_len=16, seed=s) for s in range(4)]
    scored = [make_batch("bert", batch_size=4, seq_len=16, seed=s) for s in range(100, 104)]
    frontier = accuracy_frontier(model, model, calibration, scored)
    assert [p["sparsity"] for p in frontier] == list(SPARSITY_GRID)
    assert frontier[0]["density"] > 0.99  # sparsity 0: the dense model
    densities = [p["density"] for p in frontier]
    assert densities == sorted(densities, reverse=True) and densities[-1] < 0.02
    for p in frontier[1:]:
        assert abs(p["density"] - (1 - p["sparsity"])) < 0.06
    points = [{"sparsity": 0.0, "accuracy": 0.75}, {"sparsity": 0.9, "accuracy": 0.741},
              {"sparsity": 0.99, "accuracy": 0.70}]
    assert usable_sparsity(points, reference_accuracy=0.75) == 0.9
    assert usable_sparsity(points, reference_accuracy=0.80) is None
    with torch.no_grad():  # the model is as it was: no threshold left applied
        assert torch.equal(model(**scored[0]).logits, model(**scored[0]).logits)
