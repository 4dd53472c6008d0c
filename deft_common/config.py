"""`DeftConfig`: every setting of activation-density DEFT, validated once, in one place.

Every adapter (HF callback and mixin, TRL mixin, Axolotl `deft:` block, DeepSpeed hook) takes this same object,
so a field means the same thing everywhere. Note: PEFT >= 0.21 exports an unrelated `peft.DeftConfig`
("Decompositional Efficient Fine-Tuning"); this one is `deft_common.DeftConfig`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DeftConfigError

CAPTURE_POINTS = ("act", "down_in")
SETPOINT_SCHEDULES = ("linear", "geometric")
SETPOINT_GRADIENTS = ("mask", "ste")
SURROGATES = ("paper", "l1", "setpoint")

# A string of the form "2-5" or "2:5" selects a range of layer indices (inclusive "-", Python-style ":").
_RANGE = re.compile(r"^\s*(\d+)\s*([-:])\s*(\d+)\s*$")




@dataclass
class DeftConfig:
    """Settings of the density loss and the density metric. Each field's meaning is its `help` metadata
    (`DeftConfig.help(name)`), which the README's configuration table, the Axolotl schema and `deft demo --help`
    show; a new field is added here, with its help, and as a row of the README table."""

    coef: float = field(default=1.0, metadata={"help": (
        'λ, the weight of the density term: loss = task loss + coef × density loss (paper: 1.0). `0` only '
        'measures density.'
    )})
    eps: float = field(default=1e-7, metadata={"help": (
        'ε of the surrogate s(a) = a² / (a² + ε) (paper: 1e-7).'
    )})
    surrogate: str = field(default="paper", metadata={"help": (
        'what the density loss averages per entry: `"paper"`, s(a) = a² / (a² + ε), a smooth count of the '
        'non-zeros whose gradient lives only near 0; `"l1"`, |a|, the L1 penalty of ProSparse and arXiv 2603.23198, '
        'whose gradient pulls every activation toward 0 (`eps` unused); `"setpoint"`, min(|a|, τ) / τ with τ the '
        "block's latest set-point threshold (needs `sparsity_setpoint`): on the set-point's dense steps its gradient "
        'pulls toward 0 only the activations the mask removes, and leaves those it keeps alone.'
    )})
    threshold: float = field(default=0.0, metadata={"help": (
        "τ of the density metric: an entry counts as active when |a| > τ (0 = exact non-zeros, the paper's "
        'metric).'
    )})
    capture: str = field(default="act", metadata={"help": (
        '`"act"`: output of the MLP activation module (as in the paper); `"down_in"`: input of the MLP '
        'down-projection (the true pattern of gated MLPs; works with fused MLPs).'
    )})
    layers: Any = field(default=None, metadata={"help": (
        'which MLP layers: `None` (all), an index, a list of indices, a range (`"2-5"` inclusive, `"2:5"` '
        "Python-style, or `range(2, 6)`), or a regular expression matched against the MLP block's module name "
        '(e.g. `"decoder"`).'
    )})
    modules: Any = field(default=None, metadata={"help": (
        'for architectures DEFT does not know: regular expression(s) naming the modules to hook directly.'
    )})
    coef_warmup_steps: int = field(default=0, metadata={"help": (
        'linearly ramp `coef` from 0 to its value over this many optimizer steps (0 = no ramp).'
    )})
    target_density: float | None = field(default=None, metadata={"help": (
        'instead of a fixed `coef`, steer the weight so the measured mean density (at `threshold`) moves to '
        'this fraction (the target-density controller, deft_common.controller); `coef` is then not used.'
    )})
    controller_gain: float = field(default=0.2, metadata={"help": (
        'how fast the target-density controller moves the weight: coef += gain × (density − target) + damping '
        '× (density − previous density) per optimizer step.'
    )})  # gain and damping: measured on the demo job (benchmarks/past, sweep 4)
    controller_damping: float = field(default=10.0, metadata={"help": (
        'how much the controller holds the weight back while the density is falling (0 = plain dual ascent).'
    )})
    adaptive: bool = field(default=False, metadata={"help": (
        'ADA-DEFT: learnable per-layer weights on the density terms, trained with the PEFT parameters; after '
        'training they choose the MLP blocks to skip at inference.'
    )})
    adaptive_temperature: float = field(default=0.3, metadata={"help": (
        "τ of ADA-DEFT's KL term: the weights settle near softmax(−density / τ); smaller concentrates the "
        'pressure on fewer blocks.'
    )})
    adaptive_logit_scale: float = field(default=100.0, metadata={"help": (
        'k: logits = k × the stored parameter, so an optimizer step of size lr moves them by about k × lr.'
    )})
    skip_budget: int | float | None = field(default=None, metadata={"help": (
        'MLP blocks ADA-DEFT skips at inference: a number (`2`) or a fraction (`0.5`) of them, largest '
        'weights first.'
    )})
    skip_threshold: float | None = field(default=None, metadata={"help": (
        'instead of a budget: skip the blocks whose weight (mean 1) is at least this.'
    )})
    sparsity_setpoint: float | None = field(default=None, metadata={"help": (
        'threshold-aware training: in every training forward each MLP block keeps only its largest activations, '
        'setting this fraction of them to 0 (|a| at or below the batch quantile), as calibrated inference '
        'thresholds will (`None` = off; the demo uses `0.995`). The thresholds written at the end of training '
        'follow it unless `inference_sparsity` is set.'
    )})
    setpoint_ramp_steps: int = field(default=0, metadata={"help": (
        'optimizer steps over which the set-point rises from 0 to `sparsity_setpoint` (0 = from the first step; '
        'the demo uses 60% of the run).'
    )})
    setpoint_schedule: str = field(default="linear", metadata={"help": (
        '`"linear"`: the sparsity rises linearly over the ramp; `"geometric"`: the kept share falls geometrically, '
        'so more of the ramp is spent at high sparsity.'
    )})
    setpoint_gradient: str = field(default="mask", metadata={"help": (
        '`"mask"`: the zeroed activations pass no gradient (as CATS); `"ste"`: straight-through, the gradient of '
        'the dense activation (as Q-Sparse).'
    )})
    setpoint_dense_every: int = field(default=0, metadata={"help": (
        'every n-th optimizer step trains without the set-point (dense), so the model stays accurate both '
        'dense and thresholded (`2` = alternate masked and dense steps; `0` = every step masked; the demo uses `3`).'
    )})
    inference_sparsity: float | None = field(default=None, metadata={"help": (
        'when training ends, calibrate per MLP block the threshold τ that sets this fraction of the activations '
        'to 0 (|a| <= τ, e.g. `0.9`) and write `deft_thresholds.json` beside the saved model, for '
        '`apply_thresholds` at inference (`None`: at `sparsity_setpoint` when that is set, else off).'
    )})
    calibration_batches: int = field(default=32, metadata={"help": (
        'how many training batches (at most) the `inference_sparsity` thresholds are calibrated on.'
    )})

    def __post_init__(self) -> None:
        _check_number("coef", self.coef, minimum=0.0, fix="use 0 to only measure density, or a positive weight such as 1.0")
        _check_number("eps", self.eps, minimum=0.0, strict=True, fix="use a small positive value such as 1e-7 (the paper's)")
        check_choice("DeftConfig.surrogate", self.surrogate, SURROGATES)
        _check_number("threshold", self.threshold, minimum=0.0, fix="use 0 for exact non-zeros, or a small positive τ such as 1e-3")
        if self.capture not in CAPTURE_POINTS:
            raise DeftConfigError(
                f"DeftConfig.capture={self.capture!r} is unknown; use 'act' (activation output, paper-faithful) "
                "or 'down_in' (input of the down-projection, for gated or fused MLPs)"
            )
        check_whole("DeftConfig.coef_warmup_steps", self.coef_warmup_steps, minimum=0, fix="0 = no ramp")
        if self.target_density is not None:
            _check_number("target_density", self.target_density, minimum=0.0, strict=True,
                          fix="use a fraction in (0, 1), e.g. 0.5 for half of the MLP activations exactly zero")
            if self.target_density >= 1.0:
                raise DeftConfigError(
                    f"DeftConfig.target_density={self.target_density!r} must be below 1 (1 = every activation "
                    "non-zero, nothing to steer); use a fraction such as 0.5, or None for a fixed coef"
                )
        _check_number("controller_gain", self.controller_gain, minimum=0.0, strict=True,
                      fix="use a positive step size such as 0.2")
        _check_number("controller_damping", self.controller_damping, minimum=0.0,
                      fix="use 0 (no damping) or a positive weight such as 10")
        self._check_adaptive()
        self._check_setpoint()
        self._check_inference_thresholds()
        self.layers = _normalise_layers(self.layers)
        self.modules = _normalise_patterns("modules", self.modules)

    def _check_adaptive(self) -> None:
        if not isinstance(self.adaptive, bool):
            raise DeftConfigError(f"DeftConfig.adaptive={self.adaptive!r} must be true or false")
        _check_number("adaptive_temperature", self.adaptive_temperature, minimum=0.0, strict=True,
                      fix="use a positive temperature such as 0.3 (smaller concentrates the pressure on fewer blocks)")
        _check_number("adaptive_logit_scale", self.adaptive_logit_scale, minimum=0.0, strict=True,
                      fix="use a positive factor such as 100 (logit step per optimizer step = factor x learning rate)")
        for name in ("skip_budget", "skip_threshold"):
            if getattr(self, name) is not None and not self.adaptive:
                raise DeftConfigError(f"DeftConfig.{name} selects MLP blocks from ADA-DEFT's weights; set adaptive=True too")
        if self.skip_budget is not None and self.skip_threshold is not None:
            raise DeftConfigError("DeftConfig: give either skip_budget or skip_threshold, not both")
        try:
            if self.skip_budget is not None:
                check_skip_budget(self.skip_budget)
            if self.skip_threshold is not None:
                check_skip_threshold(self.skip_threshold)
        except DeftConfigError as err:
            raise DeftConfigError(f"DeftConfig: {err}") from None

    def _check_setpoint(self) -> None:
        if self.sparsity_setpoint is not None:
            check_fraction("DeftConfig.sparsity_setpoint", self.sparsity_setpoint,
                           fix="use a fraction in [0, 1) such as 0.99 (the share of MLP activations zeroed in "
                               "training), or None for no set-point")
        check_whole("DeftConfig.setpoint_ramp_steps", self.setpoint_ramp_steps, minimum=0,
                    fix="0 = the set-point from the first step; use e.g. 60% of the run's optimizer steps")
        check_choice("DeftConfig.setpoint_schedule", self.setpoint_schedule, SETPOINT_SCHEDULES)
        check_choice("DeftConfig.setpoint_gradient", self.setpoint_gradient, SETPOINT_GRADIENTS)
        check_dense_every("DeftConfig.setpoint_dense_every", self.setpoint_dense_every)
        if self.surrogate == "setpoint" and self.sparsity_setpoint is None:
            raise DeftConfigError("DeftConfig.surrogate='setpoint' bends at the set-point's thresholds; set "
                                  "sparsity_setpoint too (e.g. 0.7), or use surrogate='paper' or 'l1'")
        for name in ("setpoint_ramp_steps", "setpoint_dense_every"):
            if self.sparsity_setpoint is None and getattr(self, name):
                raise DeftConfigError(f"DeftConfig.{name} acts on the sparsity set-point; set "
                                      "sparsity_setpoint too (e.g. 0.99)")

    @property
    def measures_only(self) -> bool:
        """coef 0 without a target density: the density is measured, no density term is added to the loss."""
        return self.coef == 0 and self.target_density is None

    @property
    def thresholds_sparsity(self) -> float | None:
        """The sparsity of the inference thresholds written when training ends: inference_sparsity, else the
        training set-point (so the model saved is the one trained), else None (none written)."""
        return self.inference_sparsity if self.inference_sparsity is not None else self.sparsity_setpoint

    def _check_inference_thresholds(self) -> None:
        if self.inference_sparsity is not None:
            check_fraction("DeftConfig.inference_sparsity", self.inference_sparsity,
                           fix="use a fraction in [0, 1) such as 0.9 (the share of MLP activations set to 0), or "
                               "None for no thresholds")
        check_whole("DeftConfig.calibration_batches", self.calibration_batches, minimum=1,
                    fix="training batches to calibrate the inference thresholds on, e.g. 32")

    @classmethod
    def help(cls, name: str) -> str:
        """What the field `name` means (its `help` metadata): the one description of each setting."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise DeftConfigError(f"DeftConfig has no field {name!r}; its fields are {list(fields)}")
        return fields[name].metadata["help"]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict | None) -> "DeftConfig":
        """Build from a plain mapping (YAML block, JSON); unknown keys are an error, never ignored."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise DeftConfigError(f"unknown DEFT setting(s) {unknown}; the known settings are {cls.field_names()}")
        return cls(**values)

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.field_names()}
        if isinstance(out["layers"], range):
            out["layers"] = list(out["layers"])
        return out

    def coef_at(self, step: int) -> float:
        """The density weight at optimizer step `step` (after the linear warm-up, if any)."""
        if self.coef_warmup_steps <= 0:
            return float(self.coef)
        return float(self.coef) * min(1.0, (step + 1) / self.coef_warmup_steps)


def _check_number(name: str, value: Any, minimum: float, fix: str, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DeftConfigError(f"DeftConfig.{name}={value!r} must be a number; {fix}")
    if value != value or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise DeftConfigError(f"DeftConfig.{name}={value!r} must be {relation} {minimum:g}; {fix}")


def check_fraction(label: str, value: Any, fix: str) -> None:
    """A number in [0, 1), the rule of every sparsity setting; `label` names it in the message."""
    is_number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not (is_number and 0.0 <= value < 1.0):  # NaN fails the comparison too
        above = " (it must be below 1: 1 would zero every activation)" if is_number and value >= 1.0 else ""
        raise DeftConfigError(f"{label}={value!r} must be a number in [0, 1){above}; {fix}")


def check_whole(label: str, value: Any, minimum: int, fix: str) -> None:
    """A whole number >= minimum (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DeftConfigError(f"{label}={value!r} must be a whole number >= {minimum} ({fix})")


def check_dense_every(label: str, value: Any) -> None:
    """0 (every step masked) or n >= 2 (every n-th step dense); 1 would train no step under the set-point."""
    check_whole(label, value, minimum=0, fix="0 = every step under the set-point; 2 = alternate masked and dense steps")
    if value == 1:
        raise DeftConfigError(f"{label}=1 would train every step dense, i.e. never under the set-point; use 2 "
                              "(alternate masked and dense steps) or more, or 0 for every step masked")


def check_choice(label: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DeftConfigError(f"{label}={value!r} is unknown; use one of {', '.join(map(repr, choices))}")


def check_skip_budget(budget) -> None:
    """The rule of DeftConfig.skip_budget, also applied when blocks are chosen (block_skip.py)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget != budget:
        raise DeftConfigError(f"skip budget {budget!r} must be a number of MLP blocks (int >= 1) or a fraction in (0, 1)")
    if isinstance(budget, int) and budget < 1:
        raise DeftConfigError(f"skip budget {budget!r} must be at least 1 block (or a fraction in (0, 1))")
    if isinstance(budget, float) and not 0.0 < budget < 1.0:
        raise DeftConfigError(
            f"skip budget {budget!r} must be a fraction in (0, 1) of the MLP blocks, or a whole number of blocks (e.g. 2)"
        )


def check_skip_threshold(threshold) -> None:
    """The rule of DeftConfig.skip_threshold, also applied when blocks are chosen (block_skip.py)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise DeftConfigError(
            f"skip threshold {threshold!r} must be a positive weight; the weights have mean 1 over the blocks, "
            "so e.g. 1.5 skips blocks that got 1.5x the average density pressure"
        )


def _normalise_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise DeftConfigError(f"DeftConfig.{name}={value!r} must be a regular expression or a non-empty list of them")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise DeftConfigError(f"DeftConfig.{name}: {p!r} is not a valid regular expression ({err})") from None
    return list(patterns)


def _normalise_layers(value: Any) -> Any:
    """Return None, a sorted list of indices, or a list of regular expressions."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise DeftConfigError(f"DeftConfig.layers={value!r} is not a layer selection; use None for all layers")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, range):
        value = list(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise DeftConfigError(
            f"DeftConfig.layers={value!r} must be None, an index, a list of indices, a range such as '2-5', "
            "or a module-name regular expression"
        )
    indices: list[int] = []
    patterns: list[str] = []
    for item in value:
        if isinstance(item, bool):
            raise DeftConfigError(f"DeftConfig.layers: {item!r} is not a layer index")
        if isinstance(item, int):
            if item < 0:
                raise DeftConfigError(f"DeftConfig.layers: index {item} is negative; layer indices start at 0")
            indices.append(item)
        elif isinstance(item, range):
            indices.extend(item)
        elif isinstance(item, str) and _RANGE.match(item):
            start, sep, stop = _RANGE.match(item).groups()
            start, stop = int(start), int(stop) + (1 if sep == "-" else 0)
            if stop <= start:
                raise DeftConfigError(f"DeftConfig.layers: range {item!r} is empty")
            indices.extend(range(start, stop))
        elif isinstance(item, str):
            patterns.extend(_normalise_patterns("layers", item))
        else:
            raise DeftConfigError(f"DeftConfig.layers: {item!r} is neither a layer index, a range nor a pattern")
    if indices and patterns:
        raise DeftConfigError("DeftConfig.layers: give either layer indices/ranges or module-name patterns, not both")
    return sorted(set(indices)) if indices else patterns
