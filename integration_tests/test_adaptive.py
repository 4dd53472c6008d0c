"""ADA-DEFT (deft_common.adaptive) on the fixture models: the layer weights train with the model, shift the density
pressure to the sparser blocks, are saved and loaded beside a PEFT adapter, and choose blocks whose skipping gives
exactly the output of the model with those blocks' activations zeroed, with their weights freed."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from fixtures import make_batch, make_model

from deft_common import (DeftConfig, DeftConfigError, DensityTracker, apply_ada_deft, choose_blocks_to_skip,
                         find_mlp_sites, layer_weights, load_layer_weights, save_layer_weights, skip_mlp_blocks)
from deft_common.adaptive import WEIGHTS_FILE

SKIP_FAMILIES = ["bert", "roberta", "llama", "t5", "t5_gated", "gpt2", "phi"]


def record_loss(model, family, config):
    tracker = DensityTracker(model, config)
    batch = make_batch(family)
    with tracker.record(**tracker.masks_for(batch)):
        out = model(**batch)
    return tracker, out, tracker.density_loss()


def set_logits(model, values):
    with torch.no_grad():
        layer_weights(model).logits.copy_(torch.tensor(values, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["bert", "llama", "t5_gated"])
def test_weights_get_gradients_and_train_with_the_model(family):
    model = make_model(family)
    tracker, out, loss = record_loss(model, family, DeftConfig(adaptive=True))
    # uniform weights at the start: exactly plain DEFT's loss
    plain = torch.stack(list(tracker.layer_losses().values())).mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    weights = layer_weights(model)
    assert weights.names == [s.name for s in tracker.sites]
    assert any(p is weights.logits for p in model.parameters())  # an optimizer over model.parameters() trains it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    (out.loss + loss).backward()
    assert weights.logits.grad is not None and weights.logits.grad.abs().sum() > 0
    before = weights.logits.detach().clone()
    optimizer.step()
    assert not torch.equal(before, weights.logits.detach())
    assert sum(weights.weights().values()) == pytest.approx(len(weights.names), rel=1e-5)  # mean 1
    tracker.remove()


def test_pressure_moves_to_the_sparser_block():
    """Block 0 has half its units dead: its density term is lower, so gradient descent raises its weight."""
    model = make_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.bias[::2] = -20.0
    tracker, _, loss = record_loss(model, "bert", DeftConfig(adaptive=True))
    losses = [v.item() for v in tracker.layer_losses().values()]
    assert losses[0] < losses[1]
    loss.backward()
    grad = layer_weights(model).logits.grad
    assert grad[0] < 0 < grad[1]
    tracker.remove()


def test_weights_with_peft_and_frozen_weights_error():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(make_model("bert"), lora)
    tracker, out, loss = record_loss(model, "bert", DeftConfig(adaptive=True))
    (out.loss + loss).backward()
    assert layer_weights(model).logits.grad.abs().sum() > 0
    assert "deft_adaptive.logits" in " ".join(n for n, p in model.named_parameters() if p.requires_grad)
    tracker.remove()

    # weights attached before PEFT wraps the model are frozen by PEFT: a clear error, not an untrained weight
    base = make_model("bert")
    DensityTracker(base, DeftConfig(adaptive=True)).remove()
    wrapped = get_peft_model(base, lora)
    with pytest.raises(DeftConfigError, match="frozen"):
        record_loss(wrapped, "bert", DeftConfig(adaptive=True))


def test_save_and_load_beside_the_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    DensityTracker(model, DeftConfig(adaptive=True)).remove()
    set_logits(model, [0.01, -0.02])
    model.save_pretrained(tmp_path)
    path = save_layer_weights(model, tmp_path)
    assert path == tmp_path / WEIGHTS_FILE and (tmp_path / "adapter_config.json").is_file()

    fresh = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert layer_weights(fresh) is None  # save_pretrained alone does not keep them
    loaded = load_layer_weights(fresh, tmp_path)
    assert torch.equal(loaded.logits.detach(), layer_weights(model).logits.detach())
    assert loaded.weights() == pytest.approx(layer_weights(model).weights())
    assert choose_blocks_to_skip(fresh, budget=1) == choose_blocks_to_skip(model, budget=1) == ["model.layers.0.mlp"]

    with pytest.raises(DeftConfigError, match="no ADA-DEFT weights were saved"):
        load_layer_weights(fresh, tmp_path / "elsewhere")
    with pytest.raises(DeftConfigError, match="does not have"):
        load_layer_weights(make_model("bert"), tmp_path)


# ------------------------------------------------------------------------------------------------ selection
def trained_bert(logits=(0.02, -0.01)):
    model = make_model("bert")
    DensityTracker(model, DeftConfig(adaptive=True)).remove()
    set_logits(model, list(logits))
    return model


def test_choose_blocks_by_budget_or_threshold():
    model = trained_bert()
    first, second = (s.name for s in find_mlp_sites(model, DeftConfig()))
    assert choose_blocks_to_skip(model, budget=1) == [first]
    assert choose_blocks_to_skip(model, budget=0.5) == [first]
    assert choose_blocks_to_skip(model, budget=2) == [first, second]
    w = layer_weights(model).weights()
    assert w[first] > 1 > w[second]
    assert choose_blocks_to_skip(model, threshold=1.0) == [first]


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "at least 1"),
    ({"budget": 3}, "has 2"),
    ({"budget": 0.1}, "rounds to 0"),
    ({"budget": 1.5}, "fraction in"),
    ({"budget": "two"}, "number of MLP blocks"),
    ({"budget": True}, "number of MLP blocks"),
    ({"threshold": 0}, "positive weight"),
    ({"threshold": 5.0}, "no MLP block has"),
    ({}, "either a budget"),
    ({"budget": 1, "threshold": 1.0}, "either a budget"),
])
def test_bad_budget_or_threshold(kwargs, message):
    with pytest.raises(DeftConfigError, match=message):
        choose_blocks_to_skip(trained_bert(), **kwargs)


def test_untrained_or_missing_weights_refuse_to_choose():
    with pytest.raises(DeftConfigError, match="never trained"):
        choose_blocks_to_skip(trained_bert(logits=(0.0, 0.0)), budget=1)
    with pytest.raises(DeftConfigError, match="has no ADA-DEFT weights"):
        choose_blocks_to_skip(make_model("bert"), budget=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"skip_budget": 2}, "set adaptive=True"),
    ({"adaptive": "yes"}, "true or false"),
    ({"adaptive": True, "adaptive_temperature": 0.0}, "adaptive_temperature"),
    ({"adaptive": True, "adaptive_logit_scale": -1.0}, "adaptive_logit_scale"),
    ({"adaptive": True, "skip_budget": 2, "skip_threshold": 1.0}, "not both"),
    ({"adaptive": True, "skip_budget": 0}, "skip budget 0"),
    ({"adaptive": True, "skip_threshold": -1.0}, "positive weight"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(DeftConfigError, match=message):
        DeftConfig(**kwargs)


def test_config_round_trip():
    cfg = DeftConfig(adaptive=True, skip_budget=0.25, adaptive_temperature=0.2)
    assert DeftConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------------- skipping
def zero_activation_hooks(model, names):
    """Reference: the unchanged model with the chosen blocks' MLP activations replaced by zeros."""
    sites = {s.name: s for s in find_mlp_sites(model, DeftConfig(capture="down_in"))}
    return [sites[n].down.register_forward_pre_hook(lambda _m, args: (torch.zeros_like(args[0]),)) for n in names]


