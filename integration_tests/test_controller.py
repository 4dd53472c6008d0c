"""deft_common.DensityController: the target-density controller (dual ascent on the density weight)."""

from __future__ import annotations

import pytest

from deft_common import DeftConfig, DeftConfigError, DensityController


def test_weight_follows_the_density_error():
    controller = DensityController(DeftConfig(target_density=0.5, controller_gain=0.2))
    assert controller.coef == 0.0  # starts as plain fine-tuning
    assert controller.update(0.9) == pytest.approx(0.08)  # above target: rises by gain * (0.9 - 0.5)
    assert controller.update(0.9) == pytest.approx(0.16)
    assert controller.update(0.4) == pytest.approx(0.14)  # below target: falls
    assert controller.update(0.0) == pytest.approx(0.04)
    assert controller.update(0.0) == 0.0  # never negative
    assert controller.log()["deft/density_error"] == pytest.approx(-0.5)


def test_state_round_trip():
    first = DensityController(DeftConfig(target_density=0.3))
    for density in (1.0, 0.9, 0.8):
        first.update(density)
    second = DensityController(DeftConfig(target_density=0.3))
    second.load_state_dict(first.state_dict())
    assert second.update(0.7) == first.update(0.7)


@pytest.mark.parametrize("settings, field", [
    (dict(target_density=1.0), "target_density"),
    (dict(target_density=0.0), "target_density"),
    (dict(target_density="half"), "target_density"),
    (dict(target_density=0.5, controller_gain=0.0), "controller_gain"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(DeftConfigError, match=field):
        DeftConfig(**settings)


def test_needs_a_target():
    with pytest.raises(DeftConfigError, match="target_density"):
        DensityController(DeftConfig())


def test_rejects_a_density_that_is_no_fraction():
    controller = DensityController(DeftConfig(target_density=0.5))
    with pytest.raises(ValueError, match="fraction"):
        controller.update(float("nan"))


def test_density_weight_state_refuses_a_different_config():
    from deft_common import DensityWeight

    with_target = DensityWeight(DeftConfig(target_density=0.3), layers=2)
    without = DensityWeight(DeftConfig(), layers=2)
    assert without.state_dict() == {}
    without.load_state_dict({})  # nothing to restore for a fixed weight
    with pytest.raises(DeftConfigError, match="target_density"):
        without.load_state_dict(with_target.state_dict())
    with pytest.raises(DeftConfigError, match="target_density"):
        with_target.load_state_dict({})
