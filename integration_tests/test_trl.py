"""deft_trl.DeftSFTMixin on TRL's real SFTTrainer (TRL 1.9: the model's loss; TRL >= 1.15: TRL's own fused-head
loss), and DeftCallback on SFTTrainer (works up to TRL 1.14, refused from 1.15)."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from fixtures import make_batch, make_model, make_tokenizer
from packaging.version import Version
from reference import (controller_weights, GradCapture, assert_ada_deft_reloads, assert_grads_close, disable_dropout, lora_model,
                       reference_step)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import SFTConfig, SFTTrainer  # noqa: E402

from deft_common import DeftConfig, SparsityThresholds, find_mlp_sites, layer_weights  # noqa: E402
from deft_hf import DeftCallback, DeftCallbackError  # noqa: E402
from deft_trl import DeftSFTMixin  # noqa: E402

TRL_OWN_LOSS = Version(version("trl")) >= Version("1.15.0")  # SFTTrainer ignores outputs.loss from TRL 1.15 on


class DeftSFTTrainer(DeftSFTMixin, SFTTrainer):
    pass


def sft_dataset(batch):
    """The real tokens of each make_batch() row, pre-tokenized: TRL's collator pads them back into `batch`."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return datasets.Dataset.from_dict({"input_ids": rows})


