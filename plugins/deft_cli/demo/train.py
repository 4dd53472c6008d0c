"""One training run of the demo: LoRA fine-tuning, as plain PEFT or with DEFT's density loss engine.

The step pieces (`step_loss`, `optimizer_step`, `make_optimizer`) are the ones `deft bench` trains its variants
with, so the CLI has one training step.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from deft_common import DensityLossEngine

from .data import batches, encode, training_order
from .model import MeanPoolClassifier, seeded_classifier
from .settings import DemoSettings, resolve_device


@dataclass
class TrainedRun:
    """What train_run leaves: the trained model, its tokenizer and how the training went."""

    name: str  # "PEFT" or "DEFT"
    model: MeanPoolClassifier
    tokenizer: object
    device: str
    history: list[dict] = field(default_factory=list)  # one entry per step: task loss (DEFT: coef, density, ...)
    train_seconds: float = 0.0
    peak: dict = field(default_factory=dict)  # peak_memory_mb, peak_memory_kind (CPU: training_memory_increase_mb)


def make_optimizer(model: MeanPoolClassifier, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over the classifier's parameter groups, no weight decay."""
    return torch.optim.AdamW(model.parameter_groups(), lr=learning_rate, weight_decay=0.0)


def step_loss(model, batch: dict, engine: DensityLossEngine | None = None, step: int = 0):
    """(loss, task loss) of one training forward: the task loss alone without an engine; with one, the forward
    is recorded (`step`: optimizer steps done, for the set-point's ramp) and the density term added."""
    if engine is None:
        task_loss = model(**batch).loss
        return task_loss, task_loss
    with engine.recording(batch, step):
        task_loss = model(**batch).loss
    return task_loss + engine.term(step), task_loss


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    """Backward, optimizer (and scheduler) step, gradients cleared."""
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_run(settings: DemoSettings, use_deft: bool, train: list[dict], num_labels: int) -> TrainedRun:
    """Fine-tune settings.model with LoRA for settings.steps steps on `train` (plus the density term of
    settings.deft when use_deft); the engine's hooks are off the model afterwards."""
    import transformers
    from tqdm.auto import tqdm

    name = "DEFT" if use_deft else "PEFT"
    device = resolve_device(settings.device)
    tokenizer, model = seeded_classifier(settings, num_labels)
    model.to(device)
    run = TrainedRun(name, model, tokenizer, device)

    train_ids, train_labels = encode(tokenizer, train, settings.max_length), [r["label"] for r in train]
    order = training_order(len(train), settings.steps, settings.batch_size, settings.seed)

    # Plain PEFT trains without any hook; DEFT adds the loss engine (tracker, weight or controller, term).
    engine = DensityLossEngine(model.body, settings.deft, device) if use_deft else None
    if engine is not None:
        engine.check_ramp(settings.steps)
    optimizer = make_optimizer(model, settings.learning_rate)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(0.06 * settings.steps), settings.steps)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    model.train()
    start = time.perf_counter()
    steps = batches(tokenizer, train_ids, train_labels, order, settings.batch_size, device)
    bar = tqdm(range(settings.steps), desc=f"{name} training", unit="step", dynamic_ncols=True)
    for step in bar:
        loss, task_loss = step_loss(model, next(steps), engine, step)
        optimizer_step(loss, optimizer, scheduler)
        entry = {"step": step, "task_loss": round(task_loss.item(), 5)}
        if engine is not None:
            entry |= _engine_entry(engine)
            bar.set_postfix(loss=f"{entry['task_loss']:.3f}", density=f"{entry['density']:.3f}",
                            coef=f"{engine.coef:.3g}")
        else:
            bar.set_postfix(loss=f"{entry['task_loss']:.3f}")
        run.history.append(entry)
    run.train_seconds = time.perf_counter() - start
    run.peak = _peak_memory(device, rss_before)
    if engine is not None:
        engine.remove()
    return run


def _engine_entry(engine: DensityLossEngine) -> dict:
    """The DEFT part of a step's history entry: weight, training density, set-point, controller error."""
    entry = {"coef": round(engine.coef, 6), "density": round(engine.tracker.mean_density(0.0), 5)}
    if engine.setpoint is not None:
        entry["sparsity_setpoint"] = round(engine.setpoint.current_sparsity, 5)
        if engine.setpoint.is_dense_step(engine.setpoint.current_step):
            entry["dense_step"] = True  # setpoint_dense_every: this step trained without the mask
    if engine.coef_schedule.controller is not None:
        engine.end_step()  # the controller takes this step's density now (at DeftConfig.threshold)
        entry["density_error"] = round(engine.coef_schedule.log()["deft/density_error"], 5)
    return entry


def _peak_memory(device: str, rss_before: float) -> dict:
    if device == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_memory_kind": "torch.cuda.max_memory_allocated during training"}
    return {"peak_memory_mb": _peak_rss_mb(), "training_memory_increase_mb": _peak_rss_mb() - rss_before,
            "peak_memory_kind": "peak resident memory (RSS) of the training process, Python, torch and model "
                                "included; the increase is over the RSS just before the first step"}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
