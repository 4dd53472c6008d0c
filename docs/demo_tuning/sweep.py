"""The hyper-parameter sweeps behind the demo's defaults (docs/demo_tuning/README.md); not part of the package.

Runs the demo's training loop (model, data split, LoRA, batch order of `deft demo`) for each setting of a grid and
writes one JSON line per run: held-out accuracy, exact-zero and thresholded density, per-layer density, the last
training densities and the controller's final weight. Set up once, then start N workers (they share the grid):

    python docs/demo_tuning/sweep.py prepare DIR        # DIR/minilm (fp16 copy of the weights), DIR/imdb_split.json
    SWEEP_DIR=DIR GRID=3 python docs/demo_tuning/sweep.py WORKER NWORKERS OUT.jsonl
    SWEEP_DIR=DIR python docs/demo_tuning/sweep.py 0 1 OUT.jsonl '{"mode": "global", "target": 0.88, "gain": 0.2,
        "damping": 10, "ctl_thr": 0.0, "bias_lr": 0.05, "lr": 5e-4}'     # one setting (sweep 4)

Sweep 4 ran on CPU with DIR/minilm a link to the package's own fp32 weights instead of the fp16 copy.
"""
import itertools, json, math, sys, time, os
import torch, transformers
from deft_common import DeftConfig, DensityController, DensityLossEngine
from deft_cli.demo import DemoSettings, build_classifier, _batches
from deft_cli.density import measure_density, mean

HERE = os.environ.get("SWEEP_DIR", os.path.dirname(os.path.abspath(__file__)))


