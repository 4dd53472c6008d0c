"""The density loss and the density metric equal the formulas, computed by hand from activations captured by
our own hooks: per layer the mean over real tokens and hidden units of a²/(a²+ε), then the mean over layers."""

import pytest
import torch

from core_reference import (
    FAMILY_CAPTURES,
    ActivationRecorder,
    assert_grads_close,
    hand_counts,
    hand_layer_losses,
    hand_loss,
    real_token_masks,
)
from deft_common import DeftConfig, DensityLossEngine, DensityTracker
from deft_common.errors import DeftConfigError
from deft_common.surrogate import density_tap
from fixtures import ENCODER_DECODER, make_batch, make_model

def _run(family, model, batch, config, capture=None):
    """One forward inside record(), with our own hooks on the same capture points."""
    tracker = DensityTracker(model, config)
    with ActivationRecorder(family, model, capture or config.capture) as recorder:
        with tracker.record(**tracker.masks_for(batch)):
            model(**batch)
    return tracker, recorder


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_density_loss_equals_the_formula(family, capture, eps):
    model = make_model(family)
    batch = make_batch(family, batch_size=3, seq_len=10)
    tracker, recorder = _run(family, model, batch, DeftConfig(capture=capture, eps=eps))
    masks = real_token_masks(family, batch)

    loss = tracker.density_loss()
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.requires_grad
    expected_layers = hand_layer_losses(recorder, masks, eps, dtype=torch.float64)
    got_layers = tracker.layer_losses()
    assert list(got_layers) == list(expected_layers)
    for name, expected in expected_layers.items():
        torch.testing.assert_close(got_layers[name].double(), expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.double(), hand_loss(recorder, masks, eps, torch.float64).detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_density_equals_a_hand_count(family, capture):
    model = make_model(family)
    batch = make_batch(family, batch_size=3, seq_len=10)
    masks = real_token_masks(family, batch)
    # A positive threshold that splits the entries: the median magnitude of the real activations.
    with ActivationRecorder(family, model, capture) as probe:
        model(**batch)
    magnitudes = torch.cat([a[0].detach().reshape(*masks[probe.stacks[n]].shape, -1)[masks[probe.stacks[n]]].abs().flatten()
                            for n, a in probe.acts.items()])
    tau = float(magnitudes.median())
    assert tau > 0

    tracker, recorder = _run(family, model, batch, DeftConfig(capture=capture, threshold=tau))
    for threshold in (0.0, tau):
        expected = hand_counts(recorder, masks, threshold)
        assert tracker.layer_counts(threshold) == expected
        for name, (active, entries) in expected.items():
            assert tracker.density(threshold)[name] == pytest.approx(active / entries)
    # The configured threshold is the default, and it really filters something.
    assert tracker.density() == tracker.density(tau)
    assert tracker.mean_density(tau) < tracker.mean_density(0.0)
    assert tracker.global_density() == tracker.density()  # no process group: the local counts
    if family in ("t5", "opt") and capture == "act":  # ReLU: exact zeros, and the metric counts them as inactive
        assert 0.2 < tracker.mean_density(0.0) < 0.8


@pytest.mark.parametrize("family", ["llama", "opt", "t5", "bert", "gemma", "phi3"])
@pytest.mark.parametrize("eps, tolerance", [(1e-7, 2e-3), (1e-3, 5e-4)])
def test_bf16_model_gives_the_fp32_loss(family, eps, tolerance):
    batch = make_batch(family, batch_size=3, seq_len=12)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(family, dtype=dtype)
        tracker, recorder = _run(family, model, batch, DeftConfig(eps=eps))
        losses[dtype] = tracker.density_loss()
        assert losses[dtype].dtype == torch.float32
        # Computed in fp32 from the model's activations: a bf16 computation would be off by ~1e-3.
        expected = hand_loss(recorder, real_token_masks(family, batch), eps, dtype=torch.float32)
        torch.testing.assert_close(losses[dtype], expected, rtol=1e-6, atol=1e-7)
    assert abs(losses[torch.bfloat16].item() - losses[torch.float32].item()) < tolerance


@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_density_gradient_equals_the_gradient_of_the_formula(family, capture):
    """The fused op's hand-written backward matches autograd through the eager formula."""
    eps = 1e-3  # a well-conditioned ε, so the two computations agree to float precision
    model = make_model(family)
    batch = make_batch(family)
    tracker, recorder = _run(family, model, batch, DeftConfig(capture=capture, eps=eps))
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(tracker.density_loss(), params, retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(hand_loss(recorder, real_token_masks(family, batch), eps), params, allow_unused=True)
    assert_grads_close(got, expected)
    nonzero = sum(int(e is not None and e.abs().sum() > 0) for e in expected)
    assert nonzero >= len(params) // 3  # the term reaches most of the model, not a corner of it


@pytest.mark.parametrize("family, capture", [("bert", "act"), ("llama", "down_in"), ("t5", "act")])
def test_training_gradient_equals_the_formula_with_padding(family, capture):
    """Task loss + density loss, as in training: the op adds the surrogate's gradient to the model's own gradient
    (in place when it can), and padding rows get only the model's."""
    eps = 1e-3
    model = make_model(family)
    batch = make_batch(family, padding=True)
    tracker = DensityTracker(model, DeftConfig(capture=capture, eps=eps))
    with ActivationRecorder(family, model, capture) as recorder, tracker.record(**tracker.masks_for(batch)):
        task = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(task + tracker.density_loss(), params, retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(task + hand_loss(recorder, real_token_masks(family, batch), eps), params,
                                   allow_unused=True)
    assert_grads_close(got, expected)


@pytest.mark.parametrize("family, capture", [("bert", "act"), ("llama", "act"), ("llama", "down_in"), ("t5", "act")])
def test_l1_surrogate_loss_and_training_gradient_equal_the_formula(family, capture):
    """DeftConfig(surrogate="l1"): the density loss is the mean of |a| over real entries, and task + loss trains
    with the gradient of that formula (padding rows get only the model's)."""
    model = make_model(family)
    batch = make_batch(family, padding=True)
    tracker = DensityTracker(model, DeftConfig(capture=capture, surrogate="l1"))
    with ActivationRecorder(family, model, capture) as recorder, tracker.record(**tracker.masks_for(batch)):
        task = model(**batch).loss
    masks = real_token_masks(family, batch)
    expected = hand_loss(recorder, masks, 0.0, torch.float64, l1=True)
    torch.testing.assert_close(tracker.density_loss().double(), expected.detach(), rtol=1e-6, atol=1e-7)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(task + tracker.density_loss(), params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(task + hand_loss(recorder, masks, 0.0, l1=True), params, allow_unused=True)
    assert_grads_close(got, want)


@pytest.mark.parametrize("family, capture", [("llama", "act"), ("llama", "down_in"), ("bert", "act")])
def test_setpoint_surrogate_bends_at_the_setpoints_threshold(family, capture):
    """DeftConfig(surrogate="setpoint"): on a masked step the density loss is the share the mask kept, with no
    gradient; on the dense step after it, the mean of min(|a|, τ) / τ with each block's τ of that masked step, and
    task + loss trains with the gradient of that formula (sign(a) / τ below τ, nothing above; padding rows get
    only the model's)."""
    model = make_model(family)
    batch = make_batch(family, padding=True)
    masks = real_token_masks(family, batch)
    config = DeftConfig(capture=capture, coef=1.0, surrogate="setpoint", sparsity_setpoint=0.6,
                        setpoint_dense_every=2)
    engine = DensityLossEngine(model, config)
    params = [p for p in model.parameters() if p.requires_grad]

    with engine.recording(batch, step=0):  # masked: what the tracker sees is 0 or above τ
        model(**batch)
    masked_term = engine.term(0)
    taus = {name: float(t) for name, t in engine.setpoint.last_thresholds.items()}
    assert len(taus) == len(engine.tracker.sites) and all(t > 0 for t in taus.values())
    assert masked_term.item() == pytest.approx(engine.tracker.mean_density(0.0), abs=1e-6)
    assert 0.3 < masked_term.item() < 0.5
    assert all(g is None or g.abs().sum() == 0
               for g in torch.autograd.grad(masked_term, params, allow_unused=True))

    with ActivationRecorder(family, model, capture) as recorder, engine.recording(batch, step=1):  # dense
        task = model(**batch).loss
    term = engine.term(1)
    assert all(len(tensors) == 1 for tensors in recorder.acts.values())
    expected = hand_loss(recorder, masks, 0.0, taus=taus)
    torch.testing.assert_close(term, expected, rtol=1e-5, atol=1e-6)
    assert 0.5 < term.item() < 0.9  # the dense activations below τ count by their share of τ
    assert any(g is not None and g.abs().sum() > 0
               for g in torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))
    got = torch.autograd.grad(task + term, params, retain_graph=True, allow_unused=True)
    assert_grads_close(got, torch.autograd.grad(task + expected, params, allow_unused=True))


def test_setpoint_surrogate_without_the_setpoint_is_an_error():
    config = DeftConfig(surrogate="setpoint", sparsity_setpoint=0.5)
    with pytest.raises(DeftConfigError, match="build the tracker through DensityLossEngine"):
        DensityTracker(make_model("llama"), config)


def test_a_gradient_shared_with_another_branch_is_not_changed():
    """Autograd hands an addition's gradient to both of its inputs as one tensor; adding the surrogate's gradient
    to it in place would corrupt the other input's gradient."""
    eps = 1e-3
    weight = torch.randn(8, 8)
    a, z = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    other = z * 2  # made before the op, so its backward runs after the op's
    routed, ssum, _ = density_tap(a, None, "paper", eps, (0.0,))
    ((routed + other) @ weight).sum().add(ssum).backward()

    a2, z2 = a.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    (((a2 + z2 * 2) @ weight).sum() + (a2 * a2 / (a2 * a2 + eps)).sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(a.grad, a2.grad)


def test_several_forwards_in_one_record_pool_their_tokens():
    model = make_model("llama")
    batch = make_batch("llama")
    tracker = DensityTracker(model, DeftConfig(eps=1e-3))
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    once_loss, once_counts = tracker.density_loss().detach(), tracker.layer_counts()
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
        model(**batch)
    torch.testing.assert_close(tracker.density_loss().detach(), once_loss)
    assert tracker.layer_counts() == {n: (2 * a, 2 * e) for n, (a, e) in once_counts.items()}
    # A new record() starts from scratch.
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    assert tracker.layer_counts() == once_counts


def test_loss_without_mask_counts_every_position():
    model = make_model("llama")
    batch = make_batch("llama", padding=True)
    tracker = DensityTracker(model, DeftConfig(eps=1e-3))
    with ActivationRecorder("llama", model, "act") as recorder, tracker.record():
        model(**batch)
    everything = {"encoder": torch.ones_like(batch["attention_mask"], dtype=torch.bool)}
    everything["decoder"] = everything["encoder"]
    torch.testing.assert_close(tracker.density_loss(), hand_loss(recorder, everything, 1e-3))
    masked = hand_loss(recorder, real_token_masks("llama", batch), 1e-3)
    assert abs(tracker.density_loss().item() - masked.item()) > 1e-4  # the mask matters on this batch


def test_coef_warmup_and_config_round_trip():
    cfg = DeftConfig(coef=2.0, coef_warmup_steps=4, layers="0-1", capture="down_in")
    assert [cfg.coef_at(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert DeftConfig(coef=0.5).coef_at(0) == 0.5
    again = DeftConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.layers == [0, 1]


@pytest.mark.parametrize("family", sorted(ENCODER_DECODER))
def test_t5_encoder_and_decoder_use_their_own_masks(family):
    """Encoder positions are weighted by attention_mask, decoder positions by the real label positions."""
    model = make_model(family)
    batch = make_batch(family, batch_size=3, seq_len=10)
    tracker, recorder = _run(family, model, batch, DeftConfig(eps=1e-3))
    masks = real_token_masks(family, batch)
    swapped = {"encoder": masks["encoder"], "decoder": torch.ones_like(masks["decoder"])}
    torch.testing.assert_close(tracker.density_loss(), hand_loss(recorder, masks, 1e-3))
    assert abs(tracker.density_loss().item() - hand_loss(recorder, swapped, 1e-3).item()) > 1e-5
