"""`deft bench` and `deft demo --adaptive` end to end on the fixture BERT and a tiny JSONL file (fast, offline),
and the benchmark's naive DEFT computing the same loss as deft_common (so it compares like with like)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fixtures import make_tokenizer, write_labelled_jsonl

pytest.importorskip("peft")
from deft_cli.bench import naive_and_deft_losses  # noqa: E402
from deft_cli.demo import DemoSettings  # noqa: E402
from test_demo import bert_dir, run_cli  # noqa: E402, F401  (the demo test's fixture model, reused)

TINY_JOB = ["--batch-size", 4, "--max-length", 16, "--train-size", 24, "--eval-size", 8]


def test_naive_loss_equals_deft_common(bert_dir):  # noqa: F811
    tokenizer = make_tokenizer()
    texts = ["short", "a much longer text with padding for the other rows of the batch", "middle length text"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    batch["labels"] = torch.tensor([0, 1, 0])
    assert batch["attention_mask"].min() == 0  # padding is there, and must be left out by both
    naive, ours = naive_and_deft_losses(DemoSettings(model=str(bert_dir)), 2, batch, eps=1e-2)
    assert 0.0 < ours < 1.0
    assert naive == pytest.approx(ours, rel=1e-5)


def test_bench_end_to_end(bert_dir, tmp_path, capsys):  # noqa: F811
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=40)
    out = tmp_path / "bench"
    assert run_cli("bench", "--model", bert_dir, "--data", data, "--out", out, "--steps", 2, "--warmup", 1,
                   "--ada-steps", 6, "--skip-budget", 1, "--device", "cpu", *TINY_JOB) == 0
    printed = capsys.readouterr().out
    assert "naive DEFT" in printed and "ADA-DEFT inference" in printed and "Targets" in printed
    assert "set-point alone" in printed and "setpoint_time_ratio" in printed

    results = json.loads((out / "bench.json").read_text())
    for key in ("time_ratio", "memory_ratio", "naive_time_ratio", "naive_memory_ratio", "setpoint_time_ratio",
                "setpoint_memory_ratio", "setpoint_step_memory_ratio"):
        assert math.isfinite(results[key]) and results[key] > 0, key
    for key in ("ada_runtime_saving", "ada_memory_saving", "ada_accuracy_delta", "ada_accuracy_delta_vs_peft"):
        assert math.isfinite(results[key]) and -1 < results[key] < 1, key
    for name in ("peft", "deft", "naive", "setpoint"):
        run = results["training"][name]
        assert len(run["step_s_all"]) == 2 and run["step_s"] > 0 and run["memory_mb"] > run["resident_mb"] > 0
    # the naive variant keeps extra activation-sized tensors: its step allocates more than deft_common's
    assert results["training"]["naive"]["step_peak_increase_mb"] > results["training"]["deft"]["step_peak_increase_mb"]
    assert results["ada"]["skipped_blocks"] and len(results["ada"]["skipped_blocks"]) == 1
    assert results["ada"]["parameters_skipped"] < results["ada"]["parameters_unskipped"]
    assert results["ada_memory_saving"] > 0  # the skipped block's weights are gone
    assert "cpu" in results["device"] and "allocator" in results["measured"]["memory"]
    assert set(results["targets"]) >= {"time_ratio", "memory_ratio", "setpoint_time_ratio", "ada_accuracy_delta"}
    assert "0.995" in results["measured"]["setpoint"]


def test_bench_bad_input(bert_dir, tmp_path, capsys):  # noqa: F811
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=16)
    assert run_cli("bench", "--model", bert_dir, "--data", data, "--out", tmp_path / "o", "--steps", 0) == 2
    assert "--steps 0 must be a whole number >= 1" in capsys.readouterr().err
    assert run_cli("bench", "--model", bert_dir, "--data", data, "--out", tmp_path / "o", "--skip-budget", 5) == 2
    assert "asks for 5 MLP blocks but the model has 2" in capsys.readouterr().err


def test_demo_adaptive(bert_dir, tmp_path, capsys):  # noqa: F811
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=40)
    out = tmp_path / "out"
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", out, "--steps", 6, "--lr", 0.02,
                   "--target-density", "none", "--coef", 5.0, "--eps", 1e-2, "--adaptive", "--skip-budget", 1,
                   *TINY_JOB) == 0
    printed = capsys.readouterr().out
    assert "ADA-DEFT layer weights" in printed and "skipped 1 of 2 MLP blocks" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["deft_config"]["adaptive"] is True and "ada" not in results["peft"]
    ada = results["deft"]["ada"]
    weights = ada["layer_weights"]
    assert len(weights) == 2 and sum(weights.values()) == pytest.approx(2.0, rel=1e-4)
    assert max(weights.values()) > 1.0 > min(weights.values())  # trained, not uniform
    assert ada["skipped_blocks"] == [max(weights, key=weights.get)]  # the block with the largest weight
    assert ada["accuracy_unskipped"] == results["deft"]["accuracy"]
    for key in ("accuracy_unskipped", "accuracy_skipped"):
        assert 0.0 <= ada[key] <= 1.0
    assert ada["runtime_s_skipped"] > 0 and ada["runtime_s_unskipped"] > 0
    assert ada["freed_parameters"] > 0 and ada["memory_mb_skipped"] < ada["memory_mb_unskipped"]


def test_demo_skip_budget_needs_adaptive(bert_dir, tmp_path, capsys):  # noqa: F811
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=16)
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", tmp_path / "o", "--skip-budget", 1) == 2
    assert "add --adaptive" in capsys.readouterr().err
