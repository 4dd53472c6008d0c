"""deft_common.DensityController: the target-density controller (damped dual ascent on the density weight)."""

from __future__ import annotations

import pytest

from deft_common import DeftConfig, DeftConfigError, DensityController


def test_without_damping_the_weight_follows_the_density_error():
    controller = DensityController(DeftConfig(target_density=0.5, controller_gain=0.2, controller_damping=0.0))
    assert controller.coef == 0.0  # starts as plain fine-tuning
    assert controller.update(0.9) == pytest.approx(0.08)  # above target: rises by gain * (0.9 - 0.5)
    assert controller.update(0.9) == pytest.approx(0.16)
    assert controller.update(0.4) == pytest.approx(0.14)  # below target: falls
    assert controller.update(0.0) == pytest.approx(0.04)
    assert controller.update(0.0) == 0.0  # never negative
    assert controller.log()["deft/density_error"] == pytest.approx(-0.5)


def test_damping_holds_the_weight_back_while_the_density_falls():
    controller = DensityController(DeftConfig(target_density=0.5, controller_gain=0.2, controller_damping=2.0))
    assert controller.update(0.9) == pytest.approx(0.08)  # no previous density yet: dual ascent alone
    assert controller.update(0.88) == pytest.approx(0.08 + 0.2 * 0.38 - 2.0 * 0.02)  # falling: rises less
    assert controller.update(0.88) == pytest.approx(0.116 + 0.2 * 0.38)  # steady: dual ascent alone
    assert controller.update(0.5) == 0.0  # a fall of 0.38 in one step: back to plain fine-tuning
    assert controller.update(0.52) == pytest.approx(0.2 * 0.02 + 2.0 * 0.02)  # rising again: pushes at once


def test_damping_stops_the_overshoot_of_a_density_that_keeps_falling_under_a_constant_weight():
    """The plant DEFT meets on pretrained models: the weight sets how fast the density falls, not where it stops
    (density -= rate × max(0, coef - onset) per step, with a delay). Plain dual ascent is still raising the weight
    when the density reaches the target, so it overshoots; with damping it settles within ±0.02."""

    def run(damping):
        controller = DensityController(DeftConfig(target_density=0.85, controller_gain=0.2,
                                                  controller_damping=damping))
        density, pending = 1.0, [0.0] * 5  # the weight acts 5 steps late (optimizer momentum, lagging layers)
        trace = []
        for _ in range(300):
            pending.append(controller.coef)
            density = max(0.0, density - 0.002 * max(0.0, pending.pop(0) - 2.0))
            controller.update(density)
            trace.append(density)
        return trace

    undamped, damped = run(0.0), run(15.0)
    assert min(undamped) < 0.85 - 0.15  # the overshoot the damping is for
    assert all(abs(d - 0.85) <= 0.01 for d in damped[-50:])
    assert min(damped) >= 0.85 - 0.01


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
    (dict(target_density=0.5, controller_damping=-1.0), "controller_damping"),
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
    from deft_common import CoefSchedule

    with_target = CoefSchedule(DeftConfig(target_density=0.3), layers=2)
    without = CoefSchedule(DeftConfig(), layers=2)
    assert without.state_dict() == {}
    without.load_state_dict({})  # nothing to restore for a fixed weight
    with pytest.raises(DeftConfigError, match="target_density"):
        without.load_state_dict(with_target.state_dict())
    with pytest.raises(DeftConfigError, match="target_density"):
        with_target.load_state_dict({})
