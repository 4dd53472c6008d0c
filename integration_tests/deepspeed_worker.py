"""DeepSpeed runs for test_deepspeed.py. Each command runs in its own process(es), so DeepSpeed's distributed state
never leaks into pytest or between tests; results go to a torch.save file the test compares.

    python deepspeed_worker.py engine OUT                  # raw engine loops, ZeRO 0-3, GA, ADA-DEFT, thresholds,
                                                           # errors (1 proc)
    python -m torch.distributed.run --nproc_per_node 2 deepspeed_worker.py engine_2proc OUT
    python deepspeed_worker.py trainer OUT --stages none,2,3  # HF Trainer (+ DeepSpeed) with deft_hf

Needs MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE in the environment (the test or torchrun sets them).
Model: the tiny fixture Llama with LoRA on every linear layer (reference.lora_model); optimizer: SGD with lr 1, so a
weight's change after one step is minus its gradient and comparing weights compares gradients.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
for path in (HERE.parent / "plugins", HERE.parent, HERE):
    sys.path.insert(0, str(path))

import torch  # noqa: E402

from deft_common import DeftConfig, DensityTracker  # noqa: E402
from fixtures import make_batch, make_collator, make_model, make_train_dataset  # noqa: E402
from processes import end_distributed_worker  # noqa: E402
from reference import lora_model as with_lora  # noqa: E402
from reference import reference_step  # noqa: E402

# eps well above the paper's 1e-7, so that the density term moves the gradients by a clearly measurable amount;
# threshold > 0, so that the density of this random SiLU model (no exact zeros) is a fraction, not 1.0.
CONFIG = DeftConfig(coef=2.0, eps=1e-3, threshold=0.02)
TARGET_CONFIG = DeftConfig(eps=1e-3, threshold=0.02, target_density=0.3, controller_gain=2.0, controller_damping=5.0)
LR = 1.0
ROWS = 4


def lora_model():
    return with_lora(make_model("llama", seed=0))


def lora_weights(model, zero3: bool = False) -> dict[str, torch.Tensor]:
    import deepspeed

    params = {name: p for name, p in model.named_parameters() if "lora_" in name}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero3):
        return {name: p.detach().clone().float() for name, p in params.items()}


def delta(before: dict, after: dict) -> dict[str, torch.Tensor]:
    return {name: after[name] - before[name] for name in before}


def rows(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------- by hand
def reference(batch: dict, config: DeftConfig) -> dict:
    """Loss and gradients of task loss + coef * density loss written out with deft_common (reference.py), as the
    weight change of one SGD step, and the density of the same forward."""
    loss, grads = reference_step(lora_model(), batch, config)
    model = lora_model()
    tracker = DensityTracker(model, config)
    with torch.no_grad(), tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    return {"loss": loss, "delta": {name: -LR * grad for name, grad in grads.items()}, "density": tracker.mean_density()}


# ---------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_step(batch: dict, stage: int, micro: int, config: DeftConfig | None = CONFIG,
                   gas_workaround: bool = False, first_row: int = 0) -> dict:
    """One optimizer step through DeftLossHook + a DeepSpeed engine over `micro`-row micro-batches of this
    process's rows (the default raw loop, or the documented workaround for deepspeed < 0.19.8).
    config None: plain DeepSpeed, no DEFT."""
    import deepspeed

    from deft_deepspeed import DeftLossHook

    world = int(os.environ["WORLD_SIZE"])
    local_rows = batch["input_ids"].shape[0] // world
    gas = local_rows // micro
    model = lora_model()
    hook = None if config is None else DeftLossHook(model, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 by default
        "steps_per_print": 1_000_000,
    })
    before = lora_weights(model, zero3=stage == 3)
    losses = []
    try:
        for start in range(first_row, first_row + local_rows, micro):
            out = engine(**rows(batch, start, start + micro))
            if gas_workaround:
                engine.backward(out.loss / engine.gradient_accumulation_steps(), scale_wrt_gas=False)
            else:
                engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
    except Exception as error:  # reported to the test, which asserts on type and message
        return {"error": f"{type(error).__name__}: {error}"}
    result = {
        "loss": sum(losses) / len(losses),
        "delta": delta(before, lora_weights(model, zero3=stage == 3)),
        "metrics": None if hook is None else hook.last_metrics(),
        "global_steps": engine.global_steps,
    }
    if hook is not None:
        hook.remove()
    return result


def adaptive_steps(batch: dict, stage: int, directory: pathlib.Path) -> dict:
    """ADA-DEFT through DeftLossHook: two optimizer steps, then hook.save_layer_weights(directory). Under ZeRO-3
    every parameter is partitioned (persistence threshold 0; by default DeepSpeed keeps small ones whole)."""
    import deepspeed

    import deft_common
    from deft_common import DeftConfigError, layer_weights
    from deft_deepspeed import DeftLossHook

    model = lora_model()
    hook = DeftLossHook(model, DeftConfig(adaptive=True, eps=1e-3, threshold=0.02))  # before deepspeed.initialize
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": ROWS, "zero_allow_untested_optimizer": True, "steps_per_print": 1_000_000,
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}})
    metrics = []
    for _ in range(2):
        engine.backward(engine(**batch).loss)
        engine.step()
        metrics.append(hook.last_metrics())
    weights = layer_weights(model)
    try:  # deft_common alone cannot read a partitioned parameter: it must say so, not save nothing
        deft_common.save_layer_weights(model, directory / "core")
        core_error = None
    except DeftConfigError as error:
        core_error = str(error)
    saved = hook.save_layer_weights(directory)
    hook.remove()
    return {"metrics": metrics, "saved": str(saved), "names": weights.names, "core_save_error": core_error,
            "partitioned": weights.logits.numel() == 0}


THRESHOLDS_CONFIG = DeftConfig(eps=1e-3, threshold=0.02, inference_sparsity=0.7, calibration_batches=1)


def thresholds_after_training(batch: dict, stage: int, directory: pathlib.Path, micro: int = ROWS,
                              first_row: int = 0) -> dict:
    """DeftConfig.inference_sparsity through DeftLossHook: one optimizer step on this process's rows, then
    hook.save_thresholds(directory, batches) on every process (calibration_batches=1: only the first batch)."""
    import deepspeed

    from deft_common import SparsityThresholds, calibrate_thresholds
    from deft_deepspeed import DeftLossHook

    model = lora_model()
    hook = DeftLossHook(model, THRESHOLDS_CONFIG)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": micro, "zero_allow_untested_optimizer": True, "steps_per_print": 1_000_000,
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}})
    mine = rows(batch, first_row, first_row + micro)
    engine.backward(engine(**mine).loss)
    engine.step()
    saved = hook.save_thresholds(directory, [mine, rows(batch, 0, 1)])
    result = {"thresholds": saved.thresholds, "tokens": saved.tokens, "log": saved.log()}
    if stage == 0:  # by hand, deft_common on the trained model and the same batch
        result["by_hand"] = calibrate_thresholds(model, [mine], 0.7, THRESHOLDS_CONFIG).thresholds
    torch.distributed.barrier()
    result["file"] = SparsityThresholds.load(directory).thresholds  # rank 0 wrote it
    hook.remove()
    return result


def setpoint_steps(batch: dict, stage: int) -> list[dict]:
    """DeftConfig.sparsity_setpoint through DeftLossHook: 3 optimizer steps of 2 micro-batches (GA 2), every
    2nd step dense (setpoint_dense_every=2); the metrics of each step."""
    import deepspeed

    from deft_deepspeed import DeftLossHook

    model = lora_model()
    hook = DeftLossHook(model, DeftConfig(coef=0.0, sparsity_setpoint=0.8, setpoint_ramp_steps=2,
                                           setpoint_dense_every=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000, "zero_optimization": {"stage": stage}})
    metrics = []
    for _ in range(3):
        for start in (0, 2):
            engine.backward(engine(**rows(batch, start, start + 2)).loss)
            engine.step()
        metrics.append(hook.last_metrics())
    hook.remove()
    return metrics


def run_engine(path: pathlib.Path) -> None:
    import deepspeed

    from deft_common import DeftLossError
    from deft_deepspeed import DeftLossHook

    deepspeed.init_distributed(dist_backend="gloo")
    padded = make_batch("llama", ROWS, 12, padding=True, seed=0)
    full = make_batch("llama", ROWS, 12, padding=False, seed=1)  # equal rows: 4 micro-batches of 1 == 1 of 4
    results = {
        "deepspeed_version": deepspeed.__version__,
        "reference": reference(padded, CONFIG),
        "reference_task_only": reference(padded, DeftConfig(coef=0.0, eps=CONFIG.eps, threshold=CONFIG.threshold)),
        "reference_full": reference(full, CONFIG),
    }
    for stage in (0, 1, 2, 3):
        results[f"stage{stage}"] = deepspeed_step(padded, stage, micro=ROWS)
    for stage in (0, 3):
        results[f"adaptive_stage{stage}"] = adaptive_steps(padded, stage, path.parent / f"adaptive_stage{stage}")
    for stage in (0, 2):
        results[f"setpoint_stage{stage}"] = setpoint_steps(full, stage)
    for stage in (0, 3):
        results[f"thresholds_stage{stage}"] = thresholds_after_training(full, stage, path.parent / f"thresholds{stage}")
    for stage in (0, 3):
        results[f"full_stage{stage}_1x4"] = deepspeed_step(full, stage, micro=ROWS)
        results[f"full_stage{stage}_4x1"] = deepspeed_step(full, stage, micro=1)
        results[f"full_stage{stage}_4x1_workaround"] = deepspeed_step(full, stage, micro=1, gas_workaround=True)

    # coef_warmup_steps follows engine.global_steps without any line in the loop.
    model = lora_model()
    hook = DeftLossHook(model, DeftConfig(coef=2.0, eps=1e-3, coef_warmup_steps=4))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": ROWS, "zero_optimization": {"stage": 0}, "steps_per_print": 1_000_000})
    coefs = []
    for _ in range(3):
        out = engine(**padded)
        coefs.append(hook.last_metrics()["deft/loss"] / hook.tracker.density_loss().item())
        engine.backward(out.loss)
        engine.step()
    results["warmup_coefs"] = coefs

    # target_density: the controller is fed each step's density when engine.step() advances global_steps.
    steered = lora_model()
    steering = DeftLossHook(steered, TARGET_CONFIG)
    sgd = torch.optim.SGD([p for p in steered.parameters() if p.requires_grad], lr=0.01)
    controlled, *_ = deepspeed.initialize(model=steered, optimizer=sgd, config={
        "train_micro_batch_size_per_gpu": ROWS, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000})
    target_metrics = []
    for _ in range(3):
        controlled.backward(controlled(**padded).loss)
        controlled.step()
        target_metrics.append(steering.last_metrics())
    results["target_metrics"] = target_metrics
    steering.remove()

    # A forward without labels: the model returns no loss.
    unlabelled = {key: value for key, value in padded.items() if key != "labels"}
    try:
        engine(**unlabelled)
        results["no_loss_error"] = None
    except DeftLossError as error:
        results["no_loss_error"] = str(error)
    # Evaluation forwards are left alone.
    engine.eval()
    with torch.no_grad():
        results["eval_loss_is_task_loss"] = bool(
            torch.allclose(engine(**padded).loss, model.get_base_model()(**padded).loss)
        )
    torch.save(results, path)


# deepspeed 0.18.9 on CPU now and then returns garbage for one gradient of a ZeRO-3 step in 2 processes, with or
# without DEFT (measured with deepspeed_step: 4 of 102 plain steps, 12 of 102 with DEFT; none of 66 each on deepspeed
# 0.19.8). So every 2-process run is repeated, and the tests compare the repeats with one process (test_deepspeed.py).
REPEATS_2PROC = 5


def run_engine_2proc(path: pathlib.Path) -> None:
    """Per ZeRO stage, "stage{N}" and "thresholds_stage{N}": lists of REPEATS_2PROC runs, each from a fresh model and
    engine; when DeepSpeed fails the first step, "stage{N}" holds that one failed run and "stage{N}_plain" the same
    step without DEFT."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    full = make_batch("llama", ROWS, 12, padding=False, seed=1)
    per_rank = ROWS // world
    results = {"world_size": world}
    for stage in (2, 3):
        def step(config=CONFIG):
            return deepspeed_step(full, stage, micro=per_rank, first_row=rank * per_rank, config=config)

        results[f"stage{stage}"] = runs = [step()]
        if "error" in runs[0]:  # does DeepSpeed run this setup at all, without DEFT?
            results[f"stage{stage}_plain"] = step(config=None)
            continue
        runs += [step() for _ in range(REPEATS_2PROC - 1)]
        results[f"thresholds_stage{stage}"] = [
            thresholds_after_training(full, stage, path.parent / f"thresholds{stage}_{repeat}", micro=per_rank,
                                      first_row=rank * per_rank)
            for repeat in range(REPEATS_2PROC)]
    if rank == 0:
        torch.save(results, path)
    end_distributed_worker()


