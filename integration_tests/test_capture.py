"""deft_common.capture: one hook per MLP capture point, stages in a fixed order whatever order their owners were
built in, one reading of the real tokens, and a model left exactly as it was when the last stage goes."""

import pytest
import torch

from deft_common import (ActivationCapture, DeftConfig, DensityTracker, SparsitySetpoint, apply_thresholds,
                         calibrate_thresholds, find_mlp_sites)
from fixtures import make_batch, make_model


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _thresholded_density(tracker, model, batch) -> float:
    with torch.no_grad(), tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    return tracker.mean_density(0.0)


@pytest.mark.parametrize("tracker_first", [True, False])
def test_the_tracker_measures_the_applied_thresholds_whichever_came_first(tracker_first):
    model = make_model("llama").eval()
    batch = make_batch("llama", batch_size=4, seq_len=16)
    thresholds = calibrate_thresholds(model, [batch], sparsity=0.7)
    if tracker_first:
        tracker = DensityTracker(model, DeftConfig())
        handle = apply_thresholds(model, thresholds)
    else:
        handle = apply_thresholds(model, thresholds)
        tracker = DensityTracker(model, DeftConfig())
    assert _thresholded_density(tracker, model, batch) == pytest.approx(0.3, abs=0.02)
    handle.remove()
    assert _thresholded_density(tracker, model, batch) == pytest.approx(1.0, abs=0.01)  # SiLU: no exact zeros
    tracker.remove()


@pytest.mark.parametrize("tracker_first", [True, False])
def test_the_tracker_measures_the_setpoint_whichever_came_first(tracker_first):
    model = make_model("bert")
    batch = make_batch("bert", batch_size=4, seq_len=16)
    config = DeftConfig(coef=0.0)
    if tracker_first:
        tracker, setpoint = DensityTracker(model, config), SparsitySetpoint(model, sparsity=0.9)
    else:
        setpoint, tracker = SparsitySetpoint(model, sparsity=0.9), DensityTracker(model, config)
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch).loss.backward()
    assert tracker.mean_density(0.0) == pytest.approx(0.1, abs=0.01)
    setpoint.remove()
    tracker.remove()


def test_one_hook_per_capture_point_and_none_after_the_last_stage():
    model = make_model("llama")
    batch = make_batch("llama")
    before = model(**batch).logits.detach()
    sites = find_mlp_sites(model)
    tracker = DensityTracker(model, DeftConfig())
    setpoint = SparsitySetpoint(model, sparsity=0.5)
    handle = apply_thresholds(model.eval(), calibrate_thresholds(model, [batch], sparsity=0.5))
    # One hook per block's activation module, one forward pre-hook reading the masks; nothing per owner.
    assert _hooks(model) == len(sites) + 1
    for site in sites:
        assert len(site.act._forward_hooks) == 1
    handle.remove()
    setpoint.remove()
    assert ActivationCapture.existing(model) is not None and _hooks(model) == len(sites)
    tracker.remove()
    assert ActivationCapture.existing(model) is None and _hooks(model) == 0
    assert torch.equal(model.train()(**batch).logits.detach(), before)


def test_stages_run_in_the_fixed_order_on_what_the_stage_before_returned():
    model = make_model("llama")
    sites = find_mlp_sites(model)[:1]
    capture = ActivationCapture.of(model)
    seen = []
    handles = [
        capture.add("observe", sites, "act", lambda site, a: seen.append(("observe", float(a.abs().max())))),
        capture.add("inference", sites, "act", lambda site, a: seen.append(("inference", None)) or a * 0),
        capture.add("setpoint", sites, "act", lambda site, a: seen.append(("setpoint", None))),
    ]
    model(**make_batch("llama"))
    assert seen == [("setpoint", None), ("inference", None), ("observe", 0.0)]
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="stage 'late' is unknown"):
        capture.add("late", sites, "act", lambda site, a: None)


def _llama(layers: int):
    import transformers

    from fixtures import make_config

    config = make_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _graph_breaks(model, batch) -> int:
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**batch).graph_break_count


def test_no_graph_break_per_block_under_torch_compile():
    """torch.compile traces the stages: the tracker recording (its padding rows found when record() starts), the
    set-point and applied thresholds add no graph break at all; the loss hook's two top-level hooks add a fixed
    number, the same for 2 and 4 blocks."""
    from deft_common import DensityLossHook

    batch = make_batch("llama", batch_size=2, seq_len=8)  # padded
    hook_breaks = {}
    for layers in (2, 4):
        model = _llama(layers).train()
        assert _graph_breaks(model, batch) == 0
        tracker, setpoint = DensityTracker(model, DeftConfig()), SparsitySetpoint(model, sparsity=0.9)
        with tracker.record(**tracker.masks_for(batch)):
            assert _graph_breaks(model, batch) == 0
        tracker.remove()
        setpoint.remove()
        with apply_thresholds(model.eval(), calibrate_thresholds(model, [batch], sparsity=0.5)):
            assert _graph_breaks(model, batch) == 0
        hook = DensityLossHook(model.train(), DeftConfig(coef=1.0, sparsity_setpoint=0.9))
        hook_breaks[layers] = _graph_breaks(model, batch)
        hook.remove()
    assert hook_breaks[2] == hook_breaks[4] <= 2
