"""Every bad input raises its own error, with a message that names the field and says how to fix it."""

import pytest
import torch
from torch import nn

from deft_common import DeftCheckpointingError, DeftConfig, DeftConfigError, DeftInputError, DensityTracker
from fixtures import make_batch, make_model


@pytest.mark.parametrize(
    "settings, field, fix",
    [
        ({"coef": -1.0}, "coef", "use 0 to only measure density"),
        ({"coef": "1.0"}, "coef", "must be a number"),
        ({"coef": float("nan")}, "coef", ">= 0"),
        ({"eps": 0.0}, "eps", "small positive value"),
        ({"eps": -1e-7}, "eps", "small positive value"),
        ({"threshold": -0.1}, "threshold", "use 0 for exact non-zeros"),
        ({"capture": "mlp_out"}, "capture", "'act'"),
        ({"coef_warmup_steps": -1}, "coef_warmup_steps", ">= 0"),
        ({"coef_warmup_steps": 2.5}, "coef_warmup_steps", "whole number"),
        ({"layers": -1}, "layers", "layer indices start at 0"),
        ({"layers": "3-1"}, "layers", "is empty"),
        ({"layers": [0, "decoder"]}, "layers", "not both"),
        ({"layers": "decoder("}, "layers", "not a valid regular expression"),
        ({"layers": True}, "layers", "use None for all layers"),
        ({"layers": []}, "layers", "a range such as '2-5'"),
        ({"modules": "ffn("}, "modules", "not a valid regular expression"),
        ({"modules": []}, "modules", "non-empty list"),
        ({"sparsity_setpoint": 1.0}, "sparsity_setpoint", "must be below 1"),
        ({"sparsity_setpoint": -0.5}, "sparsity_setpoint", "fraction in [0, 1)"),
        ({"sparsity_setpoint": 0.9, "setpoint_ramp_steps": -1}, "setpoint_ramp_steps", "whole number >= 0"),
        ({"setpoint_ramp_steps": 10}, "setpoint_ramp_steps", "set sparsity_setpoint too"),
        ({"setpoint_schedule": "cosine"}, "setpoint_schedule", "'geometric'"),
        ({"setpoint_gradient": "straight"}, "setpoint_gradient", "'ste'"),
        ({"surrogate": "l2"}, "surrogate", "'l1'"),
        ({"surrogate": "setpoint"}, "surrogate", "set sparsity_setpoint too"),
        ({"sparsity_setpoint": 0.9, "setpoint_dense_every": 1}, "setpoint_dense_every", "use 2"),
        ({"sparsity_setpoint": 0.9, "setpoint_dense_every": -2}, "setpoint_dense_every", "whole number >= 0"),
        ({"setpoint_dense_every": 2}, "setpoint_dense_every", "set sparsity_setpoint too"),
        ({"inference_sparsity": 1.0}, "inference_sparsity", "must be below 1"),
        ({"inference_sparsity": -0.1}, "inference_sparsity", "fraction in [0, 1)"),
        ({"inference_sparsity": "0.9"}, "inference_sparsity", "must be a number"),
        ({"calibration_batches": 0}, "calibration_batches", "whole number >= 1"),
        ({"calibration_batches": 2.0}, "calibration_batches", "whole number >= 1"),
    ],
)
def test_bad_setting_names_the_field_and_the_fix(settings, field, fix):
    with pytest.raises(DeftConfigError) as error:
        DeftConfig(**settings)
    assert f"DeftConfig.{field}" in str(error.value)
    assert fix in str(error.value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(DeftConfigError) as error:
        DeftConfig.from_dict({"coef": 1.0, "lambda": 0.5, "epsilon": 1e-7})
    message = str(error.value)
    assert "['epsilon', 'lambda']" in message and "the known settings are" in message and "'eps'" in message
    assert DeftConfig.from_dict(None) == DeftConfig()


def test_tracker_needs_a_deft_config():
    with pytest.raises(DeftConfigError, match="needs a deft_common.DeftConfig, got dict"):
        DensityTracker(make_model("llama"), {"coef": 1.0})


def test_layer_index_out_of_range():
    with pytest.raises(DeftConfigError) as error:
        DensityTracker(make_model("llama"), DeftConfig(layers=[0, 5]))
    message = str(error.value)
    assert "DeftConfig.layers" in message and "index 5 is out of range" in message and "indices 0..1" in message
    with pytest.raises(DeftConfigError, match="indices 0..3 \\(encoder first, then decoder\\)"):
        DensityTracker(make_model("t5"), DeftConfig(layers="2-4"))


def test_layers_pattern_that_matches_nothing():
    with pytest.raises(DeftConfigError) as error:
        DensityTracker(make_model("llama"), DeftConfig(layers="decoder"))
    assert "DeftConfig.layers=['decoder'] matches no MLP block" in str(error.value)
    assert "'model.layers.0.mlp'" in str(error.value)  # shows what the names look like


def test_modules_pattern_that_matches_nothing():
    with pytest.raises(DeftConfigError) as error:
        DensityTracker(make_model("llama"), DeftConfig(modules=r"ffn\.act"))
    assert "DeftConfig.modules" in str(error.value) and "named_modules()" in str(error.value)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), nn.Linear(4, 4)])
