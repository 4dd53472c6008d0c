"""The default `deft demo` over several seeds: mean and spread of both runs' frontiers.

Each seed is one full default run, from the repository root:

    for seed in 0 1 2; do
        PYTHONPATH=$PWD:$PWD/plugins python -m deft_cli.cli demo --seed $seed --out runs/seed$seed
    done
    python docs/demo_tuning/demo_seeds.py runs/seed0 runs/seed1 runs/seed2

Appends nothing: it (re)writes demo_seeds.jsonl beside this file (one line per seed: settings, frontiers, usable
sparsities, wall times), prints the per-seed table and the mean ± sample standard deviation of the three issue
figures (usable sparsity, accuracy gain at 0.99 over PEFT + thresholds, dense accuracy change), and draws the mean
frontier with the seeds' range as error bars into docs/demo_frontier_seeds.png.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
RUNS = ("peft", "deft")


def load(folder: str) -> dict:
    results = json.loads((pathlib.Path(folder) / "results.json").read_text())
    return {
        "seed": results["settings"]["seed"],
        "settings": results["settings"],
        "frontier": results["frontier"],
        "usable_sparsity": results["usable_sparsity"],
        "accuracy": {run: results[run]["accuracy"] for run in RUNS},
        "seconds": {run: {k: results[run][k] for k in ("train_seconds", "eval_seconds", "frontier_seconds")}
                    for run in RUNS},
    }


def accuracy_of(frontier: list[dict], sparsity: float) -> float:
    return next(p["accuracy"] for p in frontier if p["sparsity"] == sparsity)


def accuracy_at(line: dict, run: str, sparsity: float) -> float:
    return accuracy_of(line["frontier"][run], sparsity)


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (one value: the value alone)."""
    if len(values) == 1:
        return f"{values[0]:+.1f}"
    return f"{statistics.mean(values):+.1f} ± {statistics.stdev(values):.1f}"


def summary(lines: list[dict]) -> str:
    columns = ["seed", "PEFT dense", "DEFT dense", "PEFT @0.99", "DEFT @0.99", "PEFT @0.995", "DEFT @0.995",
               "usable PEFT", "usable DEFT"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for line in lines:
        cells = [line["accuracy"]["peft"], line["accuracy"]["deft"]]
        cells += [accuracy_at(line, run, s) for s in (0.99, 0.995) for run in RUNS]
        usable = [line["usable_sparsity"][run] for run in RUNS]
        rows.append(f"| {line['seed']} | " + " | ".join(f"{c:.3f}" for c in cells) + " | "
                    + " | ".join("none" if u is None else f"{u:g}" for u in usable) + " |")
    gain = [100 * (accuracy_at(l, "deft", 0.99) - accuracy_at(l, "peft", 0.99)) for l in lines]
    dense = [100 * (l["accuracy"]["deft"] - l["accuracy"]["peft"]) for l in lines]
    usable_by_run = {run: [l["usable_sparsity"][run] or 0.0 for l in lines] for run in RUNS}  # None: no grid point
    above = sum(d > p for d, p in zip(usable_by_run["deft"], usable_by_run["peft"]))
    rows += ["", f"DEFT - (PEFT + thresholds) at 0.99: {spread(gain)} pt (mean ± sd over {len(lines)} seeds)",
             f"DEFT dense - PEFT dense: {spread(dense)} pt",
             f"usable sparsity DEFT above PEFT's in {above} of {len(lines)} seeds"]
    return "\n".join(rows)


def plot(lines: list[dict], path: pathlib.Path, title: str = "deft demo") -> None:
    """Mean frontier of both runs over the seeds, the seeds' range as error bars (the seeds share one grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"peft": "#8c8c8c", "deft": "#d95f02"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run in RUNS:
        points = list(zip(*(line["frontier"][run] for line in lines)))  # per grid sparsity, one point per seed
        density = [statistics.mean(p["density"] for p in seeds) for seeds in points]
        accuracy = [[p["accuracy"] for p in seeds] for seeds in points]
        mean = [statistics.mean(a) for a in accuracy]
        ax.errorbar(density, mean, yerr=[[m - min(a) for m, a in zip(mean, accuracy)],
                                         [max(a) - m for m, a in zip(mean, accuracy)]],
                    marker="o", ms=4, lw=1.2, capsize=2, color=colors[run], label=f"{run.upper()} (mean, seed range)")
        for seeds, d, m in zip(points, density, mean):
            if seeds[0]["sparsity"] >= 0.9:
                ax.annotate(f"{seeds[0]['sparsity']:g}", (d, m), fontsize=6, xytext=(2, 3),
                            textcoords="offset points", color=colors[run])
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("exact-zero density after calibrated thresholds (log scale; sparser →)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{title}, seeds {', '.join(str(l['seed']) for l in lines)}: accuracy–sparsity frontier",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(folders: list[str]) -> None:
    lines = sorted((load(f) for f in folders), key=lambda line: line["seed"])
    (HERE / "demo_seeds.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(summary(lines))
    plot(lines, HERE.parent / "demo_frontier_seeds.png")


if __name__ == "__main__":
    main(sys.argv[1:])
