"""Scoring a trained run: held-out accuracy and density, the accuracy-sparsity frontier and ADA-DEFT inference."""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from deft_common import DeftConfig, apply_ada_deft, layer_weights

from ..density import mean, measure_density, relative_reduction
from ..frontier import SPARSITY_GRID, accuracy_frontier
from ..measure import compare_inference, memory_kind
from .data import scoring_batches
from .settings import ADA_TIMED_BATCHES, DemoSettings, calibration_count
from .train import TrainedRun


def evaluate_run(settings: DemoSettings, run: TrainedRun, train: list[dict], held_out: list[dict],
                 grid=SPARSITY_GRID, on_phase=None) -> dict:
    """Accuracy and per-layer density on held_out, then the frontier over `grid` (thresholds calibrated on the
    first settings.calibration_texts training texts) and, for an adaptive DEFT run, ADA-DEFT inference.
    on_phase(phase, seconds) is called after each phase ("evaluation", "frontier")."""
    from tqdm.auto import tqdm

    correct = 0

    def score(batch, outputs):
        nonlocal correct
        correct += int((outputs.logits.argmax(-1) == batch["labels"]).sum())

    eval_start = time.perf_counter()
    scored = scoring_batches(run.tokenizer, held_out, settings.max_length, run.device)
    eval_bar = tqdm(scored, desc=f"{run.name} evaluation", unit="batch", dynamic_ncols=True)
    layers = measure_density(run.model, eval_bar, settings.threshold, on_outputs=score, body=run.model.body)
    eval_seconds = time.perf_counter() - eval_start
    accuracy = correct / len(held_out)
    if on_phase is not None:
        on_phase("evaluation", eval_seconds)

    frontier_start = time.perf_counter()
    frontier = run_frontier(settings, run, train, scored, {"density": mean(layers), "accuracy": accuracy}, grid)
    config = settings.deft
    ada = ada_inference(run.model, scored, config, run.device, accuracy) \
        if run.name == "DEFT" and config.adaptive else None
    frontier_seconds = time.perf_counter() - frontier_start  # ADA-DEFT inference included
    if on_phase is not None:
        on_phase("frontier", frontier_seconds)
    return {
        **({"ada": ada} if ada is not None else {}),
        "accuracy": accuracy,
        "density": mean(layers),
        "density_thresholded": mean(layers, "thresholded"),
        "layers": [dataclasses.asdict(layer) for layer in layers],
        "frontier": frontier,
        "eval_seconds": round(eval_seconds, 2),
        "frontier_seconds": round(frontier_seconds, 2),
    }


def run_frontier(settings: DemoSettings, run: TrainedRun, train: list[dict], scored: list[dict], dense: dict,
                 grid=SPARSITY_GRID) -> list[dict]:
    """The accuracy-sparsity frontier of a trained run: calibrated on training texts, scored on `scored` (the
    held-out batches); `dense` ({"density", "accuracy"} of those batches) is its point 0."""
    from tqdm.auto import tqdm

    config = settings.deft
    texts = train[:calibration_count(settings, len(train))]
    calibration = scoring_batches(run.tokenizer, texts, settings.max_length, run.device)
    return accuracy_frontier(
        run.model, run.model.body, calibration, scored, grid=grid, dense=dense,
        config=DeftConfig(coef=0.0, capture=config.capture, layers=config.layers, modules=config.modules),
        progress=lambda points: tqdm(points, desc=f"{run.name} frontier", unit="sparsity", dynamic_ncols=True))


def ada_inference(model, batches: list[dict], config: DeftConfig, device, accuracy: float) -> dict:
    """ADA-DEFT at inference: skip the MLP blocks the learned weights choose (config.skip_budget or
    skip_threshold) in a copy of `model`, then compare both on the held-out `batches`: accuracy, and forward
    runtime and memory measured side by side (deft_cli.measure)."""
    weights = layer_weights(model.body).weights()
    skipped = copy.deepcopy(model)
    report = apply_ada_deft(skipped.body, config)
    correct = total = 0
    with torch.inference_mode():
        skipped.eval()
        for batch in batches:
            correct += int((skipped(**batch).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    skipped_accuracy = correct / total
    timing = compare_inference({"unskipped": model, "skipped": skipped}, batches[:ADA_TIMED_BATCHES], device)
    full, skip = timing["unskipped"], timing["skipped"]
    return {
        "layer_weights": weights,
        "skipped_blocks": report.blocks,
        "skip_budget": config.skip_budget,
        "skip_threshold": config.skip_threshold,
        "freed_parameters": report.freed_parameters,
        "accuracy_unskipped": accuracy,
        "accuracy_skipped": skipped_accuracy,
        "accuracy_delta_points": 100 * (skipped_accuracy - accuracy),
        "runtime_s_unskipped": full["runtime_s"],
        "runtime_s_skipped": skip["runtime_s"],
        "runtime_saving": relative_reduction(full["runtime_s"], skip["runtime_s"]),
        "memory_mb_unskipped": full["memory_mb"],
        "memory_mb_skipped": skip["memory_mb"],
        "memory_saving": relative_reduction(full["memory_mb"], skip["memory_mb"]),
        "parameters_unskipped": full["parameters"],
        "parameters_skipped": skip["parameters"],
        "runtime_kind": f"median over 5 interleaved rounds of the forward time of {min(ADA_TIMED_BATCHES, len(batches))} held-out "
                        "batches of 32 texts (inference mode)",
        "memory_kind": memory_kind(device) + ", inference on the largest of those batches",
    }
