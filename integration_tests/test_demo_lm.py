"""`deft demo --job lm` (deft_cli.demo.lm): causal-LM SFT through TRL's SFTTrainer, plain and with DeftSFTMixin, on
the tiny fixture Llama saved to a folder (its tokenizer has a chat template) and tiny prompt/completion data,
offline. One job runs for the contract tests (results.json keys and shapes, the grid at both capture points, the
decode rows); the bad inputs fail before anything trains; the refusal trains one run."""

from __future__ import annotations

import json
import pathlib

import pytest
from fixtures import make_texts, save_model_dir

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

from deft_cli.cli import build_parser, main  # noqa: E402
from deft_cli.data import DeftDataError  # noqa: E402
from deft_cli.demo import DemoSettings, LmSettings, demo_settings, lm_deft_config  # noqa: E402
from deft_cli.demo.lm import check_causal_lm, decode_sparsities, run_lm_demo, sft_rows  # noqa: E402
from deft_cli.frontier import LM_SPARSITY_GRID, PERPLEXITY_TOLERANCE  # noqa: E402

POINT_KEYS = {"sparsity", "capture", "density", "perplexity", "perplexity_general"}
DECODE_KEYS = {"kernel", "capture", "sparsity", "tokens_per_s", "speedup", "limit"}
CAPTURES = ("act", "down_in")
STEPS = 6


def write_jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_records(n: int = 48) -> list[dict]:
    return [{"prompt": "Write a happy story." if i % 2 else "Write a sad story.", "completion": text}
            for i, text in enumerate(make_texts(n))]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    work = tmp_path_factory.mktemp("demo-lm")
    save_model_dir("llama", work / "model")
    write_jsonl(work / "sft.jsonl", sft_records())
    return work


def tiny_settings(work: pathlib.Path, out: pathlib.Path, **changes) -> LmSettings:
    steps = changes.pop("steps", STEPS)
    fields = dict(model=str(work / "model"), data=str(work / "sft.jsonl"), out=str(out), steps=steps, batch_size=4,
                  max_length=48, train_size=32, eval_size=8, learning_rate=1e-2, calibration_texts=8, device="cpu",
                  decode_tokens=4, decode_rounds=1, deft=lm_deft_config(steps))
    return LmSettings(**(fields | changes))


@pytest.fixture(scope="module")
def job(work):
    out = work / "out"
    results = run_lm_demo(tiny_settings(work, out))
    return results, out


# ----------------------------------------------------------------------------------------------- contract
def test_results_json_holds_the_contract_keys_and_shapes(job):
    results, out = job
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "frontier.png").stat().st_size > 0
    assert set(results["frontier"]) == {"peft", "deft"}
    for name in ("peft", "deft"):
        for point in results["frontier"][name]:
            assert set(point) == POINT_KEYS
            assert 0.0 <= point["density"] <= 1.0 and point["perplexity"] > 1 and point["perplexity_general"] > 1
    assert set(results["usable_sparsity"]) == {"peft", "deft"}
    for name in ("peft", "deft"):
        assert set(results["usable_sparsity"][name]) == set(CAPTURES)
        assert all(s is None or s in LM_SPARSITY_GRID for s in results["usable_sparsity"][name].values())
    assert "perplexity" in results["usable_sparsity_metric"] and "5%" in results["usable_sparsity_metric"]
    assert all(set(row) == DECODE_KEYS for row in results["decode"])
    assert isinstance(results["base_perplexity"], float)


def test_frontier_covers_the_grid_at_both_capture_points(job):
    results, _ = job
    for name in ("peft", "deft"):
        points = results["frontier"][name]
        assert [(p["capture"], p["sparsity"]) for p in points] == [(c, s) for c in CAPTURES for s in LM_SPARSITY_GRID]
        run = results[name]
        for capture in CAPTURES:
            dense = next(p for p in points if p["capture"] == capture and p["sparsity"] == 0)
            assert dense["perplexity"] == run["perplexity"] and dense["perplexity_general"] == run["perplexity_general"]
            thresholded = [p for p in points if p["capture"] == capture and p["sparsity"] > 0]
            # calibrated thresholds zero about the share they were calibrated for, at their capture point
            assert all(abs((1 - p["density"]) - p["sparsity"]) < 0.15 for p in thresholded)
        assert run["perplexity"] < results["base_perplexity"]  # both runs improved on the base model


