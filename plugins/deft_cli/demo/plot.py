"""The demo's density.png: per-layer density of both runs, and DEFT's density during training."""

from __future__ import annotations

from ..data import DeftDataError
from ..density import relative_reduction, signed_percent
from .report import density_loss_on, masked_steps


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise DeftDataError("the demo draws density.png with matplotlib; install it with "
                            "`pip install 'deft-plugins[demo]'` (or `pip install matplotlib`)") from err


def plot_density(results: dict, path) -> None:
    """density.png: `density_figure`, saved."""
    import matplotlib.pyplot as plt

    fig = density_figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def density_figure(results: dict):
    """Left: per-layer exact-zero density of both runs side by side, each DEFT bar labelled with its change
    against PEFT (negative: sparser). Right: DEFT's density during training, with its set-point or target, and
    the density loss's weight (coef) on a second axis when the run had one."""
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
        left.text(i + width / 2, b["exact"] + 0.01, signed_percent(-relative_reduction(a["exact"], b["exact"]), 0),
                  ha="center", va="bottom", fontsize=8)
    left.set_xticks(x, [f"layer {i}" for i in x])
    left.set_ylim(0, 1.12)
    left.set_ylabel("exact-zero density (fraction of a ≠ 0)")
    loss_on = density_loss_on(results["deft_config"])
    left.set_title(f"MLP activation density per layer, {results['held_out_texts']} held-out texts (mean change "
                   f"{signed_percent(-results['relative_reduction']['density'])})"
                   + ("" if loss_on else "\nthe paper's metric; this DEFT run trained no density loss"), fontsize=10)
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
    handles = right.get_legend_handles_labels()[0]
    if any(h.get("coef", 0) > 0 for h in deft["history"]):  # no empty axis for a run without the density loss
        coef_axis = right.twinx()
        coef_axis.plot(steps, [h["coef"] for h in deft["history"]], color="#1b9e77", lw=1,
                       label="density weight (coef)")
        coef_axis.set_ylabel("density weight (coef)", color="#1b9e77")
        coef_axis.set_ylim(bottom=0)
        handles += coef_axis.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    right.set_title("DEFT during training" + ("" if loss_on else " (set-point, no density loss)"), fontsize=10)
    fig.tight_layout()
    return fig
