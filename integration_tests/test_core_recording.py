"""The tracker keeps something only inside record(), holds no activation afterwards, adds no activation-sized
saved tensor to the autograd graph, and remove() leaves the model exactly as it was."""

import gc
import weakref

import pytest
import torch

from core_reference import FAMILY_CAPTURES, ActivationRecorder, capture_points
from deft_common import DeftConfig, DensityTracker
from fixtures import make_batch, make_model


def _activation_refs(family, model, capture):
    """Weak references to every activation the next forwards produce (our own hooks hold nothing strongly)."""
    refs = []
    handles = []
    for _, path, _ in capture_points(family, model, capture):
        module = model.get_submodule(path)
        if capture == "act":
            handles.append(module.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out))))
        else:
            handles.append(module.register_forward_pre_hook(lambda _m, args: refs.append(weakref.ref(args[0]))))
    return refs, handles


def _assert_freed(refs):
    gc.collect()
    assert refs and all(ref() is None for ref in refs), "an activation is still held after the step"


def _assert_nothing_kept(tracker):
    assert tracker._records == {} and tracker._capture._rows == {} and tracker._capture.masks == {}
    with pytest.raises(RuntimeError, match="record"):
        tracker.density_loss()


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
def test_forwards_outside_record_keep_nothing(family):
    model = make_model(family)
    tracker = DensityTracker(model, DeftConfig())
    batch = make_batch(family)
    refs, handles = _activation_refs(family, model, "act")

    model(**batch).loss.backward()  # a training step without record()
    with torch.no_grad():
        model(**batch)
    model.eval()
    model(**batch)
    if family != "bert":
        model.generate(input_ids=batch["input_ids"][:1], max_new_tokens=3, do_sample=False)
    model.train()
    _assert_nothing_kept(tracker)
    for handle in handles:
        handle.remove()
    _assert_freed(refs)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_record_keeps_statistics_not_activations(family):
    model = make_model(family)
    tracker = DensityTracker(model, DeftConfig())
    batch = make_batch(family)
    refs, handles = _activation_refs(family, model, "act")
    with tracker.record(**tracker.masks_for(batch)):
        out = model(**batch)
    (out.loss + tracker.density_loss()).backward()
    del out
    for handle in handles:
        handle.remove()
    _assert_freed(refs)  # backward released them; the records hold scalars only
    assert tracker.density() and tracker._capture.masks == {} and tracker._capture._rows == {}
    assert all(rec.surrogate_sum.numel() == 1 for rec in tracker._records.values())


def test_clear_releases_an_unused_graph():
    """A record whose loss is never backpropagated (e.g. measuring under grad) is released by clear()."""
    model = make_model("llama")
    tracker = DensityTracker(model, DeftConfig())
    batch = make_batch("llama")
    refs, handles = _activation_refs("llama", model, "act")
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    for handle in handles:
        handle.remove()
    gc.collect()
    assert any(ref() is not None for ref in refs)  # the differentiable sums still reference their inputs
    tracker.clear()
    _assert_freed(refs)


def test_measuring_under_no_grad_inside_record():
    model = make_model("llama")
    model.eval()
    tracker = DensityTracker(model, DeftConfig())
    batch = make_batch("llama")
    with torch.no_grad(), tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    loss = tracker.density_loss()
    assert not loss.requires_grad and 0 < loss.item() <= 1
    assert 0 < tracker.mean_density() <= 1


def _hook_state(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                   dict(getattr(m, "_forward_hooks_with_kwargs", {})), set(getattr(m, "_forward_hooks_always_called", {})))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_remove_leaves_the_model_exactly_as_it_was(family, capture):
    model = make_model(family)
    batch = make_batch(family)
    model(**batch)  # let transformers set up whatever it sets up on a first forward
    hooks = _hook_state(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    with torch.no_grad():
        logits = model(**batch).logits

    tracker = DensityTracker(model, DeftConfig(capture=capture))
    assert _hook_state(model) != hooks
    with tracker.record(**tracker.masks_for(batch)):
        out = model(**batch)
    (out.loss + tracker.density_loss()).backward()  # gradients only, no optimizer step
    tracker.remove()

    assert _hook_state(model) == hooks
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert model.training
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    with pytest.raises(RuntimeError, match="removed"):
        with tracker.record():
            pass
    tracker.remove()  # twice is harmless


def test_records_cannot_nest_and_errors_inside_record_propagate():
    model = make_model("llama")
    tracker = DensityTracker(model, DeftConfig())
    batch = make_batch("llama")
    with pytest.raises(RuntimeError, match="nested"):
        with tracker.record(), tracker.record():
            pass
    with pytest.raises(ValueError, match="boom"):
        with tracker.record(**tracker.masks_for(batch)):
            raise ValueError("boom")
    assert tracker._recording is False and tracker._capture.masks == {}
    with tracker.record(**tracker.masks_for(batch)):  # usable again afterwards
        model(**batch)
    assert tracker.density()


def _saved_tensors(model, batch, tracker=None):
    """Every tensor autograd saves for backward during one training forward."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if tracker is None:
            model(**batch)
        else:
            with tracker.record(**tracker.masks_for(batch)):
                model(**batch)
            tracker.density_loss()
    return saved


def _storage_bytes(tensors):
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_density_term_saves_no_extra_activation_memory(family, capture):
    """The fused surrogate saves one tensor per hooked layer: the activation itself, which the model already
    saves for its own backward. An eager a*a/(a*a+eps) chain would save several new activation-sized tensors."""
    model = make_model(family)
    batch = make_batch(family, batch_size=4, seq_len=16)
    baseline = _saved_tensors(model, batch)

    tracker = DensityTracker(model, DeftConfig(capture=capture))
    with ActivationRecorder(family, model, capture) as recorder:
        with_tracker = _saved_tensors(model, batch, tracker)
    layers = len(tracker.sites)
    assert len(with_tracker) == len(baseline) + layers
    assert _storage_bytes(with_tracker) == _storage_bytes(baseline)
    # Each activation is saved once more than the model itself saves it (the model's own use + ours).
    pointers = [t.data_ptr() for t in with_tracker]
    for tensors in recorder.acts.values():
        assert pointers.count(tensors[0].data_ptr()) >= 2
    tracker.remove()

    # The same measurement catches an eager formula: it adds activation-sized tensors.
    eager = []
    with ActivationRecorder(family, model, capture) as recorder:
        recorder._keep = lambda block, a: eager.append((a * a / (a * a + 1e-7)).mean())
        eager_saved = _saved_tensors(model, batch)
    assert _storage_bytes(eager_saved) >= _storage_bytes(baseline) + layers * batch["input_ids"].numel() * 64 * 4
