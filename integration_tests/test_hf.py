"""deft_hf on the real transformers Trainer / Seq2SeqTrainer: DeftCallback and DeftTrainerMixin.

Checks what a user relies on: the density term really reaches the optimised loss and the gradients (equal to
deft_common by hand), gradient accumulation does not change it, density falls in training, the metrics reach
state.log_history and the reporting callbacks, and the setups the callback cannot serve fail loudly.
"""

from __future__ import annotations

import logging

import pytest
import torch
from fixtures import make_batch, make_collator, make_model, make_train_dataset
from reference import (controller_weights, GradCapture, assert_ada_deft_reloads, assert_grads_close, dataset_from_batch, disable_dropout,
                       lora_model, reference_step)
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from deft_common import (DeftConfig, DeftConfigError, DensityTracker, SparsityThresholds, apply_thresholds,
                         attach_layer_weights, calibrate_thresholds, layer_weights)
from deft_common import THRESHOLDS_FILE
from deft_hf import DeftCallback, DeftCallbackError, DeftTrainerMixin

KINDS = ["callback", "mixin"]


def build_trainer(kind, model, train_dataset, config, tmp_path, trainer_cls=Trainer, callbacks=(), collator=None,
                  eval_dataset=None, **args):
    """A `trainer_cls` with DEFT through DeftCallback (kind="callback") or DeftTrainerMixin (kind="mixin").
    SGD and no gradient clipping, so that weights and gradients follow the loss linearly."""
    args_cls = Seq2SeqTrainingArguments if issubclass(trainer_cls, Seq2SeqTrainer) else TrainingArguments
    defaults = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                    disable_tqdm=True, optim="sgd", learning_rate=0.1, max_grad_norm=0, logging_steps=1,
                    per_device_train_batch_size=4, max_steps=1, seed=0)
    common = dict(model=model, args=args_cls(**{**defaults, **args}), train_dataset=train_dataset,
                  eval_dataset=eval_dataset, data_collator=collator or default_data_collator)
    if kind == "mixin":
        cls = type(f"Deft{trainer_cls.__name__}", (DeftTrainerMixin, trainer_cls), {})
        return cls(**common, callbacks=list(callbacks), deft_config=config)
    return trainer_cls(**common, callbacks=[*callbacks, DeftCallback(config)])


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# ----------------------------------------------------------------------------------------- the loss itself
@pytest.mark.parametrize("family,trainer_cls", [("llama", Trainer), ("t5", Seq2SeqTrainer)])
@pytest.mark.parametrize("kind", KINDS)
def test_one_step_equals_deft_common_by_hand(kind, family, trainer_cls, tmp_path):
    config = DeftConfig(coef=2.0)
    batch = make_batch(family, batch_size=4, seq_len=8)  # the last row is half padding
    model = disable_dropout(lora_model(make_model(family)))
    ref_loss, ref_grads = reference_step(model, batch, config)
    _, task_only_grads = reference_step(model, batch, DeftConfig(coef=0.0))

    capture = GradCapture()
    trainer = build_trainer(kind, model, dataset_from_batch(batch), config, tmp_path, trainer_cls, [capture])
    trainer.train()

    assert train_logs(trainer)[0]["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert_grads_close(capture.grads, ref_grads)
    assert any("lora_A" in n for n in capture.grads) and any("lora_B" in n for n in capture.grads)
    changed = [n for n in ref_grads if not torch.allclose(ref_grads[n], task_only_grads[n], rtol=1e-3, atol=1e-6)]
    assert changed, "the density term must change the LoRA gradients"


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_accumulation_4x1_equals_1x4(kind, family, tmp_path):
    # llama: the Trainer normalises the loss by the step's token count; t5: a per-micro-batch mean divided by GA.
    batch = make_batch(family, batch_size=4, seq_len=8, padding=False)
    runs = {}
    for batch_size, accumulation in [(4, 1), (1, 4)]:
        model = disable_dropout(make_model(family))
        capture = GradCapture()
        trainer = build_trainer(kind, model, dataset_from_batch(batch), DeftConfig(coef=2.0), tmp_path, Trainer,
                                [capture], per_device_train_batch_size=batch_size,
                                gradient_accumulation_steps=accumulation)
        trainer.train()
        runs[accumulation] = capture.grads, weights(model), train_logs(trainer)[0]
    (grads_1, weights_1, log_1), (grads_4, weights_4, log_4) = runs[1], runs[4]
    assert_grads_close(grads_4, grads_1, rtol=1e-3)  # T5 (ReLU) rounds differently per batch shape
    assert_grads_close(weights_4, weights_1, rtol=1e-5)
    assert log_4["loss"] == pytest.approx(log_1["loss"], rel=1e-5)
    assert log_4["deft/loss"] == pytest.approx(log_1["deft/loss"], rel=1e-5)


@pytest.mark.parametrize("kind,family,task,normalised_by_tokens", [
    ("mixin", "llama", "lm", True), ("mixin", "gpt2", "lm", True), ("mixin", "t5", "lm", False),
    ("mixin", "bert", "cls", False), ("mixin", "llama", "cls", False), ("callback", "llama", "lm", True),
    ("callback", "t5", "lm", False),
])
def test_per_batch_mean_losses_are_divided_by_accumulation_like_the_density_term(kind, family, task,
                                                                                  normalised_by_tokens, tmp_path):
    # Models that take **kwargs but ignore num_items_in_batch return a per-batch mean: the Trainer must then divide
    # it by GA (model_accepts_loss_kwargs=False), as it does the density term.
    trainer = build_trainer(kind, make_model(family, task=task), None, DeftConfig(), tmp_path)
    if kind == "callback":
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)  # where it decides
    assert trainer.model_accepts_loss_kwargs is normalised_by_tokens


