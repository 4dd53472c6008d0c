"""Calibrated sparsity thresholds: calibrate_thresholds, SparsityThresholds files, apply_thresholds (mask kernel)."""

import importlib.util
import json

import pytest
import torch

from core_reference import FAMILY_CAPTURES, ActivationRecorder, real_token_masks
from deft_common import (DeftConfig, DeftConfigError, DeftInputError, DeftThresholdsError, SparsityThresholds,
                         ThresholdsWarning, apply_thresholds, calibrate_thresholds, find_mlp_sites)
from fixtures import make_batch, make_model

peft = pytest.importorskip("peft")


def _batches(family, seeds, batch_size=4, seq_len=16):
    return [make_batch(family, batch_size=batch_size, seq_len=seq_len, seed=s) for s in seeds]


def _held_out_density(family, model, capture, batches):
    """Per block: fraction of entries != 0 over real tokens, seen by hooks of our own (core_reference)."""
    counts = {}
    with torch.no_grad():
        for batch in batches:
            with ActivationRecorder(family, model, capture) as recorder:
                model(**batch)
            masks = real_token_masks(family, batch)
            for block, tensors in recorder.acts.items():
                mask = masks[recorder.stacks[block]]
                a = tensors[0].reshape(*mask.shape, tensors[0].shape[-1])[mask]
                c = counts.setdefault(block, [0, 0])
                c[0] += int((a != 0).sum())
                c[1] += a.numel()
    return {block: active / entries for block, (active, entries) in counts.items()}


@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_held_out_density_is_near_the_target(family, capture):
    model = make_model(family).eval()
    th = calibrate_thresholds(model, _batches(family, range(6)), sparsity=0.8, config=DeftConfig(capture=capture))
    assert set(th.thresholds) == {s.name for s in find_mlp_sites(model, DeftConfig(capture=capture))}
    assert th.capture == capture and th.tokens > 0
    for name, tau in th.thresholds.items():
        assert tau >= 0 and th.sparsity[name] == 0.8
        assert th.calibrated[name] >= 0.8 - 1e-9
    with apply_thresholds(model, th):
        density = _held_out_density(family, model, capture, _batches(family, range(100, 106)))
    assert set(density) == set(th.thresholds)
    for name, value in density.items():
        expected = 1 - th.calibrated[name]  # ReLU blocks with more exact zeros than asked keep τ = 0
        assert abs(value - expected) < 0.06, (name, value, expected)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_calibration_quantile_matches_the_exact_one(family):
    """τ is the q-quantile of |a| over real tokens, exact up to the histogram's bin (0.27%)."""
    model = make_model(family).eval()
    batches = _batches(family, range(3))
    th = calibrate_thresholds(model, batches, sparsity=0.9)
    values = {}
    with torch.no_grad():
        for batch in batches:
            with ActivationRecorder(family, model, "act") as recorder:
                model(**batch)
            masks = real_token_masks(family, batch)
            for block, tensors in recorder.acts.items():
                mask = masks[recorder.stacks[block]]
                values.setdefault(block, []).append(tensors[0].reshape(*mask.shape, -1)[mask].abs().flatten())
    for block, parts in values.items():
        exact = torch.quantile(torch.cat(parts).double(), 0.9).item()
        assert th.thresholds[block] == pytest.approx(exact, rel=5e-3)


