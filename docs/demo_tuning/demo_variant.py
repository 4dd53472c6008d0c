"""Sweeps 6 to 8: a DEFT variant through the demo's own training and scoring, against the same seed's `deft demo`
PEFT run.

The DEFT run of `deft demo` (plugins/deft_cli/demo.py: train_and_evaluate, the same data split, batch order,
1,000 scored texts and 200 calibration texts) with other set-point settings; its frontier on a subset of the grid
(each point is one pass over the scored texts). The PEFT figures come from that seed's `deft demo` results.json,
so run the default demo first. From the repository root:

    PYTHONPATH=$PWD:$PWD/plugins python docs/demo_tuning/demo_variant.py --peft runs/seed1 --seed 1 \
        --sparsity-setpoint 0.99 [--ramp-share 0.6] [--schedule geometric] [--gradient ste] [--dense-every 2] \
        [--grid 0.99,0.995,0.998]

Appends one JSON line per run to sweep8_more_variants.jsonl beside this file (`--out`; sweep 6 wrote
sweep6_demo_variants.jsonl, with every step masked, and sweep 7 sweep7_dense_steps.jsonl).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

from deft_cli import demo
from deft_cli.data import default_model_dir
from deft_cli.frontier import usable_sparsity
from deft_common import DeftConfig

HERE = pathlib.Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--peft", required=True, help="folder of the same seed's `deft demo` run (its results.json)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--sparsity-setpoint", type=float, default=demo.DEMO_SETPOINT)
    p.add_argument("--ramp-share", type=float, default=demo.DEMO_RAMP_SHARE)
    p.add_argument("--schedule", default="linear", choices=["linear", "geometric"])
    p.add_argument("--gradient", default="mask", choices=["mask", "ste"])
    p.add_argument("--dense-every", type=int, default=demo.DEMO_DENSE_EVERY,
                   help="DeftConfig.setpoint_dense_every (sweep 6 ran with 0: every step masked)")
    p.add_argument("--grid", default="0.99,0.995,0.998", help="thresholded grid points scored (0 is always scored)")
    p.add_argument("--out", default=str(HERE / "sweep8_more_variants.jsonl"))
    args = p.parse_args()

    peft = json.loads((pathlib.Path(args.peft) / "results.json").read_text())
    if peft["settings"]["seed"] != args.seed:
        raise SystemExit(f"{args.peft} is seed {peft['settings']['seed']}, not {args.seed}")
    steps = demo.DemoSettings().steps
    config = DeftConfig(coef=0.0, sparsity_setpoint=args.sparsity_setpoint,
                        setpoint_ramp_steps=round(args.ramp_share * steps), setpoint_schedule=args.schedule,
                        setpoint_gradient=args.gradient, setpoint_dense_every=args.dense_every)
    settings = demo.DemoSettings(seed=args.seed, model=str(default_model_dir()), deft=config)
    grid = (0.0, *(float(s) for s in args.grid.split(",")))
    demo.accuracy_frontier = functools.partial(demo.accuracy_frontier, grid=grid)  # score only these points
    train, held_out, names = demo._load_records(settings)
    start = time.perf_counter()
    run = demo.train_and_evaluate(settings, True, train, held_out, len(names))
    peft_points = {p["sparsity"]: p for p in peft["frontier"]["peft"]}
    reference = peft["peft"]["accuracy"]
    line = {"seed": args.seed, "sparsity_setpoint": args.sparsity_setpoint, "ramp_share": args.ramp_share,
            "schedule": args.schedule, "gradient": args.gradient, "dense_every": args.dense_every,
            "deft_frontier": run["frontier"],
            "peft_frontier": [peft_points[s] for s in grid], "peft_dense_accuracy": reference,
            "usable_of_scored": {"deft": usable_sparsity(run["frontier"], reference),
                                 "peft": usable_sparsity([peft_points[s] for s in grid], reference)},
            "train_seconds": run["train_seconds"], "wall_seconds": round(time.perf_counter() - start, 1)}
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")
    for point, base in zip(run["frontier"], line["peft_frontier"]):
        print(f"sparsity {point['sparsity']:<6g} DEFT {point['accuracy']:.3f}  PEFT {base['accuracy']:.3f}")
    print("usable of the scored points:", line["usable_of_scored"])


if __name__ == "__main__":
    main()