def last_hidden(out) -> torch.Tensor:
    """The last hidden states (encoder and decoder for T5): the logits of the random fixture heads barely move."""
    if getattr(out, "decoder_hidden_states", None) is not None:
        return torch.cat([out.encoder_last_hidden_state.flatten(), out.decoder_hidden_states[-1].flatten()])
    return out.hidden_states[-1]


@pytest.mark.parametrize("family", SKIP_FAMILIES)
def test_skipping_equals_zeroed_activations(family):
    model = make_model(family).eval()
    DensityTracker(model, DeftConfig(adaptive=True)).remove()
    n = len(layer_weights(model).names)
    set_logits(model, [0.01 * ((i * 7) % n) for i in range(n)])  # not always the first block
    names = choose_blocks_to_skip(model, budget=1)
    batch = make_batch(family)
    reference = copy.deepcopy(model)
    handles = zero_activation_hooks(reference, names)
    skipped = copy.deepcopy(model)
    report = skip_mlp_blocks(skipped, names)
    with torch.no_grad():
        expected, got, full = (last_hidden(m(**batch, output_hidden_states=True)) for m in (reference, skipped, model))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the skipped block mattered, so the check can fail
    for h in handles:
        h.remove()
    assert report.blocks == names and report.freed_parameters > 0
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in skipped.parameters()) == report.freed_parameters
    assert names[0] not in [s.name for s in find_mlp_sites(skipped, DeftConfig(capture="down_in"))]