def test_padding_never_counts():
    model = make_model("llama").eval()
    batch = make_batch("llama", batch_size=4, seq_len=16, padding=False)
    padded = make_batch("llama", batch_size=4, seq_len=16, padding=False)
    padded = {"input_ids": torch.cat([batch["input_ids"], torch.full((4, 8), 0)], 1),
              "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(4, 8, dtype=torch.long)], 1)}
    plain = calibrate_thresholds(model, [batch], sparsity=0.7)
    with_padding = calibrate_thresholds(model, [padded], sparsity=0.7)
    assert plain.tokens == with_padding.tokens == 64
    for name, tau in plain.thresholds.items():
        assert with_padding.thresholds[name] == pytest.approx(tau, rel=1e-6)


def test_relu_block_with_more_zeros_than_asked_gets_tau_zero():
    model = make_model("t5").eval()  # T5 v1.0: ReLU
    th = calibrate_thresholds(model, _batches("t5", range(3)), sparsity=0.1)
    for name, tau in th.thresholds.items():
        assert tau == 0.0
        assert th.calibrated[name] > 0.1  # the measured share of exact zeros


def test_exact_zeros_after_apply_and_remove_restores_bit_for_bit():
    model = make_model("llama").eval()
    batch = make_batch("llama", batch_size=2, seq_len=8)
    with torch.no_grad():
        before = model(**batch).logits
    th = calibrate_thresholds(model, _batches("llama", range(3)), sparsity=0.9)
    handle = apply_thresholds(model, th)
    with torch.no_grad(), ActivationRecorder("llama", model, "act") as recorder:
        thresholded = model(**batch).logits
    for block, (a,) in recorder.acts.items():
        small = a.abs() <= th.thresholds[block]
        assert small.any() and (a[small] == 0).all() and (a[~small] != 0).all()
    assert not torch.equal(thresholded, before)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    apply_thresholds(model, th).remove()  # after remove() it can be applied again


def test_save_load_round_trip(tmp_path):
    model = make_model("bert").eval()
    th = calibrate_thresholds(model, _batches("bert", range(2)), sparsity={"bert.encoder.layer.0": 0.95})
    assert list(th.thresholds) == ["bert.encoder.layer.0"]  # only the block named is thresholded
    path = th.save(tmp_path / "out")
    assert path.name == "deft_thresholds.json"
    for source in (tmp_path / "out", path):
        loaded = SparsityThresholds.load(source)
        assert loaded == th


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_wrapped_and_bf16(dtype):
    model = peft.get_peft_model(make_model("llama", dtype=dtype),
                                peft.LoraConfig(target_modules=["q_proj", "up_proj", "down_proj"], r=2))
    plain_names = {s.name for s in find_mlp_sites(make_model("llama"), DeftConfig())}
    th = calibrate_thresholds(model, _batches("llama", range(6)), sparsity=0.8)
    assert set(th.thresholds) == plain_names  # names relative to the base model: same with or without PEFT
    assert model.training  # calibration restores the mode
    model.eval()
    with apply_thresholds(model, th):
        density = _held_out_density("llama", model, "act", _batches("llama", range(100, 106)))
    for value in density.values():
        assert abs(value - 0.2) < 0.06


def test_qlora(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install 'deft-plugins[qlora]')")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fixtures import _config, make_tokenizer

    # bitsandbytes >= 0.50.2 packs 4-bit weights for CPU inference in blocks of 64 input features: the fixture's
    # 32-wide projections fail there (a reshape to width 0), so this model is twice as wide.
    config = _config("llama")
    config.hidden_size, config.intermediate_size = 2 * config.hidden_size, 2 * config.intermediate_size
    config.head_dim = config.hidden_size // config.num_attention_heads
    path = tmp_path / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "down_proj"], r=2))
    for capture in ("act", "down_in"):
        th = calibrate_thresholds(model, _batches("llama", range(4)), sparsity=0.8, config=DeftConfig(capture=capture))
        with apply_thresholds(model.eval(), th):
            density = _held_out_density("llama", model, capture, _batches("llama", range(100, 104)))
        assert all(abs(v - 0.2) < 0.08 for v in density.values()), density


def test_encoder_decoder_uses_the_decoder_mask():
    model = make_model("t5_gated").eval()
    batch = make_batch("t5_gated", batch_size=4, seq_len=16)
    th = calibrate_thresholds(model, [batch], sparsity=0.5)
    decoder = [n for n in th.thresholds if n.startswith("decoder")]
    encoder = [n for n in th.thresholds if n.startswith("encoder")]
    assert decoder and encoder
    # Fewer real label positions than encoder positions would show in the counts: tokens = the larger stack.
    assert th.tokens == int(batch["attention_mask"].sum())


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, True, "0.9", float("nan")])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(DeftThresholdsError, match=r"sparsity.*\[0, 1\)"):
        calibrate_thresholds(make_model("llama"), _batches("llama", [0]), sparsity=sparsity)


def test_sparsity_dict_naming_unknown_blocks():
    with pytest.raises(DeftThresholdsError, match="model.layers.9.mlp.*does not have"):
        calibrate_thresholds(make_model("llama"), _batches("llama", [0]), sparsity={"model.layers.9.mlp": 0.5})


def test_no_batches_and_no_real_token():
    model = make_model("llama")
    with pytest.raises(DeftInputError, match="no batches"):
        calibrate_thresholds(model, [], sparsity=0.5)
    batch = make_batch("llama")
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    with pytest.raises(DeftInputError, match="no real token"):
        calibrate_thresholds(model, [batch], sparsity=0.5)


def test_thresholds_of_another_model():
    llama_th = calibrate_thresholds(make_model("llama"), _batches("llama", [0]), sparsity=0.5)
    with pytest.raises(DeftThresholdsError, match="another model"):
        apply_thresholds(make_model("gpt2"), llama_th)
    wider = dict(llama_th.widths)
    wider[next(iter(wider))] += 1
    other = SparsityThresholds(llama_th.thresholds, llama_th.sparsity, llama_th.calibrated, "act",
                               llama_th.tokens, wider)
    with pytest.raises(DeftThresholdsError, match="hidden units.*another model"):
        apply_thresholds(make_model("llama"), other)


def test_capture_point_the_model_lacks():
    """Thresholds at capture='act' on a model whose MLP has no activation module (e.g. a fused MLP)."""
    model = make_model("llama")
    th = calibrate_thresholds(model, _batches("llama", [0]), sparsity=0.5)
    for layer in model.model.layers:
        del layer.mlp.act_fn
        layer.mlp.act_fn = torch.nn.functional.silu  # a plain function: nothing to hook
    with pytest.raises(DeftConfigError, match="capture='act'.*down_in"):
        apply_thresholds(model, th)


