"""`deft demo` and `deft density` end to end, on the fixture BERT and tiny JSONL files (fast, offline).

The demo runs its real pipeline (two training subprocesses, held-out evaluation, results.json, density.png);
`deft density` is checked against a count made here by hand with plain forward hooks; bad input gives a clear
error and exit status 2.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import make_model, make_tokenizer, save_model_dir, write_labelled_jsonl, write_text_jsonl

pytest.importorskip("peft")
from deft_cli.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_model_dir("bert", tmp_path_factory.mktemp("models") / "bert", task="cls")


@pytest.fixture(scope="module")
def half_dead_bert_dir(tmp_path_factory):
    """The fixture BERT with the up-projection bias of every second MLP unit at -20: those units are exactly 0
    after GELU in fp32, so the exact-zero density is far from 1 and a wrong count shows."""
    model = make_model("bert", task="cls")
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.bias[::2] = -20.0
    path = tmp_path_factory.mktemp("models") / "half_dead_bert"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def run_cli(*args) -> int:
    return main([str(a) for a in args])


# ------------------------------------------------------------------------------------------------------ demo
def test_demo_end_to_end(bert_dir, tmp_path, capsys):
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=64)
    out = tmp_path / "out"
    # The paper's density loss (no set-point): a strong fixed weight with a wide ε, so that the density of this tiny random model visibly falls in 8 steps.
    code = run_cli("demo", "--model", bert_dir, "--data", data, "--out", out, "--steps", 8, "--batch-size", 8,
                   "--max-length", 32, "--train-size", 48, "--eval-size", 16, "--lr", 0.02,
                   "--sparsity-setpoint", "none", "--target-density", "none", "--coef", 5.0, "--eps", 1e-2)
    assert code == 0
    printed = capsys.readouterr().out
    assert "exact-zero" in printed and "held-out accuracy" in printed and "peak memory" in printed
    assert "the paper's metric, which the density loss lowers" in printed and "trained no density loss" not in printed

    results = json.loads((out / "results.json").read_text())
    for run in ("peft", "deft"):
        for key in ("density", "density_thresholded", "accuracy"):
            assert 0.0 <= results[run][key] <= 1.0
        assert len(results[run]["layers"]) == 2  # the fixture BERT has 2 layers
        assert results[run]["train_seconds"] > 0 and results[run]["peak_memory_mb"] > 0
    assert results["held_out_texts"] == 16 and results["train_texts"] == 48
    assert len(results["deft"]["history"]) == 8
    # The density term really trained the DEFT run: it is the only difference between the two runs.
    assert results["deft"]["density_thresholded"] < results["peft"]["density_thresholded"] - 0.005
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The frontier: every grid sparsity for both runs, calibrated on training texts, scored on the held-out ones.
    from deft_cli.frontier import SPARSITY_GRID, USABLE_TOLERANCE

    assert "Accuracy-sparsity frontier" in printed and "usable sparsity" in printed
    for run in ("peft", "deft"):
        frontier = results["frontier"][run]
        assert [p["sparsity"] for p in frontier] == list(SPARSITY_GRID)
        assert frontier[0] == {"sparsity": 0.0, "density": results[run]["density"], "accuracy": results[run]["accuracy"]}
        densities = [p["density"] for p in frontier]
        assert all(b < a for a, b in zip(densities[1:], densities[2:]))  # each sparsity zeroes more
        assert densities[-1] < 0.05 and all(len(p) == 3 and 0 <= p["accuracy"] <= 1 for p in frontier)
        within = [p["sparsity"] for p in frontier
                  if p["accuracy"] >= results["peft"]["accuracy"] - USABLE_TOLERANCE - 1e-12]
        assert results["usable_sparsity"][run] == (max(within) if within else None)
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_default_deft_run_trains_at_the_sparsity_setpoint(bert_dir, tmp_path, capsys):
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    out = tmp_path / "out"
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", out, "--steps", 10, "--batch-size", 8,
                   "--max-length", 16, "--train-size", 24, "--eval-size", 8) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["deft_config"]
    assert (config["sparsity_setpoint"], config["setpoint_ramp_steps"], config["coef"]) == (0.995, 6, 0.0)
    assert config["setpoint_dense_every"] == 3
    history = results["deft"]["history"]
    assert [h["sparsity_setpoint"] for h in history[:7]] == pytest.approx([0.995 * i / 6 for i in range(7)], abs=1e-5)
    dense = [i % 3 == 2 for i in range(10)]  # 1 step in 3 trains without the mask
    assert [h.get("dense_step", False) for h in history] == dense
    for h, is_dense in zip(history[6:], dense[6:]):
        if is_dense:  # GELU has (almost) no exact zeros without the mask
            assert h["density"] > 0.9, h
        else:  # the masked training forward
            assert h["density"] == pytest.approx(0.005, abs=0.003), h
    printed = capsys.readouterr().out
    assert ("sparsity set-point 0.995, ramped over 6 steps (linear, gradient mask, 1 step in 3 dense, no density "
            "loss)") in printed
    # the training density at the set-point: over the masked steps after the ramp (6, 7, 9), not over the ramp
    masked = [h["density"] for h in history[6:] if not h.get("dense_step")]
    assert len(masked) == 3
    assert (f"training density over the 3 masked steps after the ramp (set-point 0.995 in force) "
            f"{sum(masked) / 3:.4f}") in printed
    # no density loss: the report leads with the frontier, and labels the exact-zero table as the paper's metric
    assert printed.index("Accuracy-sparsity frontier") < printed.index("Per-layer MLP activation density")
    assert "This DEFT run trained no density loss (coef 0)" in printed
    assert isinstance(results["warnings"], list)


def test_demo_target_density_logs_the_controller(bert_dir, tmp_path):
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    out = tmp_path / "out"
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", out, "--steps", 4, "--batch-size", 8,
                   "--max-length", 16, "--train-size", 24, "--eval-size", 8, "--target-density", 0.5,
                   "--sparsity-setpoint", "none") == 0
    results = json.loads((out / "results.json").read_text())
    history = results["deft"]["history"]
    # density ≈ 1 > target: the weight starts at 0 and rises every step
    coefs = [h["coef"] for h in history]
    assert coefs[0] == 0.0 and all(b > a for a, b in zip(coefs, coefs[1:]))
    # each step logs its distance to the target (exact zeros, as the history's density); the summary averages it
    assert [h["density_error"] for h in history] == pytest.approx([h["density"] - 0.5 for h in history], abs=2e-5)
    controller = results["controller"]
    assert controller["target_density"] == 0.5 and controller["last_steps"] == 4
    assert controller["density"] == pytest.approx(sum(h["density"] for h in history) / 4, abs=2e-5)


def test_demo_labels_missing(bert_dir, tmp_path, capsys):
    data = write_text_jsonl(tmp_path / "unlabelled.jsonl", n=8)
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "unlabelled.jsonl:1" in err and '"label"' in err


def test_demo_single_label(bert_dir, tmp_path, capsys):
    data = tmp_path / "one_label.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": "good"}) + "\n" for i in range(8)))
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", tmp_path / "out") == 2
    assert "at least 2 labels" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- density
def hand_count(model, tokenizer, texts, threshold):
    """Per layer (a != 0, |a| > threshold, entries) of the GELU output, one unpadded text at a time."""
    counts = [[0, 0, 0] for _ in model.bert.encoder.layer]

    def hook(index):
        def record(_module, _inputs, out):
            counts[index][0] += int((out != 0).sum())
            counts[index][1] += int((out.abs() > threshold).sum())
            counts[index][2] += out.numel()
        return record

    handles = [layer.intermediate.intermediate_act_fn.register_forward_hook(hook(i))
               for i, layer in enumerate(model.bert.encoder.layer)]
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    for handle in handles:
        handle.remove()
    return counts


def test_density_matches_a_hand_count(half_dead_bert_dir, tmp_path, capsys):
    texts = ["A short one.", "A much longer text, so that the batch holds real padding for the others to skip.",
             "Middle length text here."]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    threshold = 0.05
    assert run_cli("density", half_dead_bert_dir, "--data", data, "--threshold", threshold, "--json") == 0
    report = json.loads(capsys.readouterr().out)

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(half_dead_bert_dir).eval()
    expected = hand_count(model, make_tokenizer(), texts, threshold)
    assert len(report["layers"]) == len(expected)
    for layer, (nonzero, above, entries) in zip(report["layers"], expected):
        assert layer["entries"] == entries  # padding excluded: exactly the unpadded tokens
        assert layer["exact"] == pytest.approx(nonzero / entries, abs=1e-9)
        assert layer["thresholded"] == pytest.approx(above / entries, abs=1e-9)
        assert 0.4 < layer["exact"] <= 0.5 + 1e-9  # half the units are dead
    assert report["density"] == pytest.approx(sum(n / e for n, _, e in expected) / len(expected))

    # the table names both densities
    assert run_cli("density", half_dead_bert_dir, "--data", data, "--threshold", threshold) == 0
    table = capsys.readouterr().out
    assert "exact-zero density" in table and "thresholded density (|a|>0.05)" in table


def test_density_with_adapter(half_dead_bert_dir, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(half_dead_bert_dir)
    lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["dense"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=6)
    assert run_cli("density", half_dead_bert_dir, "--adapter", tmp_path / "adapter", "--data", data, "--json") == 0
    report = json.loads(capsys.readouterr().out)

    fresh = AutoModelForSequenceClassification.from_pretrained(half_dead_bert_dir)
    merged = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().eval()
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    expected = hand_count(merged, make_tokenizer(), texts, 1e-3)
    for layer, (nonzero, _, entries) in zip(report["layers"], expected):
        assert layer["exact"] == pytest.approx(nonzero / entries, abs=1e-3)  # merging rounds a little


# ---------------------------------------------------------------------------------------------------- errors
def test_density_bad_model_path(tmp_path, capsys):
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=2)
    assert run_cli("density", tmp_path / "missing", "--data", data) == 2
    assert "does not exist" in capsys.readouterr().err


def test_density_folder_without_config(tmp_path, capsys):
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=2)
    (tmp_path / "empty_model").mkdir()
    assert run_cli("density", tmp_path / "empty_model", "--data", data) == 2
    assert "config.json" in capsys.readouterr().err


def test_density_bad_data_path(bert_dir, tmp_path, capsys):
    assert run_cli("density", bert_dir, "--data", tmp_path / "missing.jsonl") == 2
    assert "does not exist" in capsys.readouterr().err


def test_density_bad_adapter_path(bert_dir, tmp_path, capsys):
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=2)
    assert run_cli("density", bert_dir, "--adapter", tmp_path / "nowhere", "--data", data) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_empty_data_file(bert_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run_cli("density", bert_dir, "--data", empty) == 2
    assert "is empty" in capsys.readouterr().err
    assert run_cli("demo", "--model", bert_dir, "--data", empty, "--out", tmp_path / "out") == 2
    assert "is empty" in capsys.readouterr().err


def test_model_without_mlp(tmp_path, capsys):
    """Mamba blocks have no transformer MLP: both commands say so before any work."""
    from transformers import MambaConfig, MambaModel

    path = tmp_path / "mamba"
    MambaModel(MambaConfig(vocab_size=len(make_tokenizer()), hidden_size=16, state_size=4, num_hidden_layers=2,
                           pad_token_id=make_tokenizer().pad_token_id)).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=8)
    assert run_cli("density", path, "--data", data) == 2
    assert "no MLP block found" in capsys.readouterr().err
    assert run_cli("demo", "--model", path, "--data", data, "--out", tmp_path / "out") == 2
    assert "no MLP block found" in capsys.readouterr().err
