"""`deft bench --inference` on tiny shapes: every section runs and writes every key."""

from __future__ import annotations

import json

import pytest
import torch

from deft_cli import inference_bench

MLP_KEYS = {"shape", "gated", "dtype", "density", "dense_ms", "sparse_ms", "speedup", "limit", "fraction_of_limit"}
DECODE_KEYS = {"density", "dense_tokens_per_s", "sparse_tokens_per_s", "speedup", "limit"}
ENCODER_KEYS = {"dense_ms", "sparse_ms", "speedup", "batch", "sparsity"}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference")
    results = inference_bench.run_inference_bench(out, tiny=True, rounds=1)
    return out, results


def test_writes_every_key(tiny_results):
    out, results = tiny_results
    written = json.loads((out / "inference.json").read_text())
    assert written == results
    assert {"threads", "cpu", "torch", "mlp", "decode", "encoder"} <= set(written)
    assert written["threads"] == torch.get_num_threads() and written["torch"] == torch.__version__
    densities = list(inference_bench.DENSITIES)
    for gated in (True, False):
        for dtype in ("float32", "bfloat16"):
            rows = [r for r in written["mlp"] if r["gated"] is gated and r["dtype"] == dtype]
            assert [r["density"] for r in rows] == densities
    for row in written["mlp"]:
        assert MLP_KEYS <= set(row)
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["limit"] == pytest.approx(inference_bench.mlp_limit(row["gated"], row["density"]), abs=1e-3)
        # all three are rounded to 3 decimals: the quotient of the rounded values agrees within what rounding moves
        speedup, limit = row["speedup"], row["limit"]
        rounding = 5e-4 * (1 + 1 / limit + speedup / limit**2)
        assert row["fraction_of_limit"] == pytest.approx(speedup / limit, abs=rounding)
    assert [r["density"] for r in written["decode"]] == densities
    for row in written["decode"]:
        assert DECODE_KEYS <= set(row)
        assert row["dense_tokens_per_s"] > 0 and row["sparse_tokens_per_s"] > 0
        assert 1.0 < row["limit"] < 3.0
    assert ENCODER_KEYS <= set(written["encoder"])


def test_calibrated_decode_density_is_the_row_density(tiny_results):
    _, results = tiny_results
    for row in results["decode"]:
        assert row["calibrated_density"] == pytest.approx(row["density"], abs=0.01)


def test_decode_limit_counts_the_model_bytes():
    """Hand count for the tiny Llama: the limit uses attention + norms + LM head + the MLP bytes still read."""
    model = inference_bench._decode_model(tiny=True)
    c = model.config
    h, i, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    mlp = layers * 3 * h * i
    rest = layers * (4 * h * h + 2 * h) + h + vocab * h  # attention (kv heads = heads), 2 norms a layer, final norm, head
    assert decode_bytes(model) == 4 * (mlp + rest)
    d = 0.1
    assert inference_bench.decode_limit(model, d) == pytest.approx((mlp + rest) / (rest + mlp * (1 + 2 * d) / 3))


def decode_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def test_report_names_every_section(tiny_results):
    _, results = tiny_results
    report = inference_bench.format_inference_report(results)
    assert "mlp (batch 1, one token)" in report and "decode" in report and "encoder" in report
    assert len([line for line in report.splitlines() if "->" in line]) == len(results["mlp"])