def test_one_batch_instead_of_an_iterable_of_batches_is_a_clear_error():
    model = make_model("llama")
    with pytest.raises(DeftInputError, match=r"wants an iterable of batches .*got one batch \(a dict\).*\[batch\]"):
        calibrate_thresholds(model, make_batch("llama"), sparsity=0.5)
    with pytest.raises(DeftInputError, match="got Tensor"):
        calibrate_thresholds(model, make_batch("llama")["input_ids"], sparsity=0.5)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="deft_thresholds.json"):
        SparsityThresholds.load(tmp_path)
    path = tmp_path / "deft_thresholds.json"
    path.write_text("{not json")
    with pytest.raises(DeftThresholdsError, match="not valid JSON"):
        SparsityThresholds.load(tmp_path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DeftThresholdsError, match="format"):
        SparsityThresholds.load(path)
    good = calibrate_thresholds(make_model("llama"), _batches("llama", [0]), sparsity=0.5).save(tmp_path)
    payload = json.loads(good.read_text())
    del payload["blocks"]["model.layers.0.mlp"]["threshold"]
    del payload["checksum"]  # a file made by hand: no checksum
    path.write_text(json.dumps(payload))
    with pytest.raises(DeftThresholdsError, match="model.layers.0.mlp.*threshold"):
        SparsityThresholds.load(path)


def _edited(tmp_path, edit, keep_checksum=False):
    """A thresholds file of the llama fixture, changed by `edit(payload)` (and its checksum dropped, as a file
    written by hand has none, unless keep_checksum)."""
    path = calibrate_thresholds(make_model("llama"), _batches("llama", [0]), sparsity=0.5).save(tmp_path)
    payload = json.loads(path.read_text())
    edit(payload)
    if not keep_checksum:
        del payload["checksum"]
    path.write_text(json.dumps(payload))
    return path


@pytest.mark.parametrize("field, value, match", [
    ("threshold", float("inf"), "threshold inf, expected a finite number >= 0"),
    ("threshold", -0.5, "threshold -0.5, expected a finite number >= 0"),
    ("sparsity", 5, r"sparsity 5.0, expected a fraction in \[0, 1\)"),
    ("calibrated", -3, r"calibrated -3.0, expected a fraction in \[0, 1\]"),
    ("width", 0, "width 0, expected a whole number >= 1"),
])
def test_values_out_of_range_are_errors(tmp_path, field, value, match):
    path = _edited(tmp_path, lambda p: p["blocks"]["model.layers.1.mlp"].__setitem__(field, value))
    with pytest.raises(DeftThresholdsError, match=f"model.layers.1.mlp.*{match}"):
        SparsityThresholds.load(path)


def test_a_file_changed_after_it_was_written_is_an_error(tmp_path):
    path = _edited(tmp_path, lambda p: p.__setitem__("capture", "down_in"), keep_checksum=True)
    with pytest.raises(DeftThresholdsError, match="changed after it was written.*calibrate again"):
        SparsityThresholds.load(path)
    payload = json.loads(path.read_text())
    del payload["checksum"]  # the fix the message gives: use the file as edited
    path.write_text(json.dumps(payload))
    assert SparsityThresholds.load(path).capture == "down_in"


def test_thresholds_of_a_model_with_fewer_blocks_are_an_error(tmp_path):
    import transformers

    from fixtures import make_config

    two_layers = calibrate_thresholds(make_model("llama"), _batches("llama", [0]), sparsity=0.5)
    config = make_config("llama")
    config.num_hidden_layers = 4  # same names for the first two blocks, same width
    four_layers = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(DeftThresholdsError, match="calibrated on a model with 2 MLP blocks, but .* has 4"):
        apply_thresholds(four_layers, SparsityThresholds.load(two_layers.save(tmp_path)))
    # An older file (no model_blocks) that covers some blocks: applied to those, with a warning naming the rest.
    old = _edited(tmp_path, lambda p: p.pop("model_blocks"))
    with pytest.warns(ThresholdsWarning, match="cover 2 of the 4 MLP blocks.*2 stay dense"):
        apply_thresholds(four_layers, SparsityThresholds.load(old)).remove()


def test_blocks_chosen_at_calibration_apply_without_a_warning(tmp_path):
    import warnings

    model = make_model("llama")
    th = calibrate_thresholds(model, _batches("llama", [0]), sparsity=0.5, config=DeftConfig(layers=[1]))
    assert list(th.thresholds) == ["model.layers.1.mlp"] and th.model_blocks == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_thresholds(model, SparsityThresholds.load(th.save(tmp_path))).remove()


def test_applying_twice_and_unknown_kernel():
    model = make_model("llama")
    th = calibrate_thresholds(model, _batches("llama", [0]), sparsity=0.5)
    with pytest.raises(DeftThresholdsError, match="kernel='dense'"):
        apply_thresholds(model, th, kernel="dense")
    handle = apply_thresholds(model, th)
    with pytest.raises(DeftThresholdsError, match="already applied"):
        apply_thresholds(model, th)
    handle.remove()
