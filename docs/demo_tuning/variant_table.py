"""The set-point variants of sweeps 6 to 8 side by side with the demo default, per seed and as mean ± sd.

Reads demo_seeds.jsonl (full `deft demo` runs of the default before sweep 7: set-point 0.995, every step masked)
and the demo_variant.py lines of sweep6_demo_variants.jsonl, sweep7_dense_steps.jsonl and
sweep8_more_variants.jsonl, all beside this file; each variant is compared with the PEFT run of the same seed's
`deft demo`. From the repository root:

    PYTHONPATH=$PWD:$PWD/plugins python docs/demo_tuning/variant_table.py \
        [--plot "set-point 0.995, 1 step in 3 dense"]

Columns: dense accuracy change, accuracy change at sparsity 0.99 over PEFT + thresholds, accuracy at 0.995 against
the usable bar (PEFT's dense accuracy − 1 point), all in points; "usable" is DEFT's usable sparsity among the
scored points, per seed ("dense only": none of the thresholded ones). Then the same per seed, with the
accuracies. `--plot VARIANT` draws that variant's mean frontier over its seeds against PEFT's (demo_seeds.plot, on
the grid points every seed scored) into ../demo_frontier_<file stem>.png, e.g. demo_frontier_sweep7_dense_steps.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from demo_seeds import accuracy_of as at
from demo_seeds import plot, spread
from deft_cli.demo import DEMO_RAMP_SHARE
from deft_cli.frontier import usable_sparsity

HERE = pathlib.Path(__file__).resolve().parent
VARIANT_FILES = ("sweep6_demo_variants.jsonl", "sweep7_dense_steps.jsonl", "sweep8_more_variants.jsonl")


def rows() -> list[dict]:
    """One row per (variant, seed): the figures of the table."""
    out = []
    for line in map(json.loads, (HERE / "demo_seeds.jsonl").read_text().splitlines()):
        out.append(figures("set-point 0.995, every step masked (the default before sweep 7)", line["seed"],
                           line["frontier"]["deft"], line["frontier"]["peft"], line["accuracy"]["peft"]))
    for name in VARIANT_FILES:
        path = HERE / name
        if not path.exists():
            continue
        for line in map(json.loads, path.read_text().splitlines()):
            label = f"set-point {line['sparsity_setpoint']:g}"
            if line["ramp_share"] != DEMO_RAMP_SHARE:
                label += f", ramp {line['ramp_share']:.0%}"
            if line.get("schedule", "linear") != "linear":
                label += f", {line['schedule']} ramp"
            if line["gradient"] != "mask":
                label += f", gradient {line['gradient']}"
            if line.get("dense_every"):
                label += f", 1 step in {line['dense_every']} dense"
            out.append(figures(label, line["seed"], line["deft_frontier"], line["peft_frontier"],
                               line["peft_dense_accuracy"]) | {"file": name, "frontier": {
                                   "deft": line["deft_frontier"], "peft": line["peft_frontier"]}})
    return out


def figures(label: str, seed: int, deft: list[dict], peft: list[dict], peft_dense: float) -> dict:
    return {"variant": label, "seed": seed, "peft_dense": peft_dense, "deft_dense": at(deft, 0.0),
            "peft_0.99": at(peft, 0.99), "deft_0.99": at(deft, 0.99), "peft_0.995": at(peft, 0.995),
            "deft_0.995": at(deft, 0.995),
            "dense": 100 * (at(deft, 0.0) - peft_dense),
            "gain_0.99": 100 * (at(deft, 0.99) - at(peft, 0.99)),
            "margin_0.995": 100 * (at(deft, 0.995) - (peft_dense - 0.01)),
            "usable": usable_sparsity(deft, peft_dense)}


def usable_cell(sparsity: float | None) -> str:
    if sparsity is None:  # not even the dense point is within 1 point of PEFT's dense accuracy
        return "none"
    return "dense only" if sparsity == 0.0 else f"{sparsity:g}"


def plot_variant(table: list[dict], variant: str) -> pathlib.Path:
    runs = sorted((r for r in table if r["variant"] == variant and "file" in r), key=lambda r: r["seed"])
    if not runs:
        raise SystemExit(f"no variant {variant!r} in {', '.join(VARIANT_FILES)}; the variants: "
                         f"{sorted({r['variant'] for r in table if 'file' in r})}")
    common = set.intersection(*({p["sparsity"] for p in r["frontier"]["deft"]} for r in runs))
    lines = [{"seed": r["seed"], "frontier": {run: [p for p in points if p["sparsity"] in common]
                                             for run, points in r["frontier"].items()}} for r in runs]
    path = HERE.parent / f"demo_frontier_{pathlib.Path(runs[0]['file']).stem}.png"
    plot(lines, path, title=variant)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", metavar="VARIANT", help="draw this variant's mean frontier (a name of the table)")
    args = parser.parse_args()
    table = rows()
    print("| variant | seeds | dense (pt) | @0.99 vs PEFT (pt) | @0.995 vs usable bar (pt) | usable of the scored |")
    print("|---|---|---|---|---|---|")
    for variant in dict.fromkeys(r["variant"] for r in table):
        runs = sorted((r for r in table if r["variant"] == variant), key=lambda r: r["seed"])
        cells = [spread([r[k] for r in runs]) for k in ("dense", "gain_0.99", "margin_0.995")]
        per_seed = " / ".join(usable_cell(r["usable"]) for r in runs)
        print(f"| {variant} | {','.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + f" | {per_seed} |")
    print("\n| variant | seed | PEFT dense | DEFT dense | PEFT @0.99 | DEFT @0.99 | PEFT @0.995 | DEFT @0.995 | "
          "usable DEFT |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = list(dict.fromkeys(r["variant"] for r in table))
    for r in sorted(table, key=lambda r: (order.index(r["variant"]), r["seed"])):
        cells = [f"{r[k]:.3f}" for k in ("peft_dense", "deft_dense", "peft_0.99", "deft_0.99", "peft_0.995",
                                         "deft_0.995")]
        print(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + f" | {usable_cell(r['usable'])} |")
    if args.plot:
        print(f"\nwrote {plot_variant(table, args.plot)}")


if __name__ == "__main__":
    main()
