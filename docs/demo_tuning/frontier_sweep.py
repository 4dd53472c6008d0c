"""Sweep 5: which training method moves the accuracy-sparsity frontier of the demo job?

One run = the demo's training loop (all-MiniLM-L6-v2 + IMDB, LoRA r 8 on query/value/dense, MLP up-projection
biases trained, batch 16, max length 64, AdamW lr 5e-4, linear schedule with 6% warm-up, 300 steps), as plain PEFT
or with a sparsity set-point (deft_common.setpoint.SparsitySetpoint) in the training forward. Then the frontier:
per MLP block, τ = the q-quantile of |a| over the real tokens of 200 TRAINING texts; |a| <= τ set to 0; accuracy
and density (non-zero share over real tokens, mean over blocks) on 800 held-out texts (held-out 200..999, never
used for calibration) at each grid sparsity q. usable_sparsity = the largest grid q whose accuracy is at most
1 point below the same seed's dense PEFT accuracy (read from the JSONL, so run PEFT first).

    python frontier_sweep.py --method peft --seed 0
    python frontier_sweep.py --method setpoint --sparsity 0.99 --ramp 0.6 --seed 0 [--gradient ste] [--below-coef 1]

Appends one JSON line per run to sweep5_frontier.jsonl (beside this file unless --out).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

GRID = [0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998]
CALIBRATION_TEXTS = 200
SCORED = slice(200, 1000)  # held-out texts scored (800)
SAMPLE_PER_BATCH = 400_000  # |a| values kept per block and calibration batch (bounded memory; ~2.8M per block)
HERE = pathlib.Path(__file__).resolve().parent


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["peft", "setpoint"], required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sparsity", type=float, default=0.99, help="set-point")
    p.add_argument("--ramp", type=float, default=0.6, help="ramp length as a share of the steps")
    p.add_argument("--schedule", default="linear", choices=["linear", "geometric"])
    p.add_argument("--gradient", default="mask", choices=["mask", "ste"])
    p.add_argument("--threshold", default="batch", choices=["batch", "running"])
    p.add_argument("--below-coef", type=float, default=0.0, help="weight of the set-point-aware density loss")
    p.add_argument("--distill", type=float, default=0.0, help="weight of KL(dense logits || set-point logits)")
    p.add_argument("--grid", default=",".join(map(str, GRID)),
                   help="grid sparsities to score (a subset of the full grid saves ~1 minute each on 1 CPU thread)")
    p.add_argument("--save-state", default="", help="save the trained parameters here (to score more points later)")
    p.add_argument("--load-state", default="", help="skip training: load parameters saved with --save-state")
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "sweep5_frontier.jsonl"))
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from deft_common import DeftConfig, find_mlp_sites
    from deft_common.setpoint import SparsitySetpoint
    from deft_cli.data import default_model_dir
    from deft_cli.demo import DemoSettings, _batches, _load_records, build_classifier

    settings = DemoSettings(steps=args.steps, seed=args.seed, deft=DeftConfig(coef=0.0))
    settings.model = str(default_model_dir())
    train, held, names = _load_records(settings)
    transformers.set_seed(settings.seed)
    tokenizer, model = build_classifier(settings, len(names))
    encode = lambda records: tokenizer([r["text"] for r in records], truncation=True,
                                       max_length=settings.max_length)["input_ids"]
    train_ids, train_labels = encode(train), [r["label"] for r in train]
    generator = torch.Generator().manual_seed(settings.seed)
    epochs = -(-settings.steps * settings.batch_size // len(train))
    order = [i for _ in range(epochs) for i in torch.randperm(len(train), generator=generator).tolist()]

    setpoint = None
    if args.method == "setpoint":
        setpoint = SparsitySetpoint(model.body, args.sparsity, ramp_steps=round(args.ramp * args.steps),
                                    config=DeftConfig(coef=0.0), gradient=args.gradient, threshold=args.threshold,
                                    schedule=args.schedule, density_term=args.below_coef > 0)
        setpoint.check_ramp(args.steps)
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=settings.learning_rate, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(0.06 * settings.steps), settings.steps)
    model.train()
    trace = []
    start = time.perf_counter()
    batches = _batches(tokenizer, train_ids, train_labels, order, settings.batch_size, "cpu")
    for step in range(0 if args.load_state else settings.steps):
        batch = next(batches)
        teacher = None
        if setpoint is not None and args.distill > 0:
            with torch.no_grad(), setpoint.disabled():
                teacher = model(**batch).logits.float()
        out = model(**batch)
        loss = task = out.loss
        below = None
        if setpoint is not None:
            below = setpoint.density_loss()
            if args.below_coef > 0:
                loss = loss + args.below_coef * below
            if teacher is not None:
                kl = torch.nn.functional.kl_div(out.logits.float().log_softmax(-1), teacher.log_softmax(-1),
                                                log_target=True, reduction="batchmean")
                loss = loss + args.distill * kl
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if setpoint is not None:
            setpoint.step(step + 1)
        if step % 25 == 0 or step == settings.steps - 1:
            entry = {"step": step, "task_loss": round(task.item(), 4)}
            if setpoint is not None:
                dens = list(setpoint.last_density.values())
                entry |= {"setpoint": round(setpoint.at(step), 4), "below": round(below.item(), 4),
                          "train_density": round(sum(dens) / len(dens), 5) if dens else 1.0}
            trace.append(entry)
            print(entry, f"{time.perf_counter() - start:.0f}s", flush=True)
    train_seconds = time.perf_counter() - start
    if args.load_state:  # score more grid points of a run trained before (same method, settings and seed)
        saved = torch.load(args.load_state)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        train_seconds = None
    if setpoint is not None:
        setpoint.remove()
    if args.save_state:
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trained, args.save_state)
    model.eval()

    # ------------------------------------------------------------------ frontier
    eval_start = time.perf_counter()
    acts = [site.act for site in find_mlp_sites(model.body, DeftConfig(coef=0.0))]
    state = {"mask": None}

    def forward_all(records, hook_for):
        ids = encode(records)
        handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(acts)]
        correct = 0
        try:
            with torch.no_grad():
                for b in _batches(tokenizer, ids, [r["label"] for r in records], range(len(ids)), 32, "cpu"):
                    state["mask"] = b["attention_mask"].reshape(-1).bool()
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    correct += int((logits.argmax(-1) == b["labels"]).sum())
        finally:
            for h in handles:
                h.remove()
        return correct

    samples = {i: [] for i in range(len(acts))}
    sample_gen = torch.Generator().manual_seed(1234)

    def sample_hook(i):
        def hook(_m, _a, out):
            x = out.reshape(-1, out.shape[-1])[state["mask"]].abs().flatten().float()
            if x.numel() > SAMPLE_PER_BATCH:
                x = x[torch.randperm(x.numel(), generator=sample_gen)[:SAMPLE_PER_BATCH]]
            samples[i].append(x)
        return hook

    forward_all(train[:CALIBRATION_TEXTS], sample_hook)
    pooled = {i: torch.cat(v).sort().values for i, v in samples.items()}
    scored = held[SCORED]
    frontier = []
    grid = sorted({0.0, *(float(v) for v in args.grid.split(","))})
    for q in grid:
        taus = [float(pooled[i][min(len(pooled[i]) - 1, int(q * len(pooled[i])))]) if q > 0 else -1.0
                for i in range(len(acts))]
        counts = {}

        def threshold_hook(i, taus=taus, counts=counts):
            def hook(_m, _a, out):
                kept = torch.where(out.abs() > taus[i], out, torch.zeros_like(out))
                real = kept.reshape(-1, kept.shape[-1])[state["mask"]]
                c = counts.setdefault(i, [0, 0])
                c[0] += int((real != 0).sum())
                c[1] += real.numel()
                return kept
            return hook

        correct = forward_all(scored, threshold_hook)
        density = sum(a / n for a, n in counts.values()) / len(counts)
        frontier.append({"sparsity": q, "density": round(density, 6), "accuracy": correct / len(scored),
                         "correct": correct, "thresholds": [round(t, 6) for t in taus]})
        print(f"q {q}: accuracy {correct / len(scored):.4f} density {density:.4f}", flush=True)
    eval_seconds = time.perf_counter() - eval_start

    reference = _peft_dense(args.out, args.seed) if args.method != "peft" else frontier[0]["correct"]
    usable = None
    if reference is not None:
        ok = [p["sparsity"] for p in frontier if p["correct"] >= reference - 0.01 * len(scored) - 1e-9]
        usable = max(ok) if ok else None
    record = {
        "method": args.method if args.method == "peft" else _method_name(args),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "threads", "method", "seed", "save_state", "load_state")},
        "seed": args.seed,
        "dense_accuracy": frontier[0]["accuracy"],
        "frontier": [{k: p[k] for k in ("sparsity", "density", "accuracy")} for p in frontier],
        "thresholds": {str(p["sparsity"]): p["thresholds"] for p in frontier},
        "usable_sparsity": usable,
        "rescored_from_saved_state": bool(args.load_state),
        "grid_partial": grid != GRID,  # then usable_sparsity is over the scored points only (a lower bound)
        "reference_peft_accuracy": None if reference is None else reference / len(scored),
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "trace": trace,
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("method", "seed", "dense_accuracy", "usable_sparsity", "train_seconds")}))


def _method_name(args) -> str:
    parts = [f"setpoint{args.sparsity:g}", f"ramp{args.ramp:g}"]
    if args.schedule != "linear":
        parts.append(args.schedule)
    if args.gradient != "mask":
        parts.append(args.gradient)
    if args.threshold != "batch":
        parts.append(f"{args.threshold}-tau")
    if args.below_coef:
        parts.append(f"below{args.below_coef:g}")
    if args.distill:
        parts.append(f"distill{args.distill:g}")
    if args.tag:
        parts.append(args.tag)
    return "+".join(parts)


def _peft_dense(path, seed) -> int | None:
    """Correct answers of the same seed's dense PEFT run (the latest in the file), None if there is none yet."""
    found = None
    if pathlib.Path(path).exists():
        for line in open(path):
            r = json.loads(line)
            if r["method"] == "peft" and r["seed"] == seed:
                found = round(r["dense_accuracy"] * (SCORED.stop - SCORED.start))
    return found


if __name__ == "__main__":
    main()
