"""One benchmark run of a demo job: a spec in, one JSONL row out.

A spec is the job ("classify", the default: `deft demo`'s MiniLM job; "lm": `deft demo --job lm`), the job's
settings (deft_cli.demo.DemoSettings or LmSettings), their DEFT settings (DeftConfig fields, on top of the job's
default DEFT run for the spec's steps: deft_cli.demo.demo_deft_config or lm_deft_config), the seed, which runs to
train ("peft", "deft" or both) and which sparsities of the frontier to score. It goes through the demo's public API
(the same code as `deft demo`; each run in its own subprocess unless --in-process) and appends ONE row (schema
below) to a JSONL file under benchmarks/results/. From the repository root, with the package installed:

    python benchmarks/run.py --set seed=1 --set deft.setpoint_dense_every=2 --name "1 step in 2 dense" \
        [--spec SPEC.json] [--out benchmarks/results/NAME.jsonl]
    python benchmarks/run.py --set job=lm --set seed=1 --out benchmarks/results/lm.jsonl

--spec FILE.json: {"job": ..., "name": ..., "runs": [...], "grid": [...], "settings": {settings fields},
"deft": {DeftConfig fields}}, every key optional; --set KEY=VALUE (repeatable, after the spec): KEY is a settings
field (seed, steps, model, data, ...), deft.FIELD, job, name, runs or grid; VALUE is JSON (1, 0.5, null, true,
["query", "value"]) or else a plain string. Without one: the classify job's defaults, seed 0, both runs, every grid
point. `python benchmarks/table.py` turns the rows into the README's tables.

A run that fails (an exception, or the LM job's refusal of a run that did not improve on the base model) is a row
too: its figures are {"failure": "<error type>: <message>"}, the runs after it are not trained, and the runner exits
with status 1 once the row is written.

Row (schema 1; the classify job): {"schema": 1, "name", "commit", "dirty" (uncommitted changes outside
benchmarks/results), "date" (UTC, ISO 8601), "machine": {"cpu", "torch_threads", "torch", "python", "device"},
"spec": {"seed", "settings" (DemoSettings without deft and out), "deft_config" (DeftConfig.to_dict()), "runs",
"grid", "in_process"}, "data": {"train_texts", "held_out_texts", "labels"},
"figures": {run: {"accuracy" (dense), "density", "density_thresholded", "frontier" ([{"sparsity", "density",
"accuracy"}]), "usable_sparsity" (against this row's PEFT dense accuracy; null without a PEFT run),
"train_seconds", "eval_seconds", "frontier_seconds", "peak_memory_mb", "training_density" (DEFT: mean training
density over the masked ones of the last 20 steps)}}, "wall_seconds"}.

Row of the LM job (schema 1, "job": "lm"): the same keys and "job"; "data": {"train_texts", "held_out_texts",
"format" (chat or plain)}; "figures": {run: {"perplexity", "perplexity_general" (dense), "density", "base"
(the base model's perplexities), "frontier" ([{"sparsity", "capture", "density", "perplexity",
"perplexity_general"}]), "usable_sparsity" ({capture: sparsity}, against this row's PEFT dense perplexity; null
without a PEFT run), "train_seconds", "eval_seconds", "frontier_seconds", "peak_memory_mb", "training_density",
DEFT: "decode" and "decode_limits" as in results.json}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import subprocess
import time

import torch

from deft_cli.demo import (LM_CAPTURES, DemoSettings, LmSettings, demo_deft_config, final_training_density,
                           lm_deft_config, prepare, resolve_device, train_and_evaluate, train_runs)
from deft_cli.demo.lm import prepare_lm, train_and_score_lm
from deft_cli.frontier import LM_SPARSITY_GRID, SPARSITY_GRID, usable_sparsity, usable_sparsity_perplexity
from deft_cli.measure import cpu_name
from deft_cli.processes import in_subprocess

SCHEMA = 1
HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUN_NAMES = ("peft", "deft")
FIGURES = ("accuracy", "density", "density_thresholded", "frontier", "train_seconds", "eval_seconds",
           "frontier_seconds", "peak_memory_mb")
LM_FIGURES = ("perplexity", "perplexity_general", "density", "base", "frontier", "train_seconds", "eval_seconds",
              "frontier_seconds", "peak_memory_mb", "decode", "decode_limits")
# job -> (its settings, its default DEFT settings for a number of steps, its frontier's grid)
JOBS = {"classify": (DemoSettings, demo_deft_config, SPARSITY_GRID),
        "lm": (LmSettings, lm_deft_config, LM_SPARSITY_GRID)}
SPEC_KEYS = {"job", "name", "runs", "grid"}


def settings_fields(job: str) -> set[str]:
    return {f.name for f in dataclasses.fields(JOBS[job][0])} - {"deft", "out"}


@dataclasses.dataclass
class Spec:
    settings: DemoSettings
    name: str | None = None
    runs: tuple[str, ...] = RUN_NAMES
    grid: tuple[float, ...] = SPARSITY_GRID
    job: str = "classify"


def parse_value(text: str):
    """JSON where it parses (numbers, null, true, lists), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def make_spec(spec: dict | None = None, sets: list[str] = ()) -> Spec:
    """The Spec of a spec dict (the --spec file) with the `sets` ("KEY=VALUE") applied on top."""
    spec = json.loads(json.dumps(spec or {}))  # a copy
    settings, deft = spec.pop("settings", {}), spec.pop("deft", {})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        if key.startswith("deft."):
            deft[key.removeprefix("deft.")] = parse_value(value)
        elif key in SPEC_KEYS:
            spec[key] = parse_value(value)
        else:
            settings[key] = parse_value(value)
    job = spec.get("job", "classify")
    if job not in JOBS:
        raise SystemExit(f"job {job!r}: one of {sorted(JOBS)}")
    settings_class, deft_config, default_grid = JOBS[job]
    unknown = set(settings) - settings_fields(job)
    if unknown or set(spec) - SPEC_KEYS:
        raise SystemExit(f"unknown spec keys {sorted(unknown | (set(spec) - SPEC_KEYS))}; settings of the {job} job: "
                         f"{sorted(settings_fields(job))}, deft.<DeftConfig field>, {', '.join(sorted(SPEC_KEYS))}")
    runs = spec.get("runs", list(RUN_NAMES))
    runs = runs.split(",") if isinstance(runs, str) else runs
    if not runs or set(runs) - set(RUN_NAMES):
        raise SystemExit(f"runs {runs!r}: a list of {RUN_NAMES}")
    steps = settings.get("steps", settings_class.steps)
    demo = settings_class(**settings, deft=deft_config(steps, **deft))
    grid = tuple(float(s) for s in spec.get("grid", default_grid))
    return Spec(demo, spec.get("name"), tuple(runs), grid if 0.0 in grid else (0.0, *grid), job)


