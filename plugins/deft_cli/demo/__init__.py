"""`deft demo`: one LoRA fine-tuning run done twice, as plain PEFT and as DEFT, compared on held-out data.

Both runs share the model, data, seed, steps, batch order and LoRA settings; the only difference is the density
term. Each run trains in a fresh subprocess, so its peak memory is its own. Default: all-MiniLM-L6-v2 on IMDB.

The modules, and the public API that `deft demo`, `deft bench` and benchmarks/run.py use (exported here):
- settings: DemoSettings (the job), demo_deft_config (the DEFT run's default DeftConfig), the DEMO_* and ADA_*
  defaults;
- data: load_records (train, held-out, labels), encode, batches, scoring_batches, training_order;
- model: build_classifier / seeded_classifier (tokenizer and MeanPoolClassifier), check_model;
- train: train_run (the training loop, a TrainedRun) and its step pieces step_loss, optimizer_step, make_optimizer;
- evaluate: evaluate_run (accuracy, density, frontier, ADA-DEFT), run_frontier, ada_inference;
- report: summarise (results.json), format_report (the printed report), ada_report, masked_steps;
- plot: plot_density (density.png);
- pipeline: train_and_evaluate (one run, as results.json holds it), prepare, train_runs (each in a subprocess),
  run_demo;
- cli: add_demo_command, demo_command.
"""

from .cli import add_demo_command, demo_command
from .data import batches, encode, load_records, scoring_batches, training_order
from .evaluate import ada_inference, evaluate_run, run_frontier
from .model import MeanPoolClassifier, build_classifier, check_model, seeded_classifier
from .pipeline import RUNS, prepare, run_demo, train_and_evaluate, train_runs
from .plot import check_plotting, plot_density
from .report import ada_report, controller_summary, final_training_density, format_report, masked_steps, summarise
from .settings import (ADA_SKIP_BUDGET, ADA_TARGET_DENSITY, ADA_TIMED_BATCHES, DEFAULT_TARGETS, DEMO_DENSE_EVERY,
                       DEMO_RAMP_SHARE, DEMO_SETPOINT, DemoSettings, demo_deft_config, demo_ramp_steps,
                       parse_skip_budget, resolve_device)
from .train import TrainedRun, make_optimizer, optimizer_step, step_loss, train_run

__all__ = [
    "ADA_SKIP_BUDGET", "ADA_TARGET_DENSITY", "ADA_TIMED_BATCHES", "DEFAULT_TARGETS", "DEMO_DENSE_EVERY",
    "DEMO_RAMP_SHARE", "DEMO_SETPOINT", "RUNS", "DemoSettings", "MeanPoolClassifier", "TrainedRun",
    "ada_inference", "ada_report", "add_demo_command", "batches", "build_classifier", "check_model",
    "check_plotting", "controller_summary", "demo_command", "demo_deft_config", "demo_ramp_steps", "encode",
    "evaluate_run", "final_training_density", "format_report", "load_records", "make_optimizer", "masked_steps",
    "optimizer_step", "parse_skip_budget", "plot_density", "prepare", "resolve_device", "run_demo", "run_frontier",
    "scoring_batches", "seeded_classifier", "step_loss", "summarise", "train_and_evaluate", "train_run",
    "train_runs", "training_order",
]
