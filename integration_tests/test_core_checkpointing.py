"""Gradient checkpointing: non-reentrant gives exactly the loss and gradients of no checkpointing; reentrant
(which would silently give the density term no gradient) is refused with the fix, and the fix works."""

import warnings

import pytest
import torch

from deft_common import (
    DeftCheckpointingError,
    DeftConfig,
    DensityLossEngine,
    DensityTracker,
    make_checkpointing_non_reentrant,
    uses_reentrant_checkpointing,
)
from core_reference import FAMILY_CAPTURES, assert_grads_close
from fixtures import make_batch, make_model


def _enable_checkpointing(model, reentrant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24 renames it; 5.16 only has this name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert uses_reentrant_checkpointing(model) is reentrant


def _step(model, tracker, batch):
    """Task loss + density term, backward; returns (loss, density loss, {name: grad}) and how often the first
    hooked module ran (twice per forward under checkpointing: once more in the recompute)."""
    calls = []
    module = tracker.sites[0].capture_module(tracker.config.capture)
    # A pre-hook: checkpointing stops the recompute inside the last module that saves a tensor, before its hooks.
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    model.zero_grad(set_to_none=True)
    with tracker.record(**tracker.masks_for(batch)):
        out = model(**batch)
    density = tracker.density_loss()
    loss = out.loss + density
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), density.detach(), grads, len(calls)


@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_non_reentrant_checkpointing_gives_the_same_loss_and_gradients(family, capture):
    batch = make_batch(family)
    config = DeftConfig(capture=capture, eps=1e-3)
    plain = make_model(family)
    checkpointed = make_model(family)
    _enable_checkpointing(checkpointed, reentrant=False)

    loss, density, grads, calls = _step(plain, DensityTracker(plain, config), batch)
    ckpt_loss, ckpt_density, ckpt_grads, ckpt_calls = _step(checkpointed, DensityTracker(checkpointed, config), batch)
    assert (calls, ckpt_calls) == (1, 2)  # checkpointing really recomputed the layer
    torch.testing.assert_close(ckpt_loss, loss)
    torch.testing.assert_close(ckpt_density, density)
    assert ckpt_grads.keys() == grads.keys()
    assert_grads_close([ckpt_grads[n] for n in grads], list(grads.values()))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_setpoint_surrogate_under_checkpointing_gives_the_same_loss_and_gradients(family):
    """DeftConfig(surrogate="setpoint") bends at the set-point's τ: the recompute reuses the τ of its forward, on
    the masked step and on the dense step after it."""
    batch = make_batch(family)
    config = DeftConfig(coef=5.0, surrogate="setpoint", sparsity_setpoint=0.6, setpoint_dense_every=2)
    plain, checkpointed = make_model(family), make_model(family)
    _enable_checkpointing(checkpointed, reentrant=False)
    engines = [DensityLossEngine(m, config) for m in (plain, checkpointed)]
    for step in (0, 1):  # masked, then dense
        results = []
        for model, engine in zip((plain, checkpointed), engines):
            model.zero_grad(set_to_none=True)
            with engine.recording(batch, step):
                out = model(**batch)
            term = engine.term(step)
            (out.loss + term).backward()
            results.append((term.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
        (term, grads), (ckpt_term, ckpt_grads) = results
        torch.testing.assert_close(ckpt_term, term)
        assert ckpt_grads.keys() == grads.keys()
        assert_grads_close([ckpt_grads[n] for n in grads], list(grads.values()))


@pytest.mark.parametrize("family", ["llama", "t5", "bert", "gpt2"])
def test_reentrant_checkpointing_is_refused_with_the_fix(family):
    model = make_model(family)
    _enable_checkpointing(model, reentrant=True)
    tracker = DensityTracker(model, DeftConfig(eps=1e-3))
    batch = make_batch(family)
    with pytest.raises(DeftCheckpointingError) as error:
        with tracker.record(**tracker.masks_for(batch)):
            model(**batch)
    message = str(error.value)
    assert "reentrant" in message and "use_reentrant': False" in message
    assert "make_checkpointing_non_reentrant" in message

    # Nothing needs a gradient in evaluation: measuring density is fine there.
    model.eval()
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    assert tracker.density()
    model.train()
    with torch.no_grad(), tracker.record(**tracker.masks_for(batch)):
        model(**batch)

    # The fix: switch the model's checkpointing to non-reentrant, then train as usual.
    assert make_checkpointing_non_reentrant(model) >= 2
    assert not uses_reentrant_checkpointing(model)
    assert make_checkpointing_non_reentrant(model) == 0  # idempotent
    reference = make_model(family)
    loss, _, grads, _ = _step(model, tracker, batch)
    ref_loss, _, ref_grads, _ = _step(reference, DensityTracker(reference, DeftConfig(eps=1e-3)), batch)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert_grads_close([grads[n] for n in ref_grads], list(ref_grads.values()))


def test_measuring_only_allows_reentrant_checkpointing():
    """coef = 0 only measures density: no gradient is expected, so reentrant checkpointing is fine."""
    model = make_model("llama")
    _enable_checkpointing(model, reentrant=True)
    tracker = DensityTracker(model, DeftConfig(coef=0.0))
    batch = make_batch("llama")
    with tracker.record(**tracker.masks_for(batch)):
        out = model(**batch)
    out.loss.backward()
    assert 0 < tracker.mean_density() <= 1