def sft_trainer(model, dataset, tmp_path, config=None, callbacks=(), trainer_cls=DeftSFTTrainer, trainer_kwargs=None,
                **args):
    defaults = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                    disable_tqdm=True, optim="sgd", learning_rate=0.1, max_grad_norm=0, logging_steps=1,
                    per_device_train_batch_size=4, max_steps=1, seed=0)
    extra = dict(trainer_kwargs or {})
    if issubclass(trainer_cls, DeftSFTMixin):
        extra["deft_config"] = config
    return trainer_cls(model=model, args=SFTConfig(**{**defaults, **args}), train_dataset=dataset,
                       processing_class=make_tokenizer(), callbacks=list(callbacks), **extra)


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_sft_mixin_one_step_equals_deft_common_by_hand(tmp_path):
    config = DeftConfig(coef=2.0)
    batch = make_batch("llama", batch_size=4, seq_len=8)
    model = disable_dropout(lora_model(make_model("llama")))
    ref_loss, ref_grads = reference_step(model, batch, config)  # before SFTTrainer patches the model's forward
    capture = GradCapture()
    trainer = sft_trainer(model, sft_dataset(batch), tmp_path, config, [capture])
    trainer.train()
    assert train_logs(trainer)[0]["loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert_grads_close(capture.grads, ref_grads)


def test_sft_mixin_counts_the_density_once_with_compute_loss_func(tmp_path):
    # TRL >= 1.15 then runs an extra no-grad forward for its metrics inside compute_loss; DEFT must ignore it.
    config = DeftConfig(coef=2.0)
    batch = make_batch("llama", batch_size=4, seq_len=8)
    model = disable_dropout(lora_model(make_model("llama")))
    _, ref_grads = reference_step(model, batch, config)

    def causal_lm_loss(outputs, labels, num_items_in_batch=None):
        logits, targets = outputs.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
        summed = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        return summed / num_items_in_batch

    capture = GradCapture()
    # loss_type="nll": TRL 1.9's default "chunked_nll" returns no logits, which a compute_loss_func needs
    trainer = sft_trainer(model, sft_dataset(batch), tmp_path, config, [capture],
                          trainer_kwargs={"compute_loss_func": causal_lm_loss}, loss_type="nll")
    trainer.train()
    assert_grads_close(capture.grads, ref_grads)


def test_sft_mixin_gradient_accumulation_4x1_equals_1x4(tmp_path):
    batch = make_batch("llama", batch_size=4, seq_len=8, padding=False)
    runs = {}
    for batch_size, accumulation in [(4, 1), (1, 4)]:
        capture = GradCapture()
        trainer = sft_trainer(make_model("llama"), sft_dataset(batch), tmp_path, DeftConfig(coef=2.0), [capture],
                              per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
        trainer.train()
        runs[accumulation] = capture.grads, train_logs(trainer)[0]
    assert_grads_close(runs[4][0], runs[1][0])
    assert runs[4][1]["loss"] == pytest.approx(runs[1][1]["loss"], rel=1e-5)


def test_sft_mixin_logs_density_beside_trl_metrics(tmp_path):
    batch = make_batch("llama", batch_size=4, seq_len=8)
    trainer = sft_trainer(make_model("llama"), sft_dataset(batch), tmp_path, DeftConfig(), max_steps=2,
                          eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
                          trainer_kwargs={"eval_dataset": sft_dataset(batch)})
    trainer.train()
    layers = [site.name for site in trainer.deft_tracker.sites]
    train = train_logs(trainer)
    assert len(train) == 2
    for entry in train:
        assert "mean_token_accuracy" in entry  # TRL's own metrics are still there
        assert 0.0 < entry["deft/density"] <= 1.0 and entry["deft/loss"] > 0.0
        assert all(f"deft/density/{layer}" in entry for layer in layers)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 1 and 0.0 < evals[0]["eval_deft/density"] <= 1.0
    assert all(f"eval_deft/density/{layer}" in evals[0] for layer in layers)


def test_sft_mixin_target_density_steers_the_weight(tmp_path):
    # Random SiLU llama: density ~1 at threshold 0 (no exact zeros), above the target, so the weight rises each step.
    target, gain = 0.5, 1.0
    batch = make_batch("llama", batch_size=4, seq_len=8)
    trainer = sft_trainer(make_model("llama"), sft_dataset(batch), tmp_path,
                          config := DeftConfig(target_density=target, controller_gain=gain, controller_damping=5.0), max_steps=3,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 3 and logs[0]["deft/coef"] == 0.0
    assert [h["deft/coef"] for h in logs] == pytest.approx(controller_weights(config, [h["deft/density"] for h in logs]))
    for before, after in zip(logs, logs[1:]):
        assert after["deft/coef"] > before["deft/coef"] and after["deft/loss"] > 0.0


def test_sft_mixin_ada_deft_with_trl_peft_config_trains_logs_and_saves_the_weights(tmp_path):
    # peft_config: SFTTrainer wraps the model in PEFT inside its __init__; the weights come after, so stay trainable.
    from peft import LoraConfig, PeftModel

    batch = make_batch("llama", batch_size=4, seq_len=8)
    trainer = sft_trainer(make_model("llama"), sft_dataset(batch), tmp_path, DeftConfig(adaptive=True), max_steps=2,
                          optim="adamw_torch", learning_rate=1e-3, save_strategy="steps", save_steps=2,
                          trainer_kwargs={"peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])})
    trainer.train()
    weights = layer_weights(trainer.model)
    assert isinstance(trainer.model, PeftModel) and weights.logits.requires_grad
    assert any(p is weights.logits for group in trainer.optimizer.param_groups for p in group["params"])
    assert all(f"deft/adaptive_weight/{name}" in entry for entry in train_logs(trainer) for name in weights.names)
    trainer.save_model()
    for folder in (tmp_path / "out" / "checkpoint-2", tmp_path / "out"):
        fresh = PeftModel.from_pretrained(make_model("llama"), folder)
        assert_ada_deft_reloads(folder, fresh, trained_logits=weights.logits)


def test_sft_mixin_writes_inference_thresholds_on_calibration_batches_only(tmp_path):
    from peft import LoraConfig, PeftModel

    batch = make_batch("llama", batch_size=8, seq_len=8)  # 2 training batches of 4; 60 real tokens in all
    config = DeftConfig(inference_sparsity=0.9, calibration_batches=1)
    trainer = sft_trainer(make_model("llama"), sft_dataset(batch), tmp_path, config, max_steps=2, optim="adamw_torch",
                          learning_rate=1e-3, trainer_kwargs={"peft_config": LoraConfig(r=4, target_modules=["q_proj"])})
    trainer.train()
    trainer.save_model()
    saved = SparsityThresholds.load(tmp_path / "out")
    assert 4 * 8 - 4 <= saved.tokens <= 4 * 8  # one batch of 4 rows (one of them may be the half-padded row)
    assert saved.calibrated == pytest.approx({name: 0.9 for name in saved.thresholds}, abs=1e-6)
    fresh = PeftModel.from_pretrained(make_model("llama"), tmp_path / "out")
    assert [site.name for site in saved.sites_in(fresh)] == [site.name for site in find_mlp_sites(fresh, config)]
    logged = [h for h in trainer.state.log_history if "deft/inference_sparsity" in h]
    assert logged and logged[-1]["deft/calibrated_density"] == pytest.approx(0.1, abs=1e-6)


def test_sft_mixin_setpoint_ramps_with_gradient_accumulation_and_the_thresholds_follow_it(tmp_path):
    batch = make_batch("llama", batch_size=8, seq_len=8)
    config = DeftConfig(coef=0.0, sparsity_setpoint=0.8, setpoint_ramp_steps=2, setpoint_dense_every=2)
    trainer = sft_trainer(lora_model(make_model("llama")), sft_dataset(batch), tmp_path, config, max_steps=3,
                          optim="adamw_torch", learning_rate=1e-3, per_device_train_batch_size=2,
                          gradient_accumulation_steps=2)
    trainer.train()
    logs = train_logs(trainer)
    assert [h["deft/sparsity_setpoint"] for h in logs] == pytest.approx([0.0, 0.4, 0.8])
    assert logs[1]["deft/density"] == pytest.approx(1.0)  # setpoint_dense_every=2: the 2nd step trains dense
    assert logs[2]["deft/density"] == pytest.approx(0.2, abs=0.01)
    trainer.save_model()
    saved = SparsityThresholds.load(tmp_path / "out")  # no inference_sparsity: at the set-point trained
    assert saved.sparsity == {name: 0.8 for name in saved.thresholds}


@pytest.mark.skipif(not TRL_OWN_LOSS, reason="TRL < 1.15 SFTTrainer optimises the model's outputs.loss")
def test_callback_on_sft_trainer_that_computes_its_own_loss_is_refused(tmp_path):
    batch = make_batch("llama", batch_size=4, seq_len=8)
    trainer = sft_trainer(make_model("llama"), sft_dataset(batch), tmp_path, callbacks=[DeftCallback(DeftConfig())],
                          trainer_cls=SFTTrainer)
    with pytest.raises(DeftCallbackError, match="SFTTrainer.*DeftTrainerMixin"):
        trainer.train()


@pytest.mark.skipif(TRL_OWN_LOSS, reason="TRL >= 1.15 SFTTrainer computes its own loss (refused, tested above)")
def test_callback_on_sft_trainer_that_uses_the_model_loss_equals_reference(tmp_path):
    config = DeftConfig(coef=2.0)
    batch = make_batch("llama", batch_size=4, seq_len=8)
    model = disable_dropout(lora_model(make_model("llama")))
    ref_loss, ref_grads = reference_step(model, batch, config)
    capture = GradCapture()
    trainer = sft_trainer(model, sft_dataset(batch), tmp_path, callbacks=[capture, DeftCallback(config)],
                          trainer_cls=SFTTrainer)
    trainer.train()
    assert train_logs(trainer)[0]["loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert_grads_close(capture.grads, ref_grads)
