"""The rows of benchmarks/run.py as the README's markdown tables (mean and spread over seeds), and plots.

    python benchmarks/table.py [FILE.jsonl ...] [--at 0.99,0.995] [--plot VARIANT --plot-out FILE.png]
    python benchmarks/table.py benchmarks/results/lm.jsonl [--at 0.7]      # rows of the LM job (`"job": "lm"`)

Reads every row of the files (default: benchmarks/results/*.jsonl) and groups them by variant: the row's name, or
else the settings in which its spec differs from the demo's defaults ("the demo default" when none; the seed,
model path and device do not count; changes all rows share are said once, above the tables). A row without a PEFT run is compared with the PEFT run of another row with
the same seed and job (settings). Prints per variant the mean ± sample standard deviation over its seeds of DEFT's
dense accuracy change from PEFT's, its gain over PEFT + thresholds at each --at sparsity, and the usable
sparsities per seed; then one line per variant and seed with the accuracies. --plot VARIANT draws that variant's
mean frontier over its seeds (error bars: the seeds' range) on the grid points every seed scored.

Rows of the LM job get their own tables (`lm_tables`): per variant, the mean ± sd over seeds of DEFT's dense
perplexity change from PEFT's (%), the perplexities at each --at sparsity (both runs at "act", PEFT at "down_in"),
the usable sparsities per capture point and seed; then one line per variant and seed; failed runs are listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics

from deft_cli.demo import DemoSettings, LmSettings, demo_deft_config, lm_deft_config
from deft_cli.frontier import plot_frontier, usable_sparsity, usable_sparsity_perplexity

HERE = pathlib.Path(__file__).resolve().parent
IGNORED = ("seed", "model", "device")  # neither name a variant nor a job


def load(paths) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    unknown = {row.get("schema") for row in rows} - {1}
    if unknown:
        raise SystemExit(f"rows of schema {sorted(unknown, key=str)}: this table reads schema 1")
    return rows


def changes(row: dict) -> dict[str, object]:
    """What the row's spec changes from the demo's defaults ({"steps": 4, "deft.coef": 1.0, ...})."""
    spec = row["spec"]
    settings, deft_config = (LmSettings, lm_deft_config) if is_lm(row) else (DemoSettings, demo_deft_config)
    defaults = dataclasses.asdict(settings())
    deft = deft_config(spec["settings"]["steps"]).to_dict()
    changed = {k: v for k, v in spec["settings"].items() if k not in IGNORED and v != defaults.get(k)}
    return changed | {f"deft.{k}": v for k, v in spec["deft_config"].items() if v != deft.get(k)}


def shared_changes(rows: list[dict]) -> dict[str, object]:
    """The changes every row makes alike (the job of a sweep): said once, above the tables."""
    each = [changes(row) for row in rows]
    return {k: v for k, v in each[0].items() if all(c.get(k, object()) == v for c in each)} if each else {}


def variant(row: dict, shared: dict | None = None) -> str:
    """The row's name, else what its spec changes from the demo's defaults beyond the `shared` changes."""
    if row.get("name"):
        return row["name"]
    changed = [f"{k}={v}" for k, v in changes(row).items() if k not in (shared or {})]
    return ", ".join(changed) or "the demo default"


def is_lm(row: dict) -> bool:
    return row.get("job") == "lm"


def job(row: dict) -> str:
    """What a PEFT run depends on: the settings but the DEFT ones (model path and device left out)."""
    return json.dumps({k: v for k, v in row["spec"]["settings"].items() if k not in ("model", "device")},
                      sort_keys=True)


def ran(row: dict, run: str) -> bool:
    """Whether the row has figures of `run` (not a failure)."""
    return run in row["figures"] and "failure" not in row["figures"][run]


def comparisons(rows: list[dict], unmatched: list[str] | None = None) -> list[dict]:
    """One entry per row with a DEFT run: its variant, seed and both frontiers (PEFT's from a row of the same job
    when the row has none)."""
    shared = shared_changes(rows)
    peft = {job(r): r["figures"]["peft"] for r in rows if ran(r, "peft")}
    out = []
    for row in rows:
        if not ran(row, "deft"):
            continue
        base = row["figures"].get("peft") or peft.get(job(row))
        if base is None and unmatched is not None:
            unmatched.append(f"{variant(row)}, seed {row['spec']['seed']}")
            continue
        if base is None:
            raise SystemExit(f"a row of {variant(row)!r}, seed {row['spec']['seed']}, has no PEFT run to compare "
                             "with (none of the rows has the same job and seed)")
        out.append({"variant": variant(row, shared), "seed": row["spec"]["seed"], "peft": base,
                    "deft": row["figures"]["deft"]})
    return out


def accuracy_at(figures: dict, sparsity: float) -> float | None:
    return next((p["accuracy"] for p in figures["frontier"] if p["sparsity"] == sparsity), None)


def spread(values: list[float], form: str = "{:+.1f}") -> str:
    """Mean ± sample standard deviation, the mean in `form` (one value: the value alone; none: n/a)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return form.format(values[0])
    return f"{form.format(statistics.mean(values))} ± {statistics.stdev(values):.1f}"


