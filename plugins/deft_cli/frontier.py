"""The accuracy–sparsity frontier of a classifier: its accuracy with calibrated thresholds at each sparsity.

Per sparsity s of the grid, every MLP block's |a| at or below its s-quantile (calibrated on training texts, never
the scored ones; deft_common.calibrate_thresholds) is set to exactly 0, and the scored texts give the accuracy and
the exact-zero density that results. The sparsity a user can spend is the largest s whose accuracy stays within
one point of the dense PEFT model of the same run (`usable_sparsity`).
"""

from __future__ import annotations

import torch

from deft_common import DeftConfig, apply_thresholds, measure_histograms

from .density import mean, measure_density

SPARSITY_GRID = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998)
USABLE_TOLERANCE = 0.01  # "usable": at most 1 point below the dense PEFT accuracy of the same run


def accuracy_frontier(model, body, calibration_batches, scored_batches, grid=SPARSITY_GRID,
                      config: DeftConfig | None = None, dense: dict | None = None, progress=None) -> list[dict]:
    """[{"sparsity", "density", "accuracy"}] over `grid`. `model(**inputs).logits` classifies; `body` is the
    transformer inside it whose MLP blocks are thresholded (the model itself when it has no wrapper);
    batches carry "labels". Sparsity 0 is the dense model (no threshold); `dense` ({"density", "accuracy"} of
    the same scored batches, already measured) saves its pass. `progress(points)` wraps the grid (e.g. tqdm)."""
    config = config if config is not None else DeftConfig(coef=0.0)
    histograms = measure_histograms(body, [_inputs(b) for b in calibration_batches], config)
    frontier = []
    for sparsity in (progress or list)(grid):
        if sparsity == 0 and dense is not None:
            frontier.append({"sparsity": 0.0, "density": dense["density"], "accuracy": dense["accuracy"]})
            continue
        handle = apply_thresholds(body, histograms.thresholds(sparsity)) if sparsity > 0 else None
        try:
            accuracy, layers = _score(model, body, scored_batches)
        finally:
            if handle is not None:
                handle.remove()
        frontier.append({"sparsity": sparsity, "density": mean(layers), "accuracy": accuracy})
    return frontier


def usable_sparsity(frontier: list[dict], reference_accuracy: float, tolerance: float = USABLE_TOLERANCE):
    """The largest grid sparsity whose accuracy is at most `tolerance` below `reference_accuracy` (None: none is)."""
    usable = [point["sparsity"] for point in frontier if point["accuracy"] >= reference_accuracy - tolerance - 1e-12]
    return max(usable) if usable else None


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _score(model, body, batches) -> tuple[float, list]:
    correct = total = 0

    def count(batch, outputs):
        nonlocal correct, total
        correct += int((outputs.logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])

    with torch.inference_mode():
        layers = measure_density(model, batches, 0.0, on_outputs=count, body=body)
    return correct / total, layers


def format_frontier(frontier: dict[str, list[dict]], reference_accuracy: float, usable: dict) -> str:
    """Side-by-side table: per grid sparsity, each run's exact-zero density and accuracy."""
    names = list(frontier)
    header = ["sparsity"] + [f"{n.upper()} {col}" for n in names for col in ("density", "accuracy")]
    rows = []
    for i, point in enumerate(frontier[names[0]]):
        row = [f"{point['sparsity']:g}" if point["sparsity"] else "0 (dense)"]
        for n in names:
            p = frontier[n][i]
            row += [f"{p['density']:.4f}", f"{p['accuracy']:.4f}"]
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    usable_text = ", ".join(f"{n.upper()} {usable[n] if usable[n] is not None else 'none'}" for n in names)
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows),
                      f"usable sparsity (accuracy >= dense PEFT {reference_accuracy:.4f} - "
                      f"{100 * USABLE_TOLERANCE:g} pt): {usable_text}"])


def plot_frontier(frontier: dict[str, list[dict]], reference_accuracy: float, path, title: str = "",
                  ranges: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Accuracy against density (log scale) of every run, with the 1-point band below the dense PEFT accuracy.
    `ranges` (e.g. a mean frontier over seeds): per run, the (lowest, highest) accuracy of each point, drawn as
    error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"peft": "#8c8c8c", "deft": "#d95f02"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.axhspan(reference_accuracy - USABLE_TOLERANCE, reference_accuracy, color="#1b9e77", alpha=0.15,
               label=f"within {100 * USABLE_TOLERANCE:g} pt of dense PEFT ({reference_accuracy:.3f})")
    for name, points in frontier.items():
        x, y = [p["density"] for p in points], [p["accuracy"] for p in points]
        if ranges and name in ranges:
            yerr = [[a - low for a, (low, _) in zip(y, ranges[name])], [high - a for a, (_, high) in zip(y, ranges[name])]]
            ax.errorbar(x, y, yerr=yerr, marker="o", ms=4, lw=1.2, capsize=2, color=colors.get(name),
                        label=f"{name.upper()} (mean, range)")
        else:
            ax.plot(x, y, marker="o", ms=4, lw=1.2, color=colors.get(name), label=name.upper())
        for p in points:
            if p["sparsity"] >= 0.9:
                ax.annotate(f"{p['sparsity']:g}", (p["density"], p["accuracy"]), fontsize=6, xytext=(2, 3),
                            textcoords="offset points", color=colors.get(name))
    ax.set_xscale("log")
    ax.invert_xaxis()  # sparser to the right
    ax.set_xlabel("exact-zero density after calibrated thresholds (log scale; sparser →)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title or "accuracy–sparsity frontier (labels: calibrated sparsity)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ a causal LM's perplexity frontier
# `deft demo --job lm`: per sparsity of this grid and capture point, the held-out perplexity after calibrated
# thresholds; "usable" = at most PERPLEXITY_TOLERANCE above the dense PEFT perplexity of the same seed.
LM_SPARSITY_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
PERPLEXITY_TOLERANCE = 0.05


def usable_sparsity_perplexity(frontier: list[dict], reference_perplexity: float, capture: str | None = None,
                               tolerance: float = PERPLEXITY_TOLERANCE, key: str = "perplexity"):
    """The largest grid sparsity (of the points at `capture`, when given) whose `key` perplexity is at most
    `tolerance` above `reference_perplexity` (None: none is)."""
    limit = reference_perplexity * (1.0 + tolerance) + 1e-9
    usable = [p["sparsity"] for p in frontier if (capture is None or p.get("capture") == capture) and p[key] <= limit]
    return max(usable) if usable else None
