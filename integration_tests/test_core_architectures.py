"""DensityTracker finds the MLP of every supported architecture, at both capture points, and selects layers."""

import pytest
import torch
from torch import nn

from core_reference import ActivationRecorder, base_of, capture_points, hand_loss, num_mlp_layers, real_token_masks
from deft_common import DeftConfig, DeftConfigError, DensityTracker
from fixtures import ENCODER_DECODER, INTERMEDIATE, make_batch, make_model

peft = pytest.importorskip("peft")


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("capture", ["act", "down_in"])
def test_tracker_hooks_every_mlp_layer(family, capture):
    model = make_model(family)
    hooks_before = _hook_count(model)
    tracker = DensityTracker(model, DeftConfig(capture=capture))
    expected = capture_points(family, model, capture)

    assert len(tracker.sites) == num_mlp_layers(model)
    assert _hook_count(model) - hooks_before == num_mlp_layers(model)
    assert [site.name for site in tracker.sites] == [block for block, _, _ in expected]
    for site, (_, path, stack) in zip(tracker.sites, expected):
        assert site.capture_module(capture) is model.get_submodule(path)
        assert site.stack == stack
    if family in ENCODER_DECODER:
        names = [site.name for site in tracker.sites]
        assert all("encoder" in n for n in names[:2]) and all("decoder" in n for n in names[2:])

    # One forward records every layer, over its real tokens x intermediate units.
    batch = make_batch(family)
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    real = {stack: int(mask.sum()) for stack, mask in real_token_masks(family, batch).items()}
    counts = tracker.layer_counts()
    assert list(counts) == [site.name for site in tracker.sites]
    for site in tracker.sites:
        assert counts[site.name][1] == real[site.stack] * INTERMEDIATE


@pytest.mark.parametrize("family", ["llama", "t5", "bert", "gpt2"])
def test_peft_wrapped_model_has_the_same_sites(family):
    plain = DensityTracker(make_model(family), DeftConfig(capture="down_in"))
    wrapped_model = peft.get_peft_model(make_model(family), peft.LoraConfig(target_modules="all-linear", r=2))
    wrapped = DensityTracker(wrapped_model, DeftConfig(capture="down_in"))
    assert [s.name for s in wrapped.sites] == [s.name for s in plain.sites]
    # The down-projection hooked is the LoRA-wrapped layer, so LoRA's own update is part of its input's graph.
    assert all(isinstance(s.down, peft.tuners.lora.LoraLayer) for s in wrapped.sites)


@pytest.mark.parametrize(
    "layers, expected",
    [(1, [1]), ([0], [0]), ("0-1", [0, 1]), ("0:1", [0]), (range(1, 2), [1]), ([1, 0], [0, 1]), (r"layers\.1\.", [1])],
)
def test_layer_selection_by_index_range_and_pattern(layers, expected):
    model = make_model("llama")
    tracker = DensityTracker(model, DeftConfig(layers=layers))
    assert [s.name for s in tracker.sites] == [f"model.layers.{i}.mlp" for i in expected]
    batch = make_batch("llama")
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    assert list(tracker.density()) == [f"model.layers.{i}.mlp" for i in expected]


@pytest.mark.parametrize("layers, stacks", [("decoder", ["decoder"] * 2), ("encoder", ["encoder"] * 2),
                                            ([2, 3], ["decoder"] * 2), (r"encoder\.block\.1", ["encoder"])])
def test_t5_layer_selection(layers, stacks):
    model = make_model("t5")
    tracker = DensityTracker(model, DeftConfig(layers=layers))
    assert [s.stack for s in tracker.sites] == stacks
    assert all(stack in s.name for s, stack in zip(tracker.sites, stacks))
    batch = make_batch("t5")
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    assert set(tracker.density()) == {s.name for s in tracker.sites}


def test_only_selected_layers_are_hooked():
    model = make_model("llama")
    before = _hook_count(model)
    DensityTracker(model, DeftConfig(layers=[1]))
    assert _hook_count(model) - before == 1
    assert len(model.model.layers[1].mlp.act_fn._forward_hooks) == 1
    assert len(model.model.layers[0].mlp.act_fn._forward_hooks) == 0


def test_fused_activation_needs_down_in():
    """An MLP whose activation is a plain function (as with fused kernels) has no module to hook for "act"."""
    model = make_model("llama")
    for layer in model.model.layers:
        del layer.mlp.act_fn
        layer.mlp.act_fn = torch.nn.functional.silu
    with pytest.raises(DeftConfigError, match="capture='down_in'"):
        DensityTracker(model, DeftConfig(capture="act"))
    tracker = DensityTracker(model, DeftConfig(capture="down_in"))
    assert len(tracker.sites) == 2


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        return x + self.ffn(x)


class _CustomModel(nn.Module):
    """An architecture DEFT does not know: its MLP has no recognisable attribute names."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_custom_modules_pattern_hooks_unknown_architectures():
    torch.manual_seed(0)
    model = _CustomModel()
    with pytest.raises(DeftConfigError, match="modules="):
        DensityTracker(model, DeftConfig())
    tracker = DensityTracker(model, DeftConfig(modules=r"ffn\.1$", eps=1e-2))
    assert [s.name for s in tracker.sites] == ["blocks.0.ffn.1", "blocks.1.ffn.1"]
    x = torch.randn(3, 5, 8)
    acts = []
    hooks = [b.ffn[1].register_forward_hook(lambda _m, _i, out: acts.append(out)) for b in model.blocks]
    with tracker.record():
        model(x)
    for h in hooks:
        h.remove()
    expected = torch.stack([(a * a / (a * a + 1e-2)).mean() for a in acts]).mean()
    torch.testing.assert_close(tracker.density_loss(), expected)
    assert tracker.layer_counts()["blocks.0.ffn.1"] == (int((acts[0] > 0).sum()), acts[0].numel())


def test_hand_reference_sees_what_the_tracker_hooks(family):
    """Guard for the reference itself: our hand-written module paths are real modules on every family."""
    model = make_model(family)
    for capture in ("act", "down_in"):
        with ActivationRecorder(family, model, capture) as rec:
            batch = make_batch(family)
            model(**batch)
        assert len(rec.acts) == num_mlp_layers(base_of(model))
        assert all(t[0].shape[-1] == INTERMEDIATE for t in rec.acts.values())
        assert torch.isfinite(hand_loss(rec, real_token_masks(family, batch), 1e-7))