def test_model_without_a_recognisable_mlp(model):
    with pytest.raises(DeftConfigError) as error:
        DensityTracker(model, DeftConfig())
    message = str(error.value)
    assert "no MLP block found" in message and "DeftConfig(modules=" in message


@pytest.mark.parametrize("mask", [torch.ones(2, 8, 1), torch.ones(8), [[1] * 8] * 2])
def test_mask_that_is_not_a_2d_tensor(mask):
    tracker = DensityTracker(make_model("llama"))
    with pytest.raises(DeftInputError, match="attention_mask must be a \\(batch, seq_len\\) tensor"):
        with tracker.record(attention_mask=mask):
            pass


@pytest.mark.parametrize("shape", [(3, 8), (2, 10), (2, 6), (1, 16)])
def test_mask_that_does_not_fit_the_batch(shape):
    model = make_model("llama")
    tracker = DensityTracker(model)
    batch = make_batch("llama", batch_size=2, seq_len=8)
    with pytest.raises(DeftInputError) as error:
        with tracker.record(attention_mask=torch.ones(shape, dtype=torch.long)):
            model(**batch)
    message = str(error.value)
    assert f"attention_mask has shape {shape}" in message and "(2, 8, 64)" in message
    assert "pass the (batch, seq_len) mask of the batch given to the model" in message


def test_decoder_mask_that_does_not_fit():
    model = make_model("t5")
    tracker = DensityTracker(model)
    batch = make_batch("t5")
    with pytest.raises(DeftInputError, match="decoder_attention_mask has shape \\(2, 7\\)"):
        with tracker.record(attention_mask=batch["attention_mask"], decoder_attention_mask=torch.ones(2, 7)):
            model(**batch)


def test_results_before_any_record():
    tracker = DensityTracker(make_model("llama"))
    with pytest.raises(RuntimeError, match="run the model inside `with tracker.record"):
        tracker.density_loss()


def test_density_at_a_threshold_that_was_not_counted():
    model = make_model("llama")
    tracker = DensityTracker(model, DeftConfig(threshold=0.01))
    batch = make_batch("llama")
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    assert tracker.density(0.0) and tracker.density(0.01)
    with pytest.raises(ValueError, match="counted for thresholds \\(0.0, 0.01\\), not 0.5"):
        tracker.density(0.5)


def test_density_term_that_cannot_train_anything():
    """Training with only parameters downstream of every MLP trainable: the term would silently do nothing."""
    model = make_model("llama")
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("model.norm")
    tracker = DensityTracker(model)
    batch = make_batch("llama")
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    with pytest.raises(DeftCheckpointingError, match="no trainable parameter lies upstream"):
        tracker.density_loss()
