"""What a new user hits first (issue 22): every argument of every `deft` command is checked before any model or
data loads, with a message that names the flag and the fix (`deft <command>: error: ...`, exit status 2); an
output folder is checked for writing first and made only when there is something to write; results are printed
before they are written, and a failed write says where and why; a non-UTF-8 data file, an adapter made for
another base model and labels such as {1, 5} are handled; the demo's report, plot, overall progress line and its
third-party noise. Fast: nothing here trains, except the two demo runs marked below (a few steps each)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
import warnings

import pytest
import torch
from fixtures import make_model, save_model_dir, write_labelled_jsonl, write_text_jsonl

pytest.importorskip("peft")
from deft_cli.cli import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_model_dir("bert", tmp_path_factory.mktemp("models") / "bert", task="cls")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model_dir("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a command gets as far as loading data or a model, or starting a training subprocess."""
    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was called before the arguments were checked")
        return fail

    import deft_cli.bench
    import deft_cli.demo.pipeline
    import deft_cli.density
    import deft_cli.sparsify

    for module, name in ((deft_cli.demo.pipeline, "load_records"), (deft_cli.demo.pipeline, "check_model"),
                         (deft_cli.demo.pipeline, "in_subprocess"), (deft_cli.bench, "prepare"),
                         (deft_cli.bench, "in_subprocess"), (deft_cli.density, "load_model"),
                         (deft_cli.density, "read_jsonl"), (deft_cli.sparsify, "load_model"),
                         (deft_cli.sparsify, "read_jsonl")):
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))


# ------------------------------------------------------------------------------------------ argument checks
DEMO_ERRORS = [
    (["--steps", 0], "--steps 0 must be a whole number >= 1"),
    (["--steps", -5], "--steps -5 must be a whole number >= 1"),  # not "setpoint_ramp_steps=-3"
    (["--calibration-texts", 0], "--calibration-texts 0 must be a whole number >= 1"),
    (["--threshold", -1], "--threshold -1.0 must be a finite number >= 0"),
    (["--train-size", 0], "--train-size 0 must be a whole number >= 1"),
    (["--eval-size", 0], "--eval-size 0 must be a whole number >= 1"),
    (["--batch-size", 0], "--batch-size 0 must be a whole number >= 1"),
    (["--max-length", 0], "--max-length 0 must be a whole number >= 1"),
    (["--lr", "nan"], "--lr nan must be a finite number > 0"),
    (["--lr", 0], "--lr 0.0 must be a finite number > 0"),
    (["--seed", -1], "--seed -1 must be a whole number >= 0"),
    (["--device", "tpu"], "--device 'tpu' is not a device the `deft` commands run on; use auto, cpu, cuda"),
    (["--calibration-texts", 100, "--train-size", 50], "--calibration-texts 100 is more than the 50 training texts"),
    (["--coef", -1], "--coef -1.0 must be >= 0"),  # a DeftConfig field, named by its flag
    (["--setpoint-ramp-steps", -3], "--setpoint-ramp-steps -3 must be a whole number >= 0"),
    (["--sparsity-setpoint", 1.5], "--sparsity-setpoint 1.5 must be a number in [0, 1)"),
]


@pytest.mark.parametrize("args,message", DEMO_ERRORS, ids=[" ".join(map(str, a)) for a, _ in DEMO_ERRORS])
def test_demo_arguments_are_checked_before_anything_loads(args, message, bert_dir, tmp_path, capsys, nothing_loads):
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=16)
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("deft demo: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_demo_cuda_without_a_gpu(bert_dir, tmp_path, capsys, nothing_loads):
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=16)
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", tmp_path / "out", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch sees no CUDA GPU here" in err and "use --device cpu" in err