def git_state() -> dict:
    """The commit of this checkout and whether anything outside benchmarks/results is uncommitted."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", ":/", ":(top,exclude)benchmarks/results"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def machine(device: str) -> dict:
    return {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "device": f"cuda: {torch.cuda.get_device_name()}" if device == "cuda" else device}


def run(spec: Spec, in_process: bool = False) -> dict:
    """Train and score the spec's runs; the row (not yet written)."""
    start = time.perf_counter()
    settings = spec.settings
    data, figures = (lm_figures if spec.job == "lm" else classify_figures)(spec, in_process)
    return {
        "schema": SCHEMA,
        **({"job": spec.job} if spec.job != "classify" else {}),
        "name": spec.name,
        **git_state(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(resolve_device(settings.device)),
        "spec": {"seed": settings.seed,
                 "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k in settings_fields(spec.job)},
                 "deft_config": settings.deft.to_dict(), "runs": list(spec.runs), "grid": list(spec.grid),
                 "in_process": in_process},
        "data": data,
        "figures": figures,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def classify_figures(spec: Spec, in_process: bool) -> tuple[dict, dict]:
    settings = spec.settings
    train, held_out, names = prepare(settings)
    if in_process:
        results = {name: train_and_evaluate(settings, name == "deft", train, held_out, len(names), spec.grid)
                   for name in spec.runs}
    else:
        results = train_runs(settings, train, held_out, len(names), runs=spec.runs, grid=spec.grid)
    reference = results["peft"]["accuracy"] if "peft" in results else None
    figures = {}
    for name, result in results.items():
        figures[name] = {key: result[key] for key in FIGURES} | {
            "usable_sparsity": usable_sparsity(result["frontier"], reference) if reference is not None else None,
            "training_density": final_training_density(result["history"])}
    return {"train_texts": len(train), "held_out_texts": len(held_out), "labels": names}, figures


def lm_figures(spec: Spec, in_process: bool) -> tuple[dict, dict]:
    """The LM job's runs (PEFT first: its dense perplexity is DEFT's reference, its base model scores serve both).
    A run that fails ends the row: its figures are the failure."""
    settings = spec.settings
    train, held_out, chat_template = prepare_lm(settings)
    figures, reference, base = {}, None, None
    for name in [n for n in RUN_NAMES if n in spec.runs]:
        args = (settings, name == "deft", train, held_out, chat_template, reference, base, spec.grid)
        try:
            result = train_and_score_lm(*args) if in_process else in_subprocess(train_and_score_lm, *args)
        except Exception as error:  # written into the row; main() exits with status 1
            figures[name] = {"failure": f"{type(error).__name__}: {error}"}
            break
        if result["refused"]:
            figures[name] = {"failure": f"refused: {result['refused']}"}
            break
        if name == "peft":
            reference, base = result["perplexity"], result["base"]
        figures[name] = {key: result[key] for key in LM_FIGURES if key in result} | {
            "usable_sparsity": ({c: usable_sparsity_perplexity(result["frontier"], reference, c) for c in LM_CAPTURES}
                                if reference is not None else None),
            "training_density": final_training_density(result["history"], "deft/density")}
    data = {"train_texts": len(train), "held_out_texts": len(held_out), "format": "chat" if chat_template else "plain"}
    return data, figures


def failures(row: dict) -> list[str]:
    return [f"{name}: {figures['failure']}" for name, figures in row["figures"].items() if "failure" in figures]


def append_row(row: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", metavar="FILE.json", help="the spec as JSON (module docstring)")
    parser.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                        help="a spec key: a DemoSettings field, deft.<DeftConfig field>, name, runs or grid")
    parser.add_argument("--name", help="the row's name (the variant table.py groups by; same as --set name=...)")
    parser.add_argument("--out", metavar="FILE.jsonl", default=str(RESULTS / "runs.jsonl"),
                        help="the JSONL file the row is appended to (default %(default)s)")
    parser.add_argument("--in-process", action="store_true",
                        help="train in this process (quicker to start; the second run's peak memory is not its own)")
    args = parser.parse_args(argv)
    spec = json.loads(pathlib.Path(args.spec).read_text()) if args.spec else {}
    spec = make_spec(spec, args.sets + ([f"name={json.dumps(args.name)}"] if args.name else []))
    row = run(spec, args.in_process)
    append_row(row, pathlib.Path(args.out))
    for name, figures in row["figures"].items():
        if "failure" in figures:
            continue
        metric = "perplexity" if spec.job == "lm" else "accuracy"
        points = ", ".join(f"{p['sparsity']:g}{'/' + p['capture'] if 'capture' in p else ''}: {p[metric]:.4f}"
                           for p in figures["frontier"])
        print(f"{name.upper()} usable sparsity {figures['usable_sparsity']}; {metric} at {points}")
    print(f"appended a row to {args.out}")
    if failures(row):
        raise SystemExit("failed, recorded in the row: " + "; ".join(failures(row)))
    return row


if __name__ == "__main__":
    main()