def test_usable_sparsity_is_the_largest_grid_point_within_5_percent_of_dense_peft(job):
    results, _ = job
    reference = results["peft"]["perplexity"]
    for name in ("peft", "deft"):
        for capture in CAPTURES:
            within = [p["sparsity"] for p in results["frontier"][name]
                      if p["capture"] == capture and p["perplexity"] <= reference * (1 + PERPLEXITY_TOLERANCE)]
            assert results["usable_sparsity"][name][capture] == (max(within) if within else None)


def test_decode_rows_dense_mask_sparse_at_deft_usable_sparsity(job):
    results, _ = job
    rows = results["decode"]
    assert [(r["capture"], r["kernel"]) for r in rows] == [(c, k) for c in CAPTURES for k in ("dense", "mask", "sparse")]
    for row in rows:
        assert row["tokens_per_s"] > 0
        usable = results["usable_sparsity"]["deft"][row["capture"]]
        if row["kernel"] == "dense":
            assert row["sparsity"] == 0.0 and row["speedup"] == 1.0 and row["limit"] == 1.0
        else:
            assert row["sparsity"] == results["decode_limits"][row["capture"]]["sparsity"]
            if usable:
                assert row["sparsity"] == usable
    limits = {r["capture"]: r["limit"] for r in rows if r["kernel"] == "sparse"}
    # a gated MLP at the same density: the gate side skips more bytes (3/(1+2d)) than down_in (3/(2+d))
    if results["usable_sparsity"]["deft"]["act"] == results["usable_sparsity"]["deft"]["down_in"] not in (None, 0.0):
        assert limits["act"] > limits["down_in"] > 1.0
    assert set(results["decode_limits"]) == set(CAPTURES)


def test_decode_runs_at_deft_usable_sparsity_else_within_reach_of_its_own_dense_perplexity():
    points = [{"capture": c, "sparsity": s, "perplexity": p} for c, curve in
              (("act", {0.0: 10.4, 0.3: 10.8, 0.5: 12.0}), ("down_in", {0.0: 10.4, 0.3: 10.45, 0.5: 10.49}))
              for s, p in curve.items()]
    chosen, rules = decode_sparsities(points, reference=10.0, own_dense=10.4)
    assert chosen == {"act": 0.3, "down_in": 0.5}
    assert "own dense" in rules["act"] and "usable" in rules["down_in"]
    chosen, rules = decode_sparsities(points, reference=10.0, own_dense=9.0)
    assert chosen["act"] == 0.0 and "dense" in rules["act"]
    # a DEFT run without a PEFT run (benchmarks/run.py --set runs=deft): its own dense perplexity, said so
    chosen, rules = decode_sparsities(points, reference=None, own_dense=10.4)
    assert chosen == {"act": 0.3, "down_in": 0.5}
    assert all(rule.startswith("no PEFT run to compare with: ") for rule in rules.values())


def test_deft_run_trained_with_the_setpoint_through_the_trl_mixin(job):
    results, _ = job
    config = results["deft_config"]
    assert (config["sparsity_setpoint"], config["setpoint_dense_every"], config["capture"]) == (0.5, 2, "act")
    history = results["deft"]["history"]
    assert len(history) == STEPS and all("deft/density" in h for h in history)
    assert all("deft/density" not in h for h in results["peft"]["history"])  # plain SFTTrainer, no hooks
    # 1 step in 2 trains dense (the optimizer step after 1, 3, ... steps done), marked in the history: there the
    # exact-zero density of SiLU is 1, on the masked steps after the ramp's start it is below
    dense = [h["step"] for h in history if h.get("dense_step")]
    assert dense == [k for k in range(1, STEPS + 1) if (k - 1) % 2 == 1] and dense
    assert all((h["deft/density"] > 0.99) == bool(h.get("dense_step")) for h in history[1:])
    assert results["format"] == "chat"