def usable_cell(sparsity) -> str:
    if sparsity is None:  # not even the dense point is within 1 point of PEFT's dense accuracy
        return "none"
    return "dense only" if sparsity == 0.0 else f"{sparsity:g}"


def points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100 * (a - b)


def grouped(entries: list[dict]) -> dict[str, list[dict]]:
    groups = {}
    for entry in entries:
        groups.setdefault(entry["variant"], []).append(entry)
    return {name: sorted(group, key=lambda e: e["seed"]) for name, group in groups.items()}


def summary_table(entries: list[dict], at=(0.99, 0.995)) -> str:
    """Per variant: mean ± sd over its seeds (points) and the usable sparsities per seed."""
    header = ["variant", "seeds", "DEFT dense − PEFT dense (pt)"]
    header += [f"DEFT − (PEFT + thresholds) @{s:g} (pt)" for s in at]
    header += ["usable PEFT", "usable DEFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in grouped(entries).items():
        cells = [name, ",".join(str(e["seed"]) for e in group),
                 spread([points(e["deft"]["accuracy"], e["peft"]["accuracy"]) for e in group])]
        cells += [spread([points(accuracy_at(e["deft"], s), accuracy_at(e["peft"], s)) for e in group]) for s in at]
        for run in ("peft", "deft"):
            cells.append(" / ".join(usable_cell(usable_sparsity(e[run]["frontier"], e["peft"]["accuracy"]))
                                    for e in group))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(entries: list[dict], at=(0.99, 0.995)) -> str:
    """One line per variant and seed: the accuracies (dense and at each --at sparsity) and usable sparsities."""
    header = ["variant", "seed", "PEFT dense", "DEFT dense"]
    header += [f"{run} @{s:g}" for s in at for run in ("PEFT", "DEFT")] + ["usable PEFT", "usable DEFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in grouped(entries).items():
        for e in group:
            values = [e["peft"]["accuracy"], e["deft"]["accuracy"]]
            values += [accuracy_at(e[run], s) for s in at for run in ("peft", "deft")]
            usable = [usable_sparsity(e[run]["frontier"], e["peft"]["accuracy"]) for run in ("peft", "deft")]
            lines.append(f"| {name} | {e['seed']} | "
                         + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " | "
                         + " | ".join(usable_cell(u) for u in usable) + " |")
    return "\n".join(lines)


def mean_frontier(entries: list[dict], run: str) -> tuple[list[dict], list[tuple[float, float]]]:
    """The mean frontier of `run` over the entries, on the sparsities all of them scored, and each point's
    (lowest, highest) accuracy."""
    common = sorted(set.intersection(*({p["sparsity"] for p in e[run]["frontier"]} for e in entries)))
    mean, ranges = [], []
    for sparsity in common:
        seeds = [next(p for p in e[run]["frontier"] if p["sparsity"] == sparsity) for e in entries]
        accuracy = [p["accuracy"] for p in seeds]
        mean.append({"sparsity": sparsity, "density": statistics.mean(p["density"] for p in seeds),
                     "accuracy": statistics.mean(accuracy)})
        ranges.append((min(accuracy), max(accuracy)))
    return mean, ranges


def plot_variant(entries: list[dict], name: str, path) -> None:
    group = grouped(entries).get(name)
    if not group:
        raise SystemExit(f"no variant {name!r}; the variants: {list(grouped(entries))}")
    frontier, ranges = {}, {}
    for run in ("peft", "deft"):
        frontier[run], ranges[run] = mean_frontier(group, run)
    reference = statistics.mean(e["peft"]["accuracy"] for e in group)
    plot_frontier(frontier, reference, path, ranges=ranges,
                  title=f"{name}, seeds {', '.join(str(e['seed']) for e in group)}: mean accuracy–sparsity frontier")


def lm_tables(rows: list[dict], at=(0.7,)) -> str:
    """The LM job's tables (module docstring): perplexities, and the failed runs."""
    entries = comparisons(rows)

    def ppl(figures: dict, sparsity: float, capture: str) -> float | None:
        return next((p["perplexity"] for p in figures["frontier"]
                     if p["sparsity"] == sparsity and p["capture"] == capture), None)

    def change(e) -> float:
        return 100 * (e["deft"]["perplexity"] / e["peft"]["perplexity"] - 1)

    def usable(e, run, capture) -> str:  # against the compared PEFT run (a DEFT-only row has none of its own)
        sparsity = usable_sparsity_perplexity(e[run]["frontier"], e["peft"]["perplexity"], capture)
        return "none" if sparsity is None else f"{sparsity:g}"

    header = ["variant", "seeds", "DEFT dense vs PEFT (%)"]
    header += [f"{name} @{s:g}" for s in at for name in ("PEFT act", "DEFT act", "PEFT down_in")]
    header += [f"usable {run} {c}" for run in ("PEFT", "DEFT") for c in ("act", "down_in")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in grouped(entries).items():
        cells = [name, ",".join(str(e["seed"]) for e in group), spread([change(e) for e in group])]
        for s in at:
            cells += [spread([ppl(e[run], s, c) for e in group], "{:.1f}")
                      for run, c in (("peft", "act"), ("deft", "act"), ("peft", "down_in"))]
        cells += [" / ".join(usable(e, run, c) for e in group) for run in ("peft", "deft") for c in ("act", "down_in")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| variant | seed | PEFT dense | DEFT dense | base |", "|---|---|---|---|---|"]
    for name, group in grouped(entries).items():
        for e in group:
            lines.append(f"| {name} | {e['seed']} | {e['peft']['perplexity']:.2f} | {e['deft']['perplexity']:.2f} | "
                         f"{e['peft']['base']['perplexity']:.2f} |")
    failed = [f"- {variant(r)}, seed {r['spec']['seed']}: {run}: {f['failure']}"
              for r in rows for run, f in r["figures"].items() if "failure" in f]
    return "\n".join(lines + (["", "failed runs:", *failed] if failed else []))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="JSONL files of benchmarks/run.py (default: benchmarks/results/*.jsonl)")
    parser.add_argument("--at", default="0.99,0.995", help="sparsities compared (default %(default)s)")
    parser.add_argument("--plot", metavar="VARIANT", help="draw this variant's mean frontier over its seeds")
    parser.add_argument("--plot-out", metavar="FILE.png", default="frontier.png", help="default %(default)s")
    args = parser.parse_args(argv)
    rows = load(args.files or sorted((HERE / "results").glob("*.jsonl")))
    lm_rows, rows = [r for r in rows if is_lm(r)], [r for r in rows if not is_lm(r)]
    at = tuple(float(s) for s in args.at.split(","))
    unmatched = []
    parts, entries = [], comparisons(rows, unmatched)
    if unmatched:
        parts.append("not compared (no row of the same job and seed has a PEFT run): " + "; ".join(unmatched))
    if rows:
        shared = ", ".join(f"{k}={v}" for k, v in shared_changes(rows).items())
        parts += [(f"every row: {shared}\n\n" if shared else "") + summary_table(entries, at), seed_table(entries, at)]
    if lm_rows:
        parts.append("LM job\n\n" + lm_tables(lm_rows, at if args.at != parser.get_default("at") else (0.7,)))
    text = "\n\n".join(parts)
    print(text)
    if args.plot:
        plot_variant(entries, args.plot, args.plot_out)
        print(f"\nwrote {args.plot_out}")
    return text


if __name__ == "__main__":
    main()