# ---------------------------------------------------------------------------------------------- HF Trainer
def run_trainer(path: pathlib.Path, stages: list[str]) -> None:
    """Train 2 optimizer steps (GA 2) with DeftTrainerMixin and with DeftCallback, for each stage in `stages`
    ("none" = no DeepSpeed, "2", "3" = ZeRO stage) one after the other in this process."""
    from transformers import Trainer, TrainingArguments

    from deft_hf import DeftCallback, DeftTrainerMixin

    class DeftTrainer(DeftTrainerMixin, Trainer):
        pass

    # The models first: built after TrainingArguments with ZeRO-3 exists, they would be initialised partitioned
    # (zero.Init) from a different random stream than in the run without DeepSpeed.
    models = {(stage, adapter): lora_model() for stage in stages for adapter in ("mixin", "callback")}
    results = {stage: {} for stage in stages}
    for (stage, adapter), model in models.items():
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(
                output_dir=output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                seed=0, disable_tqdm=True, deepspeed=None if stage == "none" else _trainer_deepspeed_config(stage),
            )
            common = dict(model=model, args=args, train_dataset=make_train_dataset("llama", n=16, seq_len=16),
                          data_collator=make_collator("llama"))
            if adapter == "mixin":
                trainer = DeftTrainer(**common, deft_config=CONFIG)
            else:
                trainer = Trainer(**common, callbacks=[DeftCallback(CONFIG)])
            trainer.train()
            logs = [entry for entry in trainer.state.log_history if "loss" in entry and "deft/density" in entry]
            results[stage][adapter] = {
                "loss": [entry["loss"] for entry in logs],
                "density": [entry["deft/density"] for entry in logs],
                "deft_loss": [entry["deft/loss"] for entry in logs],
                "engine": type(trainer.model_wrapped).__name__,
                "zero_stage": getattr(trainer.model_wrapped, "zero_optimization_stage", lambda: None)(),
            }
    torch.save(results, path)


def _trainer_deepspeed_config(stage: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
                                                   "torch_adam": True}},
        "zero_optimization": {"stage": int(stage)},
        "steps_per_print": 1_000_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["engine", "engine_2proc", "trainer"])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--stages", default="none", help="trainer: comma-separated, e.g. none,2,3")
    args = parser.parse_args()
    if args.command == "engine":
        run_engine(args.out)
    elif args.command == "engine_2proc":
        run_engine_2proc(args.out)
    else:
        run_trainer(args.out, args.stages.split(","))


if __name__ == "__main__":
    main()