@pytest.mark.parametrize("kind", KINDS)
def test_reentrant_checkpointing_is_switched_and_the_term_keeps_its_gradient(kind, tmp_path, caplog):
    config = DeftConfig(coef=2.0)
    batch = make_batch("llama", batch_size=4, seq_len=8)
    model = lora_model(make_model("llama"))
    _, ref_grads = reference_step(model, batch, config)
    capture = GradCapture()
    trainer = build_trainer(kind, model, dataset_from_batch(batch), config, tmp_path, Trainer, [capture],
                            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with caplog.at_level(logging.WARNING, logger="deft_hf"):
        trainer.train()
    assert "non-reentrant" in caplog.text
    assert_grads_close(capture.grads, ref_grads)


# ----------------------------------------------------------------------------------------- training effect
def test_density_falls_below_training_without_deft(tmp_path):
    # ReLU OPT: exact zeros are common, so the measured (|a| > 0) density responds within a few steps.
    dataset = make_train_dataset("opt", n=32, seq_len=12)
    densities = {}
    for kind, coef in [("callback", 0.0), ("callback", 1.0), ("mixin", 1.0)]:  # coef 0 measures, adds nothing
        trainer = build_trainer(kind, make_model("opt"), dataset, DeftConfig(coef=coef), tmp_path,
                                collator=make_collator("opt"), optim="adamw_torch", learning_rate=3e-3,
                                max_steps=16, logging_steps=8)
        trainer.train()
        densities[kind, coef] = [h["deft/density"] for h in train_logs(trainer)]
    off, on = densities["callback", 0.0], densities["callback", 1.0]
    assert on[-1] < on[0] and on[-1] < 0.8 * off[-1], densities
    assert densities["mixin", 1.0] == pytest.approx(on, rel=1e-3)  # both adapters train the same way


def test_target_density_steers_the_weight_once_per_optimizer_step(tmp_path):
    # ReLU OPT starts near density 0.5: far above the target, so the weight must rise every step, as the
    # controller fed the density of each optimizer step moves it, the same through both adapters.
    target, gain = 0.05, 1.0
    config = DeftConfig(target_density=target, controller_gain=gain, controller_damping=5.0)
    runs = {}
    for kind in KINDS:
        trainer = build_trainer(kind, make_model("opt"), make_train_dataset("opt", n=16, seq_len=12), config,
                                tmp_path, collator=make_collator("opt"), optim="adamw_torch", learning_rate=3e-3,
                                max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2)
        trainer.train()
        runs[kind] = logs = train_logs(trainer)
        assert len(logs) == 4
        assert logs[0]["deft/coef"] == 0.0 and logs[0]["deft/loss"] == 0.0  # plain fine-tuning until measured
        # the density of a whole step (both micro-batches) feeds the controller, once per step
        assert [h["deft/coef"] for h in logs] == pytest.approx(controller_weights(config, [h["deft/density"] for h in logs]))
        assert all(before["deft/coef"] < after["deft/coef"] for before, after in zip(logs, logs[1:]))
        assert all(entry["deft/loss"] > 0.0 for entry in logs[1:])  # the weight really multiplies the term
        assert all(entry["deft/target_density"] == target for entry in logs)
    assert [h["deft/coef"] for h in runs["mixin"]] == pytest.approx([h["deft/coef"] for h in runs["callback"]])


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_from_a_checkpoint_continues_the_controller_and_the_ada_deft_coef_schedules(kind, tmp_path):
    """train(resume_from_checkpoint=...) ends where the uninterrupted run ends: the controller's weight and the
    ADA-DEFT weights come back from the checkpoint (a PEFT checkpoint alone would restart both)."""
    config = DeftConfig(target_density=0.05, controller_gain=1.0, adaptive=True)

    def run(out, **train_kwargs):
        model = lora_model(make_model("opt"))
        trainer = build_trainer(kind, model, make_train_dataset("opt", n=16, seq_len=12), config, tmp_path,
                                collator=make_collator("opt"), optim="adamw_torch", learning_rate=3e-3, max_steps=4,
                                per_device_train_batch_size=2, gradient_accumulation_steps=2, output_dir=str(out),
                                save_strategy="steps", save_steps=2)
        trainer.train(**train_kwargs)
        weight = trainer.deft_coef_schedule if kind == "mixin" else trainer.callback_handler.callbacks[0].hook.coef_schedule
        return weight.controller.coef, layer_weights(model).logits.detach().clone(), train_logs(trainer)

    coef, logits, logs = run(tmp_path / "whole")
    assert coef > 0.0 and logits.std() > 0  # both moved during training
    resumed_coef, resumed_logits, resumed_logs = run(tmp_path / "resumed",
                                                     resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert [h["step"] for h in resumed_logs] == [1, 2, 3, 4]  # steps 1-2: the checkpoint's log history
    assert resumed_logs[2]["deft/coef"] == pytest.approx(logs[2]["deft/coef"])  # not restarted at 0
    assert resumed_logs[2]["deft/adaptive_weight/model.decoder.layers.0"] == pytest.approx(
        logs[2]["deft/adaptive_weight/model.decoder.layers.0"])
    assert resumed_coef == pytest.approx(coef)
    torch.testing.assert_close(resumed_logits, logits)


@pytest.mark.parametrize("kind", KINDS)
def test_target_density_above_the_density_keeps_the_weight_at_zero(kind, tmp_path):
    trainer = build_trainer(kind, make_model("opt"), make_train_dataset("opt", n=8, seq_len=12),
                            DeftConfig(target_density=0.99), tmp_path, collator=make_collator("opt"), max_steps=2,
                            per_device_train_batch_size=4)
    trainer.train()
    logs = train_logs(trainer)
    assert [h["deft/coef"] for h in logs] == [0.0, 0.0]  # never negative: DEFT does not push density up
    assert all(h["deft/density_error"] < 0 for h in logs[1:])


# ----------------------------------------------------------------------------------------- ADA-DEFT
@pytest.mark.parametrize("kind", KINDS)
def test_ada_deft_coef_schedules_train_are_logged_and_saved_with_every_checkpoint(kind, tmp_path):
    from peft import PeftModel

    model = lora_model(make_model("llama"))
    trainer = build_trainer(kind, model, dataset_from_batch(make_batch("llama", batch_size=4, seq_len=8)),
                            DeftConfig(adaptive=True), tmp_path, optim="adamw_torch", learning_rate=1e-3, max_steps=2,
                            save_strategy="steps", save_steps=2)
    trainer.train()
    weights = layer_weights(model)
    assert weights.logits.requires_grad  # PEFT froze the base model before DEFT attached them, not after
    assert any(p is weights.logits for group in trainer.optimizer.param_groups for p in group["params"])
    logs = train_logs(trainer)
    keys = [f"deft/adaptive_weight/{name}" for name in weights.names]
    assert [entry[keys[0]] for entry in logs][0] == pytest.approx(1.0)  # uniform at the first step
    assert logs[-1][keys[0]] != pytest.approx(1.0) and sum(logs[-1][k] for k in keys) == pytest.approx(len(keys))

    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "out" / "checkpoint-2", tmp_path / "final"):
        assert (folder / "adapter_model.safetensors").is_file()
        fresh = PeftModel.from_pretrained(make_model("llama"), folder)
        assert_ada_deft_reloads(folder, fresh, trained_logits=weights.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_ada_deft_refuses_an_optimizer_built_without_the_weights(kind, tmp_path):
    def trainer_with_own_optimizer(model):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, save_strategy="no")
        common = dict(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
        if kind == "mixin":
            cls = type("DeftTrainer", (DeftTrainerMixin, Trainer), {})
            return cls(**common, deft_config=DeftConfig(adaptive=True))
        return Trainer(**common, callbacks=[DeftCallback(DeftConfig(adaptive=True))])

    model, dataset = _llama_setup()
    with pytest.raises(DeftConfigError, match="optimizer does not hold the ADA-DEFT layer weights"):
        trainer_with_own_optimizer(model).train()  # built before DEFT attached them: they would never train

    model, dataset = _llama_setup()
    attach_layer_weights(model, DeftConfig(adaptive=True))  # the documented fix
    trainer_with_own_optimizer(model).train()
    assert layer_weights(model).logits.detach().abs().max() > 0


# ----------------------------------------------------------------------------------------- sparsity set-point
SETPOINT = DeftConfig(coef=0.0, sparsity_setpoint=0.8, setpoint_ramp_steps=2)


@pytest.mark.parametrize("kind", KINDS)
def test_setpoint_ramps_to_its_density_with_gradient_accumulation(kind, tmp_path):
    trainer = build_trainer(kind, lora_model(make_model("llama")), make_train_dataset("llama", n=24, seq_len=12),
                            SETPOINT, tmp_path, collator=make_collator("llama"), optim="adamw_torch",
                            learning_rate=1e-3, max_steps=3, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2)
    trainer.train()
    logs = train_logs(trainer)
    # each step's forwards use the set-point of the optimizer steps done before it: 0, then half-way, then reached
    assert [h["deft/sparsity_setpoint"] for h in logs] == pytest.approx([0.0, 0.4, 0.8])
    assert logs[0]["deft/density"] == pytest.approx(1.0)  # SiLU: no exact zeros without the set-point
    assert logs[2]["deft/density"] == pytest.approx(0.2, abs=0.01)  # the masked training activations
    assert "deft/loss" not in logs[0] or logs[0]["deft/loss"] == 0.0  # coef 0: the set-point alone


@pytest.mark.parametrize("kind", KINDS)
def test_setpoint_dense_every_trains_every_nth_step_dense_with_gradient_accumulation(kind, tmp_path):
    config = DeftConfig(coef=0.0, sparsity_setpoint=0.8, setpoint_dense_every=2)
    trainer = build_trainer(kind, lora_model(make_model("llama")), make_train_dataset("llama", n=32, seq_len=12),
                            config, tmp_path, collator=make_collator("llama"), optim="adamw_torch",
                            learning_rate=1e-3, max_steps=4, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2)
    trainer.train()
    densities = [h["deft/density"] for h in train_logs(trainer)]
    assert densities == pytest.approx([0.2, 1.0, 0.2, 1.0], abs=0.01)  # both micro-batches of a step alike


@pytest.mark.parametrize("kind", KINDS)
def test_setpoint_step_equals_deft_common_by_hand(kind, tmp_path):
    # set-point 0.5 from the first step together with the paper's loss (coef 2): loss and gradients as by hand
    from deft_common import SparsitySetpoint

    config = DeftConfig(coef=2.0, sparsity_setpoint=0.5)
    batch = make_batch("llama", batch_size=4, seq_len=8)
    model = disable_dropout(lora_model(make_model("llama")))
    setpoint = SparsitySetpoint(model, 0.5, config=config)
    ref_loss, ref_grads = reference_step(model, batch, config)
    setpoint.remove()
    _, dense_grads = reference_step(model, batch, config)
    capture = GradCapture()
    trainer = build_trainer(kind, model, dataset_from_batch(batch), config, tmp_path, callbacks=[capture])
    trainer.train()
    assert train_logs(trainer)[0]["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert_grads_close(capture.grads, ref_grads)
    assert any(not torch.allclose(ref_grads[n], dense_grads[n], rtol=1e-3) for n in ref_grads)  # the mask acted


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_continues_the_setpoint_ramp(kind, tmp_path):
    config = DeftConfig(coef=0.0, sparsity_setpoint=0.9, setpoint_ramp_steps=4)

    def run(out, **train_kwargs):
        trainer = build_trainer(kind, lora_model(make_model("llama")), make_train_dataset("llama", n=16, seq_len=12),
                                config, tmp_path, collator=make_collator("llama"), optim="adamw_torch",
                                learning_rate=1e-3, max_steps=4, per_device_train_batch_size=2, output_dir=str(out),
                                save_strategy="steps", save_steps=2)
        trainer.train(**train_kwargs)
        return train_logs(trainer)

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert [h["deft/sparsity_setpoint"] for h in whole] == pytest.approx([0.0, 0.225, 0.45, 0.675])
    assert [h["deft/sparsity_setpoint"] for h in resumed] == pytest.approx([h["deft/sparsity_setpoint"] for h in whole])
    assert resumed[3]["deft/density"] == pytest.approx(whole[3]["deft/density"], abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_setpoint_ramp_longer_than_the_run_warns(kind, tmp_path):
    from deft_common import SetpointWarning

    model, dataset = _llama_setup()
    trainer = build_trainer(kind, model, dataset, DeftConfig(coef=0.0, sparsity_setpoint=0.9, setpoint_ramp_steps=10),
                            tmp_path, max_steps=2)
    with pytest.warns(SetpointWarning, match="setpoint_ramp_steps=10 is longer than the run .2 steps"):
        trainer.train()


# ----------------------------------------------------------------------------------------- inference thresholds
@pytest.mark.parametrize("family,trainer_cls", [("llama", Trainer), ("t5", Seq2SeqTrainer)])
@pytest.mark.parametrize("kind", KINDS)
def test_save_model_writes_the_inference_thresholds_of_the_trained_model(kind, family, trainer_cls, tmp_path):
    from peft import PeftModel

    dataset, collator = make_train_dataset(family, n=16, seq_len=12), make_collator(family)
    config = DeftConfig(inference_sparsity=0.8, calibration_batches=100)  # more than there are: every batch
    model = lora_model(make_model(family))
    trainer = build_trainer(kind, model, dataset, config, tmp_path, trainer_cls, collator=collator, max_steps=2,
                            optim="adamw_torch", learning_rate=1e-2, save_strategy="steps", save_steps=2)
    trainer.train()
    assert not (tmp_path / "out" / "checkpoint-2" / THRESHOLDS_FILE).exists()  # checkpoints are not calibrated
    trainer.save_model(str(tmp_path / "final"))

    if kind == "callback":  # the calibration forwards carry labels but are no evaluation
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DeftCallback))
        assert callback.metrics.pop("eval") == {}
        callback.remove()
    else:
        trainer.deft_tracker.remove()  # DEFT's hooks off: the by-hand calibration below sees a plain model

    saved = SparsityThresholds.load(tmp_path / "final")
    batches = [collator([dataset[i] for i in range(start, start + 4)]) for start in range(0, len(dataset), 4)]
    by_hand = calibrate_thresholds(model, batches, 0.8, config)  # the trained model, every training batch
    assert saved.tokens == by_hand.tokens
    assert saved.thresholds == pytest.approx(by_hand.thresholds, rel=1e-3)
    logged = [h for h in trainer.state.log_history if "deft/inference_sparsity" in h]
    assert len(logged) == 1 and logged[0]["deft/inference_sparsity"] == pytest.approx(0.8)
    assert logged[0]["deft/calibrated_density"] == pytest.approx(saved.mean_calibrated_density())

    fresh = PeftModel.from_pretrained(make_model(family), tmp_path / "final")  # what a user loads
    with apply_thresholds(fresh, SparsityThresholds.load(tmp_path / "final")), torch.no_grad():
        tracker = DensityTracker(fresh, DeftConfig())  # after the thresholds' hooks: it sees their zeros
        fresh.eval()
        for batch in batches:
            with tracker.record(**tracker.masks_for(batch)):
                fresh(**batch)
            assert tracker.mean_density(0.0) == pytest.approx(0.2, abs=0.1)
        tracker.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_without_inference_sparsity_no_thresholds_are_written(kind, tmp_path):
    model, dataset = _llama_setup()
    trainer = build_trainer(kind, lora_model(model), dataset, DeftConfig(), tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "final" / THRESHOLDS_FILE).exists()
    assert not [h for h in trainer.state.log_history if "deft/inference_sparsity" in h]


# ----------------------------------------------------------------------------------------- metrics
class LogRecorder(TrainerCallback):
    """Stands for TensorBoard / W&B: a callback that only reads `logs` in on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_reach_log_history_tensorboard_and_other_callbacks(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = LogRecorder()
    collator = make_collator("opt")
    trainer = build_trainer(
        kind, make_model("opt"), make_train_dataset("opt", n=16, seq_len=12), DeftConfig(coef_warmup_steps=4),
        tmp_path, callbacks=[recorder], collator=collator, eval_dataset=make_train_dataset("opt", n=8, seq_len=12),
        max_steps=4, logging_steps=2, eval_strategy="steps",
        eval_steps=2, per_device_eval_batch_size=4, report_to=["tensorboard"],
    )
    trainer.train()
    layers = [site.name for site in (trainer.deft_tracker if kind == "mixin" else _callback(trainer).tracker).sites]

    train = train_logs(trainer)
    assert len(train) == 2
    for entry in train:
        assert 0.0 < entry["deft/density"] <= 1.0 and entry["deft/loss"] > 0.0
        assert all(0.0 < entry[f"deft/density/{layer}"] <= 1.0 for layer in layers)
    assert train[0]["deft/coef"] == pytest.approx(0.5) and train[1]["deft/coef"] == pytest.approx(1.0)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2
    for entry in evals:
        assert 0.0 < entry["eval_deft/density"] <= 1.0
        assert all(f"eval_deft/density/{layer}" in entry for layer in layers)
        assert "eval_deft/loss" not in entry and "deft/density" not in entry  # eval measures only, no mixing
    # The reporting callbacks saw the same keys as log_history.
    assert [set(logs) for logs in recorder.logs] == [set(h) - {"step"} for h in trainer.state.log_history]
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"train/deft/density", "train/deft/loss", f"eval/deft/density/{layers[0]}"} <= set(events.Tags()["scalars"])

    metrics = trainer.evaluate()  # evaluate() returns them too
    assert 0.0 < metrics["eval_deft/density"] <= 1.0


def _callback(trainer) -> DeftCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DeftCallback))


@pytest.mark.parametrize("kind", KINDS)
def test_seq2seq_trainer_t5_trains_and_evaluates_with_generate(kind, tmp_path):
    trainer = build_trainer(
        kind, make_model("t5"), make_train_dataset("t5", n=8, seq_len=12), DeftConfig(), tmp_path, Seq2SeqTrainer,
        collator=make_collator("t5"), max_steps=2, predict_with_generate=True, generation_max_length=4,
        per_device_eval_batch_size=4,
    )
    trainer.train()
    assert all(h["deft/loss"] > 0 for h in train_logs(trainer))
    metrics = trainer.evaluate(make_train_dataset("t5", n=4, seq_len=12))
    assert "eval_loss" in metrics
    if kind == "callback":  # the callback measures the labelled forward of the evaluation step
        assert 0.0 < metrics["eval_deft/density"] <= 1.0


# ----------------------------------------------------------------------------------------- loud failures
def _llama_setup():
    batch = make_batch("llama", batch_size=4, seq_len=8)
    return make_model("llama"), dataset_from_batch(batch)


def test_callback_refuses_label_smoothing(tmp_path):
    model, dataset = _llama_setup()
    trainer = build_trainer("callback", model, dataset, DeftConfig(), tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(DeftCallbackError, match="label smoothing.*DeftTrainerMixin"):
        trainer.train()


def test_callback_refuses_compute_loss_func(tmp_path):
    model, dataset = _llama_setup()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)

    def loss_func(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().mean()

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      compute_loss_func=loss_func, callbacks=[DeftCallback(DeftConfig())])
    with pytest.raises(DeftCallbackError, match="compute_loss_func.*DeftTrainerMixin"):
        trainer.train()


def test_callback_refuses_a_trainer_that_ignores_outputs_loss(tmp_path):
    class OwnLossTrainer(Trainer):  # computes the loss from the logits, like TRL >= 1.15 or custom trainers
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1),
                                                     inputs["labels"][:, 1:].flatten())

    model, dataset = _llama_setup()
    trainer = build_trainer("callback", model, dataset, DeftConfig(), tmp_path, OwnLossTrainer)
    with pytest.raises(DeftCallbackError, match="never reached backward.*DeftTrainerMixin"):
        trainer.train()


def test_callback_and_mixin_together_is_refused(tmp_path):
    model, dataset = _llama_setup()
    cls = type("DeftTrainer", (DeftTrainerMixin, Trainer), {})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(DeftCallbackError, match="already applies DEFT"):
        cls(model=model, args=args, train_dataset=dataset, callbacks=[DeftCallback()], deft_config=DeftConfig())


def test_mixin_applies_deft_with_label_smoothing(tmp_path):
    model, dataset = _llama_setup()
    trainer = build_trainer("mixin", model, dataset, DeftConfig(coef=2.0), tmp_path, label_smoothing_factor=0.1)
    trainer.train()
    assert train_logs(trainer)[0]["deft/loss"] > 0
