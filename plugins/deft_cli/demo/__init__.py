"""`deft demo`: one LoRA fine-tuning run done twice, as plain PEFT and as DEFT, compared on held-out data.

Both runs share the model, data, seed, steps, batch order and LoRA settings; the only difference is the density
term. Each run trains in a fresh subprocess, so its peak memory is its own. Default: all-MiniLM-L6-v2 on IMDB.

The modules, and the public API that `deft demo`, `deft bench` and benchmarks/run.py use (exported here):
- settings: DemoSettings (the job; DemoSettings.check checks every setting before anything loads),
  demo_deft_config (the DEFT run's default DeftConfig), calibration_count, the DEMO_*, ADA_* and CALIBRATION_TEXTS
  defaults;
- data: load_records (train, held-out, labels), encode, batches, scoring_batches, training_order;
- model: build_classifier / seeded_classifier (tokenizer and MeanPoolClassifier), check_model;
- train: train_run (the training loop, a TrainedRun) and its step pieces step_loss, optimizer_step, make_optimizer;
- evaluate: evaluate_run (accuracy, density, frontier, ADA-DEFT), run_frontier, ada_inference;
- report: summarise (results.json), format_report (the printed report), ada_report, masked_steps,
  setpoint_training_density, chance_level / chance_warnings (results.json's "warnings"), density_loss_on;
- plot: plot_density (density.png), density_figure;
- progress: OverallProgress (the overall line after each of the six phases);
- pipeline: train_and_evaluate (one run, as results.json holds it), prepare, train_runs (each in a subprocess),
  run_demo;
- cli: add_demo_command, demo_command, demo_settings (the checked DemoSettings of the arguments; LmSettings with
  --job lm), lm_settings;
- lm (`deft demo --job lm`, causal-LM SFT through TRL): LmSettings and lm_deft_config (settings), load_lm_records,
  check_causal_lm, train_and_score_lm (one run in its subprocess), perplexity, lm_frontier, decode_rows,
  decode_limit, run_lm_demo; lm_report: summarise_lm, format_lm_report, plot_lm_frontier; general_text: the
  general English text the LM frontier also scores; lm_data (`python -m deft_cli.demo.lm_data OUT.jsonl`): the LM
  job's training split as chat messages, for examples/axolotl/deft_lm_sft.yml.
"""

from .cli import add_demo_command, demo_command, demo_settings, lm_settings
from .data import batches, encode, load_records, scoring_batches, training_order
from .evaluate import ada_inference, evaluate_run, run_frontier
from .general_text import GENERAL_TEXT, GENERAL_TEXT_NAME
from .lm import (check_causal_lm, decode_limit, decode_rows, lm_frontier, load_lm_records, perplexity, run_lm_demo,
                 train_and_score_lm)
from .lm_report import format_lm_report, plot_lm_frontier, summarise_lm
from .model import MeanPoolClassifier, build_classifier, check_model, seeded_classifier
from .pipeline import RUNS, prepare, run_demo, train_and_evaluate, train_runs
from .plot import check_plotting, density_figure, plot_density
from .progress import OverallProgress
from .report import (ada_report, chance_level, chance_warnings, controller_summary, density_loss_on,
                     final_training_density, format_report, masked_steps, setpoint_training_density, summarise)
from .settings import (ADA_SKIP_BUDGET, ADA_TARGET_DENSITY, ADA_TIMED_BATCHES, CALIBRATION_TEXTS, DEFAULT_TARGETS,
                       DEMO_DENSE_EVERY, DEMO_RAMP_SHARE, DEMO_SETPOINT, JOBS, LM_CALIBRATION_TEXTS, LM_CAPTURE,
                       LM_CAPTURES, LM_DENSE_EVERY, LM_SETPOINT, DemoSettings, LmSettings, calibration_count,
                       demo_deft_config, demo_ramp_steps, lm_deft_config, parse_skip_budget, resolve_device)
from .train import TrainedRun, make_optimizer, optimizer_step, step_loss, train_run

__all__ = [
    "ADA_SKIP_BUDGET", "ADA_TARGET_DENSITY", "ADA_TIMED_BATCHES", "CALIBRATION_TEXTS", "DEFAULT_TARGETS",
    "DEMO_DENSE_EVERY", "DEMO_RAMP_SHARE", "DEMO_SETPOINT", "RUNS", "DemoSettings", "MeanPoolClassifier",
    "OverallProgress", "TrainedRun", "ada_inference", "ada_report", "add_demo_command", "batches",
    "build_classifier", "calibration_count", "chance_level", "chance_warnings", "check_model", "check_plotting",
    "controller_summary", "demo_command", "demo_deft_config", "demo_ramp_steps", "demo_settings",
    "density_figure", "density_loss_on", "encode", "evaluate_run", "final_training_density", "format_report",
    "load_records", "make_optimizer", "masked_steps", "optimizer_step", "parse_skip_budget", "plot_density",
    "prepare", "resolve_device", "run_demo", "run_frontier", "scoring_batches", "seeded_classifier",
    "setpoint_training_density", "step_loss", "summarise", "train_and_evaluate", "train_run", "train_runs",
    "training_order",
    # --job lm
    "GENERAL_TEXT", "GENERAL_TEXT_NAME", "JOBS", "LM_CALIBRATION_TEXTS", "LM_CAPTURE", "LM_CAPTURES", "LM_DENSE_EVERY",
    "LM_SETPOINT", "LmSettings", "check_causal_lm", "decode_limit", "decode_rows", "format_lm_report",
    "lm_deft_config", "lm_frontier", "lm_settings", "load_lm_records", "perplexity", "plot_lm_frontier",
    "run_lm_demo", "summarise_lm", "train_and_score_lm",
]