# ---------------------------------------------------------------------------------------------- formats
def _model_without_chat_template(path):
    """The tiny fixture llama saved without its chat template."""
    model = save_model_dir("llama", path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model.glob("chat_template.*"):
        extra.unlink()
    return model


def test_a_model_without_a_chat_template_gets_plain_prompt_completion_text(work, tmp_path):
    model = _model_without_chat_template(tmp_path / "plain")
    settings = tiny_settings(work, tmp_path / "out", model=str(model))
    assert check_causal_lm(settings, sft_records(4)) is False
    row = sft_rows(sft_records(1), False, "</s>")[0]
    assert row == {"prompt": "Write a sad story.\n\n", "completion": make_texts(1)[0] + "</s>"}
    chat = sft_rows(sft_records(1), True, "</s>")[0]
    assert chat["prompt"] == [{"role": "user", "content": "Write a sad story."}]
    # chat-message data needs a chat template
    messages = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DeftDataError, match="no chat template"):
        check_causal_lm(settings, messages)


# ------------------------------------------------------------------------------------------- bad inputs
def _demo_error(capsys, *args) -> str:
    assert main(["demo", "--job", "lm", "--device", "cpu", *args]) == 2
    return capsys.readouterr().err


def test_a_model_that_is_not_a_causal_lm_is_a_clear_error(work, tmp_path, capsys):
    bert = save_model_dir("bert", tmp_path / "bert")
    err = _demo_error(capsys, "--model", str(bert), "--data", str(work / "sft.jsonl"), "--out", str(tmp_path / "o"))
    assert "not a causal language model" in err and "--job classify" in err and "deft_cli.lm_model" in err
    assert not (tmp_path / "o").exists()


def test_data_without_completions_is_a_clear_error(work, tmp_path, capsys):
    data = write_jsonl(tmp_path / "labels.jsonl", [{"text": "a fine film", "label": 1}] * 4)
    err = _demo_error(capsys, "--model", str(work / "model"), "--data", str(data), "--out", str(tmp_path / "o"))
    assert f"{data}:1" in err and 'no "completion"' in err and "--job classify" in err
    data = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    err = _demo_error(capsys, "--model", str(work / "model"), "--data", str(data), "--out", str(tmp_path / "o"))
    assert f"{data}:2" in err and 'no "completion"' in err


def test_chat_data_for_a_model_without_a_chat_template_is_a_clear_error(work, tmp_path, capsys):
    model = _model_without_chat_template(tmp_path / "plain")
    messages = [{"prompt": [{"role": "user", "content": f"say {i}"}],
                 "completion": [{"role": "assistant", "content": f"{i}"}]} for i in range(10)]
    data = write_jsonl(tmp_path / "chat.jsonl", messages)
    err = _demo_error(capsys, "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"))
    assert "no chat template" in err and "plain strings" in err


def test_classification_only_flags_are_refused_with_job_lm(capsys):
    assert "--adaptive belongs to --job classify" in _demo_error(capsys, "--adaptive")


def test_classify_stays_the_default_job_with_its_settings():
    assert demo_settings(build_parser().parse_args(["demo"])) == DemoSettings()
    assert demo_settings(build_parser().parse_args(["demo", "--job", "lm"])) == LmSettings()


def test_deft_flags_reach_both_jobs_over_their_own_defaults():
    for job, setpoint, dense_every in (("classify", 0.995, 3), ("lm", 0.5, 2)):
        config = demo_settings(build_parser().parse_args(["demo", "--job", job])).deft
        assert (config.sparsity_setpoint, config.setpoint_dense_every, config.surrogate) == (setpoint, dense_every,
                                                                                             "paper")
        flags = ["--surrogate", "setpoint", "--coef", "2", "--setpoint-dense-every", "4", "--sparsity-setpoint", "0.6"]
        config = demo_settings(build_parser().parse_args(["demo", "--job", job, *flags])).deft
        assert (config.surrogate, config.coef, config.setpoint_dense_every, config.sparsity_setpoint) == (
            "setpoint", 2.0, 4, 0.6)
        config = demo_settings(build_parser().parse_args(["demo", "--job", job, "--sparsity-setpoint", "none"])).deft
        assert config.sparsity_setpoint is None and config.setpoint_dense_every == 0


# ----------------------------------------------------------------------------------------------- refusal
def test_no_frontier_for_a_run_whose_perplexity_did_not_improve_on_the_base_model(work, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DeftDataError, match="not below the base model's") as err:
        run_lm_demo(tiny_settings(work, out, steps=2, learning_rate=1e-12))
    assert "PEFT" in str(err.value) and "--steps" in str(err.value)
    assert not (out / "results.json").exists()