def prepare(folder):
    """The demo's IMDB split, and a half-precision copy of all-MiniLM-L6-v2 (small enough to ship to a GPU box)."""
    import pathlib, shutil
    from safetensors.torch import load_file, save_file
    from deft_cli.data import default_model_dir, load_imdb, split
    src, dst = default_model_dir(), pathlib.Path(folder, "minilm")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    weights = load_file(src / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    train, held = split(load_imdb(progress=False), 2400, 1000, 0)
    cut = lambda rs: [{"text": r["text"][:1500], "label": r["label"]} for r in rs]  # 64 tokens never need more
    json.dump({"train": cut(train), "held_out": cut(held)}, open(os.path.join(folder, "imdb_split.json"), "w"))


def grid3():
    out = [dict(mode="none", lr=5e-4, bias_lr=b) for b in (0.0, 0.01)]
    ctls = [dict(gain=0.05), dict(gain=0.2), dict(gain=0.05, kp=2.0), dict(gain=0.05, down=10.0)]
    for (thr, t), c, blr in itertools.product([(0.0, 0.9), (0.0, 0.8), (0.0, 0.7), (1e-3, 0.7), (1e-3, 0.5), (1e-3, 0.3)], ctls, [0.0, 0.01]):
        out.append(dict(mode="global", target=t, ctl_thr=thr, eps=1e-7, bias_lr=blr, lr=5e-4, **c))
    return out


def grid2():
    out = [dict(mode="none", lr=5e-4, bias_lr=b) for b in (0.0, 0.05)]
    out.append(dict(mode="none", lr=5e-4, bias_lr=0.05, targets=["query", "value"]))
    for eps, c, blr in itertools.product([1e-10, 1e-12, 1e-14], [0.5, 1.0, 2.0, 5.0], [0.0, 0.05]):
        out.append(dict(mode="const", coef=c, eps=eps, bias_lr=blr, lr=5e-4))
    for c, blr in itertools.product([0.5, 1.0, 2.0], [0.0, 0.05]):
        out.append(dict(mode="const", coef=c, eps=1e-5, eps_end=1e-13, bias_lr=blr, lr=5e-4))
    for c, blr in itertools.product([1.0, 2.0, 5.0], [0.0, 0.05]):
        out.append(dict(mode="const", coef=c, eps=1e-7, eps_end=1e-13, bias_lr=blr, lr=5e-4))
    for mode, g, blr in itertools.product(["global", "layer"], [0.02, 0.05], [0.0, 0.05]):
        out.append(dict(mode=mode, target=0.55, gain=g, eps=1e-12, bias_lr=blr, lr=5e-4))
    for blr in (0.0, 0.05):
        out.append(dict(mode="log", target=0.55, gain=0.3, eps=1e-12, bias_lr=blr, lr=5e-4))
    for eps, c in itertools.product([1e-7, 1e-12], [1.0, 2.0, 5.0]):
        out.append(dict(mode="const", coef=c, eps=eps, bias_lr=0.05, lr=5e-4, targets=["query", "value"]))
    return out


def grid():
    out = []
    for lr, blr in itertools.product([5e-4, 1e-3], [0.0, 0.01, 0.05]):
        out.append(dict(mode="none", lr=lr, bias_lr=blr))
    for mode, t, g, eps, blr in itertools.product(["global", "layer"], [0.5, 0.55], [0.05, 0.2], [1e-7, 1e-6], [0.0, 0.05]):
        out.append(dict(mode=mode, target=t, gain=g, eps=eps, bias_lr=blr, lr=5e-4))
    for t, g, eps, blr in itertools.product([0.5, 0.55], [0.3, 1.0], [1e-7, 1e-6], [0.0, 0.05]):
        out.append(dict(mode="log", target=t, gain=g, eps=eps, bias_lr=blr, lr=5e-4))
    for c, eps, blr in itertools.product([0.5, 1.0, 2.0], [1e-5, 1e-3], [0.0, 0.05]):
        out.append(dict(mode="const", coef=c, eps=eps, bias_lr=blr, lr=5e-4))
    for eps, blr in itertools.product([1e-7, 1e-6], [0.0, 0.05]):
        out.append(dict(mode="layer", target=0.55, gain=0.2, eps=eps, bias_lr=blr, lr=1e-3))
    return out


def run(spec, steps=int(os.environ.get("STEPS", 300)), seed=0):
    s = DemoSettings(model=os.path.join(HERE, "minilm"), steps=steps, learning_rate=spec["lr"], mlp_bias_lr=spec["bias_lr"], seed=seed,
                     lora_targets=spec.get("targets", ["query", "value", "dense"]))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    transformers.set_seed(seed)
    tok, model = build_classifier(s, 2)
    model.float().to(dev)
    data = json.load(open(os.path.join(HERE, "imdb_split.json")))
    train, held = data["train"], data["held_out"]
    enc = lambda rs: tok([r["text"] for r in rs], truncation=True, max_length=s.max_length)["input_ids"]
    ids, labels = enc(train), [r["label"] for r in train]
    g = torch.Generator().manual_seed(seed)
    epochs = -(-steps * s.batch_size // len(train))
    order = [i for _ in range(epochs) for i in torch.randperm(len(train), generator=g).tolist()]
    mode = spec["mode"]
    if mode == "layer":
        raise ValueError("mode 'layer' (one weight per MLP block, sweeps 1-2) ran with the sweep.py of commit 706ec60")
    cthr = spec.get("ctl_thr", 0.0)
    target = spec.get("target") if mode in ("global", "log") else None
    cfg = DeftConfig(coef=spec.get("coef", 1.0), eps=spec.get("eps", 1e-7), threshold=cthr, target_density=target,
                     controller_gain=spec.get("gain", 0.2), controller_damping=spec.get("damping", 0.0))
    engine = DensityLossEngine(model.body, cfg, dev) if mode != "none" else None
    if engine is not None and target is not None:
        engine.weight.controller = SweepController(cfg, spec) if mode == "global" else LogController(cfg)
    opt = torch.optim.AdamW(model.parameter_groups(), lr=s.learning_rate, weight_decay=0.0)
    sch = transformers.get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    hist = []
    trace = []  # (step, density, weight, task loss) every 10 steps
    tasks = []
    model.train()
    batches = _batches(tok, ids, labels, order, s.batch_size, dev)
    for step in range(steps):
        b = next(batches)
        if engine is not None and spec.get("eps_end"):
            engine.config.eps = spec["eps"] * (spec["eps_end"] / spec["eps"]) ** (step / (steps - 1))
        if engine is None:
            loss = model(**b).loss
        else:
            with engine.recording(b):
                task = model(**b).loss
            loss = task + engine.term(step)
            tasks.append(task.item())
        loss.backward(); opt.step(); sch.step(); opt.zero_grad(set_to_none=True)
        if engine is not None:
            engine.end_step()
            d = engine.tracker.mean_density(cthr)
            hist.append(d)
            if step % 10 == 9:
                trace.append((step, round(d, 4), round(engine.weight.controller.coef if target else cfg.coef, 3), round(tasks[-1], 3)))
    if engine: engine.remove()
    correct = 0
    nonfinite = 0
    def score(batch, o):
        nonlocal correct, nonfinite
        nonfinite += int((~torch.isfinite(o.logits)).any())
        correct += int((o.logits.argmax(-1) == batch["labels"]).sum())
    eb = _batches(tok, enc(held), [r["label"] for r in held], range(len(held)), 32, dev)
    layers = measure_density(model, eb, 1e-3, on_outputs=score, body=model.body)
    return dict(spec, acc=correct / len(held), density=mean(layers), density_thr=mean(layers, "thresholded"),
                layers=[round(l.exact, 4) for l in layers], train_tail=(sum(hist[-20:]) / 20 if hist else None), held_ctl=(mean(layers, "thresholded") if cthr else mean(layers)), task_tail=(sum(tasks[-20:]) / 20 if tasks else None), nonfinite=nonfinite, trace=trace,
                coef_end=coef_end(engine, mode))


def coef_end(engine, mode):
    """The controller's final weight, as the sweeps recorded it (a list of one per block for `global`)."""
    if mode == "global":
        return [round(engine.weight.controller.coef, 4)] * len(engine.tracker.sites)
    return engine.weight.controller.coef if mode == "log" else None


class SweepController(DensityController):
    """DensityController (dual ascent with damping) plus sweep 3-4's variants: `kp`, a proportional term on the error
    on top of the integral; `down`, a faster fall of the weight below the target."""

    def __init__(self, config, spec):
        super().__init__(config)
        self.kp, self.down, self.integral = spec.get("kp", 0.0), spec.get("down"), 0.0

    def update(self, density):
        error = density - self.target
        if self.down and error < 0:
            error *= self.down
        change = 0.0 if self.last_density is None else density - self.last_density
        self.integral = max(0.0, self.integral + self.gain * error + self.damping * change)
        self.coef = max(0.0, self.integral + self.kp * (density - self.target))
        self.steps, self.last_density = self.steps + 1, density
        return self.coef


class LogController(DensityController):
    """Sweep 1-2's multiplicative controller: the log of the weight moves by gain × error, within [1e-4, 100]."""

    def __init__(self, config):
        super().__init__(config)
        self.log_coef = math.log(0.01)
        self.coef = math.exp(self.log_coef)

    def update(self, density):
        self.log_coef = min(math.log(100.0), max(math.log(1e-4), self.log_coef + self.gain * (density - self.target)))
        self.coef = math.exp(self.log_coef)
        self.steps, self.last_density = self.steps + 1, density
        return self.coef


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        sys.exit(prepare(sys.argv[2]))
    w, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    specs = [json.loads(a) for a in sys.argv[4:]] if len(sys.argv) > 4 else {'2': grid2, '3': grid3}.get(os.environ.get('GRID'), grid)()
    with open(out, "a") as f:
        for i, spec in enumerate(specs):
            if i % n != w:
                continue
            t0 = time.time()
            try:
                r = run(spec)
            except Exception as e:  # a failed setting is recorded, the sweep goes on
                r = dict(spec, error=repr(e))
            r["seconds"] = round(time.time() - t0, 1)
            f.write(json.dumps(r) + "\n"); f.flush()
            print(json.dumps(r), flush=True)