BENCH_ERRORS = [
    (["--steps", 0], "--steps 0 must be a whole number >= 1"),
    (["--warmup", -1], "--warmup -1 must be a whole number >= 0"),
    (["--ada-steps", -1], "--ada-steps -1 must be a whole number >= 0; 0 skips the ADA-DEFT part"),
    (["--eps", 0], "--eps 0.0 must be a finite number > 0"),
    (["--eval-size", 0], "--eval-size 0 must be a whole number >= 1"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--skip-budget", 0], "--skip-budget 0.0 must be a fraction in (0, 1)"),
]


@pytest.mark.parametrize("args,message", BENCH_ERRORS, ids=[" ".join(map(str, a)) for a, _ in BENCH_ERRORS])
def test_bench_arguments_are_checked_before_anything_loads(args, message, bert_dir, tmp_path, capsys, nothing_loads):
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=16)
    assert run_cli("bench", "--model", bert_dir, "--data", data, "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("deft bench: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


DENSITY_ERRORS = [
    (["density", "--threshold", -1], "--threshold -1.0 must be a finite number >= 0"),
    (["density", "--batch-size", 0], "--batch-size 0 must be a whole number >= 1"),
    (["density", "--max-length", 0], "--max-length 0 must be a whole number >= 1"),
    (["density", "--limit", 0], "--limit 0 must be a whole number >= 1"),
    (["density", "--thresholds", "."], "no sparsity thresholds at"),
    (["sparsify", "--sparsity", 1.0], "--sparsity 1.0 must be in [0, 1)"),
    (["sparsify", "--sparsity", "nan"], "--sparsity nan must be in [0, 1)"),
    (["sparsify", "--sparsity", 0.5, "--calibration-share", 1], "--calibration-share 1.0 must be in (0, 1)"),
    (["sparsify", "--sparsity", 0.5, "--batch-size", 0], "--batch-size 0 must be a whole number >= 1"),
]


@pytest.mark.parametrize("args,message", DENSITY_ERRORS, ids=[" ".join(map(str, a)) for a, _ in DENSITY_ERRORS])
def test_density_and_sparsify_arguments_are_checked_before_anything_loads(args, message, llama_dir, tmp_path, capsys,
                                                                          nothing_loads, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "--thresholds ." : a folder without deft_thresholds.json
    data = write_text_jsonl(tmp_path / "texts.jsonl", n=8)
    command, *rest = args
    assert run_cli(command, llama_dir, "--data", data, *rest) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deft {command}: error: ") and message in err, err


# ------------------------------------------------------------------------------------------ output folders
def test_unwritable_out_fails_in_seconds(bert_dir, llama_dir, tmp_path, capsys, nothing_loads):
    """An --out that cannot be written (here: a path through a file, which fails as root too) fails at once,
    before any data or model loads, for each command that writes."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    labelled, texts = write_labelled_jsonl(tmp_path / "l.jsonl", n=16), write_text_jsonl(tmp_path / "t.jsonl", n=8)
    for argv in (["demo", "--model", bert_dir, "--data", labelled],
                 ["bench", "--model", bert_dir, "--data", labelled],
                 ["bench", "--inference"],
                 ["sparsify", llama_dir, "--data", texts, "--sparsity", 0.5]):
        start = time.monotonic()
        assert run_cli(*argv, "--out", blocker / "out") == 2
        assert time.monotonic() - start < 5
        err = capsys.readouterr().err
        assert f"--out {blocker / 'out'}: {blocker} is a file, not a folder" in err, err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_in_seconds(bert_dir, tmp_path, capsys, nothing_loads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        data = write_labelled_jsonl(tmp_path / "l.jsonl", n=16)
        assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", locked / "out") == 2
        assert f"--out {locked / 'out'}: cannot write there ({locked}, where it would be made)" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_check_output_dir_leaves_nothing_behind(tmp_path):
    from deft_cli.checks import check_output_dir

    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # checked, not made
    (tmp_path / "kept.txt").write_text("x")
    check_output_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


def test_sparsify_prints_before_it_writes_and_a_failed_write_says_where(llama_dir, tmp_path, capsys, monkeypatch):
    import deft_cli.sparsify

    monkeypatch.setattr(deft_cli.sparsify, "check_output_dir", lambda path, flag: pathlib.Path(path))  # let it by
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    data = write_text_jsonl(tmp_path / "t.jsonl", n=8)
    assert run_cli("sparsify", llama_dir, "--data", data, "--sparsity", 0.5, "--max-length", 16,
                   "--out", blocker / "out") == 2
    captured = capsys.readouterr()
    assert "held-out density" in captured.out  # the results, printed first
    assert f"could not write {blocker / 'out' / 'deft_thresholds.json'}: Not a directory" in captured.err


def test_demo_prints_before_it_writes_and_a_failed_write_says_where(bert_dir, tmp_path, capsys, monkeypatch):
    """A short demo (4 steps) whose --out fails only when written."""
    import deft_cli.demo.pipeline

    monkeypatch.setattr(deft_cli.demo.pipeline, "check_output_dir", lambda path: pathlib.Path(path))  # let it by
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", blocker / "out", "--steps", 4,
                   "--batch-size", 8, "--max-length", 16, "--train-size", 24, "--eval-size", 8) == 2
    captured = capsys.readouterr()
    assert "Accuracy-sparsity frontier" in captured.out and "held-out accuracy" in captured.out
    assert f"deft demo: error: could not write {blocker / 'out' / 'results.json'}: Not a directory" in captured.err


# ------------------------------------------------------------------------------------------------ the data
def test_latin1_data_file(tmp_path):
    from deft_cli.data import DeftDataError, read_jsonl

    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"text": "fine", "label": 0}).encode() + b"\n"
                     + '{"text": "caf\u00e9 cr\u00e8me", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(DeftDataError) as raised:
        read_jsonl(data, need_labels=True)
    assert f"{data}:2: not UTF-8 text (byte 0xe9 at column 14)" in str(raised.value)
    assert "iconv -f latin1 -t utf-8" in str(raised.value)


def test_latin1_data_file_on_the_command_line(bert_dir, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"text": "na\u00efve", "label": 1}\n'.encode("latin-1"))
    for command in (["demo", "--model", bert_dir, "--out", tmp_path / "out"], ["density", bert_dir]):
        assert run_cli(*command, "--data", data) == 2
        err = capsys.readouterr().err
        assert f"{data}:1: not UTF-8 text" in err and "Traceback" not in err


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    from deft_cli.data import read_jsonl

    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9"}).encode() + b"\n")
    assert read_jsonl(data, need_labels=False) == [{"text": "caf\u00e9"}]


def test_integer_labels_are_numbered_from_zero():
    """{1, 5}: a 2-class model (ids 0, 1), not a 6-class one; 0..K-1 and strings as before."""
    from deft_cli.data import label_ids, renumbered

    ids, names = label_ids([{"label": y} for y in (5, 1, 1, 5)])
    assert (ids, names) == ([1, 0, 0, 1], [1, 5]) and renumbered(names)
    ids, names = label_ids([{"label": y} for y in (1, 0, 2)])
    assert (ids, names) == ([1, 0, 2], [0, 1, 2]) and not renumbered(names)
    ids, names = label_ids([{"label": y} for y in ("pos", "neg")])
    assert (ids, names) == ([1, 0], ["neg", "pos"])


def test_demo_calibration_texts_beyond_the_training_set(bert_dir, tmp_path, capsys, monkeypatch):
    """Asked for more calibration texts than the data gives: refused (after the split, before anything trains)."""
    import deft_cli.demo.pipeline

    monkeypatch.setattr(deft_cli.demo.pipeline, "in_subprocess", lambda *a: pytest.fail("trained"))
    data = write_labelled_jsonl(tmp_path / "labelled.jsonl", n=32)
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", tmp_path / "out", "--train-size", 30,
                   "--eval-size", 8, "--calibration-texts", 30) == 2
    assert "--calibration-texts 30: the data gives only 26 training texts" in capsys.readouterr().err


def test_adapter_for_another_base_model(llama_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    bert = make_model("bert", task="cls")
    get_peft_model(bert, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["dense"])).save_pretrained(
        tmp_path / "bert_adapter")
    data = write_text_jsonl(tmp_path / "t.jsonl", n=8)
    for command in (["density"], ["sparsify", "--sparsity", 0.5, "--out", tmp_path / "out"]):
        assert run_cli(command[0], llama_dir, "--adapter", tmp_path / "bert_adapter", "--data", data, *command[1:]) == 2
        err = capsys.readouterr().err
        assert f"the adapter in '{tmp_path / 'bert_adapter'}' does not fit the model in '{llama_dir}'" in err, err
        assert "pass as MODEL the base model the adapter was trained on" in err


# --------------------------------------------------------------------------------- what the demo says
def test_short_demo_with_labels_1_and_5_warns_at_chance(bert_dir, tmp_path, capsys):
    """Labels {1, 5} train a 2-class model and say so; a 2-step run is at chance: warned in the report and in
    results.json; the report leads with the frontier; the folder is made when the results are written."""
    rows = [json.loads(line) for line in write_labelled_jsonl(tmp_path / "l.jsonl", n=32).read_text().splitlines()]
    data = tmp_path / "labels_1_5.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "label": 1 + 4 * r["label"]}) + "\n" for r in rows))
    out = tmp_path / "new" / "out"
    assert run_cli("demo", "--model", bert_dir, "--data", data, "--out", out, "--steps", 2, "--batch-size", 8,
                   "--max-length", 16, "--train-size", 24, "--eval-size", 8) == 0
    printed = capsys.readouterr().out
    assert "labels [1, 5] (numbered 0, 1 for the model)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["labels"] == [1, 5]
    assert len(results["warnings"]) == 2 and "PEFT's dense accuracy" in results["warnings"][0]
    assert all("is not above chance" in w for w in results["warnings"])
    assert printed.count("warning: ") == 2
    assert printed.index("Accuracy-sparsity frontier") < printed.index("Per-layer MLP activation density")
    assert "calibrated on 24 training texts" in printed and results["settings"]["calibration_texts"] == 24
    assert "-0.0%" not in printed and "reduction" not in printed


def test_chance_level():
    from deft_cli.demo import chance_level, chance_warnings

    chance, margin = chance_level([0, 1] * 500)
    assert chance == 0.5 and margin == pytest.approx(2 * (0.25 / 1000) ** 0.5)
    assert chance_level([0, 0, 0, 1])[0] == 0.75  # the most frequent label's share
    runs = {"peft": {"accuracy": 0.53}, "deft": {"accuracy": 0.54}}
    assert [w.split("'")[0] for w in chance_warnings(runs, [0, 1] * 500)] == ["PEFT"]  # 0.5 + 0.0316


def demo_results() -> dict:
    """The README's real run: the set-point, no density loss."""
    return json.loads((ROOT / "docs" / "demo_results.json").read_text())


def test_report_leads_with_the_frontier_and_labels_the_papers_metric():
    from deft_cli.demo import format_report

    results = demo_results()
    report = format_report(results)
    assert report.startswith("Accuracy-sparsity frontier")
    assert "This DEFT run trained no density loss (coef 0)" in report
    assert "-0.0%" not in report and "reduction" not in report
    assert "training density over the 80 masked steps after the ramp (set-point 0.995 in force)" in report
    results["deft_config"]["coef"] = 1.0
    assert "trained no density loss" not in format_report(results)


def test_training_density_is_measured_after_the_ramp():
    from deft_cli.demo import setpoint_training_density

    history = [{"step": i, "density": 0.5 if i < 6 else 0.01, **({"dense_step": True} if i % 3 == 2 else {})}
               for i in range(10)]
    assert setpoint_training_density(history, 6) == (pytest.approx(0.01), 3)  # steps 6, 7, 9
    assert setpoint_training_density(history, 10) == (None, 0)


def test_density_plot_without_the_density_loss():
    from deft_cli.demo import density_figure

    results = demo_results()
    fig = density_figure(results)
    left = fig.axes[0]
    labels = [text.get_text() for text in left.texts]
    assert len(fig.axes) == 2  # no coef axis: coef 0 throughout
    assert labels and all(not label.startswith("--") and label != "-0%" for label in labels), labels
    assert "mean change" in left.get_title() and "reduction" not in left.get_title()
    for h in results["deft"]["history"]:
        h["coef"] = 1.0
    assert len(density_figure(results).axes) == 3


def test_overall_progress_estimates_the_time_left():
    from deft_cli.demo import DemoSettings, OverallProgress

    progress = OverallProgress.of_demo(DemoSettings(steps=10, batch_size=4, calibration_texts=20), 10,
                                       ("peft", "deft"), grid=(0.0, 0.5))
    assert progress.units == {"training": 100.0, "evaluation": 10.0, "frontier": 30.0}
    progress.started = time.time() - 100
    line = progress.finished("peft", "training", 100.0)  # 1 s per unit so far
    assert line.startswith("overall: 1 of 6 phases done (PEFT training took 1 min 40 s); 1 min 40 s elapsed")
    assert progress.estimate("peft", "frontier") == pytest.approx(30.0)
    assert progress.estimate("deft", "training") == 100.0  # from PEFT's training
    assert "about 3 min 0 s left" in line  # 10 + 30 + 100 + 10 + 30
    for run in ("peft", "deft"):
        for phase in ("training", "evaluation", "frontier"):
            last = progress.finished(run, phase, 1.0)
    assert last.endswith("all done")


# ----------------------------------------------------------------------------------------- third-party noise
def test_third_party_messages_are_silenced_one_by_one():
    from deft_cli.processes import quiet_messages

    model = make_model("bert")
    with warnings.catch_warnings(record=True) as probe:  # transformers >= 5.2x warns; axolotl's pinned one does not
        warnings.simplefilter("always")
        model.is_gradient_checkpointing  # noqa: B018
    warns_here = len(probe)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handlers = {name: Keep() for name in ("DeepSpeed", "bitsandbytes.backends.cpu.ops")}
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_messages():
                model.is_gradient_checkpointing  # noqa: B018  (peft asks it; transformers warns)
                warnings.warn("another FutureWarning", FutureWarning)
                logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
                logging.getLogger("DeepSpeed").warning("another DeepSpeed message")
                logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                    "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no kernels")
            model.is_gradient_checkpointing  # noqa: B018  (outside: as before)
            logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. again")
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
    shown = [str(w.message) for w in seen]
    assert shown[0] == "another FutureWarning" and len(shown) == 1 + warns_here
    assert all("is_gradient_checkpointing" in message for message in shown[1:])
    assert records == ["another DeepSpeed message", "Setting accelerator to CPU. again"]


# ---------------------------------------------------------------------------------------- README, examples
def test_readme_shows_the_report_of_its_demo_run():
    """The README's demo output is what `format_report` prints for docs/demo_results.json (less the line that
    says how peak memory is measured, which the README explains in prose)."""
    from deft_cli.demo import format_report

    readme = (ROOT / "README.md").read_text()
    start = readme.index("```text\nAccuracy-sparsity frontier") + len("```text\n")
    shown = readme[start:readme.index("```", start)].rstrip("\n")
    report = "\n".join(line for line in format_report(demo_results()).splitlines()
                       if not line.startswith("peak memory: "))
    assert shown == report


def test_readme_and_examples_agree_on_the_tiny_model():
    import re

    readme = (ROOT / "README.md").read_text()
    assert "The tiny model the Python examples below use: `python examples/make_tiny_model.py --family opt`" in readme
    for script in ("hf_trainer.py", "trl_sft.py", "deepspeed_loop.py"):
        assert "python examples/make_tiny_model.py --family opt" in (ROOT / "examples" / script).read_text(), script
    axolotl = (ROOT / "examples" / "axolotl" / "deft_lora.yml").read_text()
    assert re.search(r"python examples/make_tiny_model.py +#", axolotl)  # the default family
    assert 'default="llama"' in (ROOT / "examples" / "make_tiny_model.py").read_text()
    assert "The Axolotl example uses the script's default, a\ntiny Llama" in readme


def test_demo_help_names_every_file_it_writes(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR where to write results.json, density.png and frontier.png" in help_text
