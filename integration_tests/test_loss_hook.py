"""deft_common.DensityLossHook (the density term folded into the model's own outputs.loss) and
deft_deepspeed.DeftLossHook outside a DeepSpeed engine: in-process, no DeepSpeed needed."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_batch, make_model
from reference import controller_weights, assert_grads_close, lora_model, reference_step, trainable_grads

from deft_common import DeftConfig, DeftConfigError, DeftLossError, DensityLossHook, DensityTracker
from deft_deepspeed import DeftLossHook

# eps well above the paper's 1e-7 so that the density term visibly moves the gradients; threshold > 0 so that
# the density of random SiLU/GELU models (no exact zeros) is a fraction.
CONFIG = DeftConfig(coef=2.0, eps=1e-3, threshold=0.02)


def _lora(family: str = "llama"):
    return lora_model(make_model(family, seed=0))


def _by_hand(family: str, batch: dict, config: DeftConfig = CONFIG) -> tuple[float, dict, float]:
    """(loss, gradients) of task loss + coef * density loss written out with deft_common, and the batch's density."""
    loss, grads = reference_step(_lora(family), batch, config)
    tracker = DensityTracker(_lora(family), config)
    with torch.no_grad(), tracker.record(**tracker.masks_for(batch)):
        tracker.model(**batch)
    return loss, grads, tracker.mean_density()


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
@pytest.mark.parametrize("hook_class", [DensityLossHook, DeftLossHook])
def test_folded_loss_equals_deft_common_by_hand(family, hook_class):
    batch = make_batch(family, 3, 10, padding=True)
    loss, grads, density = _by_hand(family, batch)
    model = _lora(family)
    hook = hook_class(model, CONFIG)
    out = model(**batch)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert_grads_close(trainable_grads(model), grads)
    assert hook.last_metrics()["deft/density"] == pytest.approx(density, rel=1e-9)
    assert 0.0 < density < 1.0


def test_positional_inputs_and_tuple_outputs():
    batch = make_batch("llama", 3, 10, padding=True)
    loss, grads, _ = _by_hand("llama", batch)
    model = _lora()
    DensityLossHook(model, CONFIG)
    # attention_mask passed positionally must still mask the padding; return_dict=False gives (loss, logits, ...)
    out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_dict=False)
    assert isinstance(out, tuple)
    out[0].backward()
    assert out[0].item() == pytest.approx(loss, rel=1e-6)
    assert_grads_close(trainable_grads(model), grads)


def test_last_metrics_average_the_micro_batches_since_the_last_call():
    batch = make_batch("llama", 4, 10, padding=False)  # equal rows: 4 micro-batches of 1 == 1 of 4
    model = _lora()
    hook = DensityLossHook(model, CONFIG)
    model(**batch)
    term = CONFIG.coef * hook.tracker.density_loss().item()
    whole = hook.last_metrics()
    assert whole["deft/loss"] == pytest.approx(term, rel=1e-6)  # the term as added: coef × density loss
    assert hook.last_metrics() == {}  # read once
    for i in range(4):
        model(**{key: value[i : i + 1] for key, value in batch.items()})
    assert hook.last_metrics() == pytest.approx(whole, rel=1e-5)


def test_no_loss_is_a_clear_error_and_the_hook_keeps_working():
    batch = make_batch("llama", 2, 8)
    loss, _, _ = _by_hand("llama", batch)
    model = _lora()
    DensityLossHook(model, CONFIG)
    with pytest.raises(DeftLossError, match="returned no loss.*labels.*density_loss"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(RuntimeError, match="size"):
        model(**batch, position_ids=torch.zeros(5, 5, dtype=torch.long))  # the forward itself fails
    assert model(**batch).loss.item() == pytest.approx(loss, rel=1e-6)  # recording was closed both times


def test_eval_no_grad_and_zero_coef_leave_the_loss_alone():
    batch = make_batch("llama", 2, 8)
    model = _lora()
    task_loss = model(**batch).loss.item()
    hook = DensityLossHook(model, CONFIG)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(task_loss)
    model.eval()
    assert model(**batch).loss.item() == pytest.approx(task_loss)
    assert hook.last_metrics() == {}
    model.train()
    hook.remove()
    measuring = DensityLossHook(model, DeftConfig(coef=0.0, threshold=0.02))
    assert model(**batch).loss.item() == pytest.approx(task_loss)
    assert 0.0 < measuring.last_metrics()["deft/density"] < 1.0
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no loss, nothing to add it to
    assert 0.0 < measuring.last_metrics()["deft/density"] < 1.0


def test_warmup_follows_global_step_and_remove_restores_the_model():
    batch = make_batch("llama", 2, 8)
    model = _lora()
    task_loss = model(**batch).loss.item()
    hook = DensityLossHook(model, DeftConfig(coef=2.0, eps=1e-3, coef_warmup_steps=4))
    coefs = []
    for step in range(5):
        hook.global_step = step
        model(**batch)
        coefs.append(hook.last_metrics()["deft/loss"] / hook.tracker.density_loss().item())
    assert coefs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0], rel=1e-5)
    hook.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert model(**batch).loss.item() == pytest.approx(task_loss)


def test_target_density_feeds_the_controller_once_per_step_of_global_step():
    # A raw loop with 2 micro-batches per optimizer step; the weight follows hook.global_step.
    target, gain = 0.3, 2.0
    batch = make_batch("llama", 4, 10, padding=True)
    model = _lora()
    config = DeftConfig(eps=1e-3, threshold=0.02, target_density=target, controller_gain=gain, controller_damping=5.0)
    hook = DensityLossHook(model, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    metrics, density_losses = [], []
    for step in range(3):
        hook.global_step = step
        losses = []
        for half in (slice(0, 2), slice(2, 4)):
            (model(**{key: value[half] for key, value in batch.items()}).loss / 2).backward()
            losses.append(hook.tracker.density_loss().item())
        optimizer.step()
        optimizer.zero_grad()
        metrics.append(hook.last_metrics())
        density_losses.append(sum(losses) / 2)
    assert metrics[0]["deft/coef"] == 0.0 and metrics[0]["deft/loss"] == 0.0
    # fed the density of both micro-batches, once per step; the term added is the new weight × density loss
    assert [m["deft/coef"] for m in metrics] == pytest.approx(controller_weights(config, [m["deft/density"] for m in metrics]))
    for before, after, density_loss in zip(metrics, metrics[1:], density_losses[1:]):
        assert after["deft/coef"] > before["deft/coef"]
        assert after["deft/loss"] == pytest.approx(after["deft/coef"] * density_loss, rel=1e-5)
    assert hook.coef_schedule.controller.steps == 2  # the last step's density feeds the next step, if any


def test_deepspeed_hook_with_target_density_outside_an_engine_is_a_clear_error():
    batch = make_batch("llama", 2, 8)
    model = _lora()
    DeftLossHook(model, DeftConfig(target_density=0.5))
    with pytest.raises(DeftConfigError, match="target_density.*engine.*DensityLossHook.*global_step"):
        model(**batch)


def test_deepspeed_hook_refuses_the_hf_trainer_loss_scaling():
    batch = make_batch("llama", 2, 8)
    model = _lora()
    DeftLossHook(model, CONFIG)
    with pytest.raises(DeftConfigError, match="deft_hf"):
        model(**batch, num_items_in_batch=torch.tensor(14))