@pytest.mark.parametrize("family", ["llama", "t5_gated"])
def test_skipping_a_bias_free_mlp_is_removing_its_output(family):
    """Without a down-projection bias, skipping = the MLP adds nothing to the residual stream."""
    model = make_model(family).eval()
    DensityTracker(model, DeftConfig(adaptive=True)).remove()
    set_logits(model, [0.01] + [0.0] * (len(layer_weights(model).names) - 1))
    name = choose_blocks_to_skip(model, budget=1)[0]
    reference = copy.deepcopy(model)
    reference.get_submodule(name).register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    skipped = copy.deepcopy(model)
    skip_mlp_blocks(skipped, [name])
    batch = make_batch(family)
    with torch.no_grad():
        assert torch.allclose(skipped(**batch).logits, reference(**batch).logits, atol=1e-6)


def test_skipping_frees_the_weights_under_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["up_proj", "q_proj"]))
    DensityTracker(model, DeftConfig(adaptive=True)).remove()
    set_logits(model, [0.0, 0.02])
    mlp = model.get_base_model().model.layers[1].mlp
    gone = [weakref.ref(mlp), weakref.ref(mlp.down_proj.weight), weakref.ref(mlp.up_proj.base_layer.weight)]
    before = sum(p.numel() for p in model.parameters())
    del mlp
    report = apply_ada_deft(model, DeftConfig(adaptive=True, skip_budget=1))
    gc.collect()
    assert report.blocks == ["model.layers.1.mlp"]
    assert all(ref() is None for ref in gone)
    assert before - sum(p.numel() for p in model.parameters()) == report.freed_parameters
    assert report.freed_bytes == 4 * report.freed_parameters  # fp32
    with torch.no_grad():
        model.eval()(**make_batch("llama"))  # still runs


def test_skipping_errors():
    model = trained_bert()
    tracker = DensityTracker(model, DeftConfig(adaptive=True))
    with pytest.raises(DeftConfigError, match="tracker.remove"):
        apply_ada_deft(model, budget=1)
    tracker.remove()
    with pytest.raises(DeftConfigError, match="not an MLP block"):
        skip_mlp_blocks(model, ["bert.encoder.layer.7"])
    apply_ada_deft(model, budget=1)
    with pytest.raises(DeftConfigError, match="already skipped"):
        skip_mlp_blocks(model, ["bert.encoder.layer.0"])

    opt = make_model("opt")
    DensityTracker(opt, DeftConfig(adaptive=True)).remove()
    set_logits(opt, [0.01, 0.0])
    with pytest.raises(DeftConfigError, match="not a module of its own"):
        apply_ada_deft(opt, budget=1)
