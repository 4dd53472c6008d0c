"""DEFT metrics for the Trainer's logs: density and density loss since the last log, summed over every process.

Each recorded forward pass adds its active / real entry counts per MLP layer (and, in training, its density term)
to a window, one for training and one for evaluation. The counts are summed across processes right away (every
process runs its forward passes in lockstep, so the collective is safe there; `log()` may not run everywhere).
`for_log(logs)` turns the matching window into log keys and empties it:

    deft/density              mean over layers of the fraction of active entries (|a| > threshold, real tokens only)
    deft/density/<layer>      the same per MLP block (its module name)
    deft/loss                 the density term added to the loss, coef × density loss, mean over micro-batches
    deft/coef                 the density weight of the last training step, when it changes over training
                              (coef_warmup_steps > 0, or target_density: then also the controller's
                              deft/target_density and deft/density_error), from deft_common.DensityWeight.log()
    deft/adaptive_weight/<layer>  with DeftConfig(adaptive=True): the ADA-DEFT weight of the MLP block (mean 1) as
                              the last training forward used it

Evaluation logs carry the same keys behind their prefix: `eval_deft/density`, `eval_deft/density/<layer>`.
"""

from __future__ import annotations

import re

import torch

from deft_common import DensityTracker, DensityWeight

_RUNTIME_KEY = re.compile(r"^(.+)_runtime$")


class _Window:
    def __init__(self):
        self.layers: list[str] = []
        self.counts: torch.Tensor | None = None  # float64 (layers, 2): active, real entries
        self.term_sum = 0.0
        self.term_count = 0.0
        self.adaptive = None  # the ADA-DEFT weights module of the tracker, when it has one

    def empty(self) -> bool:
        return self.counts is None


class DeftMetrics:
    """weight: the DensityWeight of the run, whose log() (deft/coef, ...) joins each training log."""

    def __init__(self, weight: DensityWeight | None = None):
        self.weight = weight
        self._windows = {"train": _Window(), "eval": _Window()}

    def add(self, mode: str, tracker: DensityTracker, term: torch.Tensor | None = None, device=None) -> None:
        """Add the last `tracker.record()` to the "train" or "eval" window. `term`: the density term of that forward
        (training only). A collective when torch.distributed is initialised: every process must call it."""
        layers = [site.name for site in tracker.sites]
        counts = tracker.layer_counts()
        values = [float(counts.get(name, (0, 0))[k]) for name in layers for k in (0, 1)]
        values += [0.0, 0.0] if term is None else [float(term.detach()), 1.0]
        totals = torch.tensor(values, dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        window = self._windows[mode]
        if window.empty() or window.layers != layers:
            window = self._windows[mode] = _Window()
            window.layers, window.counts = layers, torch.zeros(len(layers), 2, dtype=torch.float64)
        window.counts += totals[:-2].cpu().view(-1, 2)
        window.term_sum += float(totals[-2])
        window.term_count += float(totals[-1])
        window.adaptive = tracker.adaptive

    def clear(self, mode: str) -> None:
        self._windows[mode] = _Window()

    def pop(self, mode: str, prefix: str = "") -> dict[str, float]:
        """The window's metrics as log keys (`prefix` + "deft/..."), and an empty window."""
        window = self._windows[mode]
        self.clear(mode)
        if window.empty():
            return {}
        per_layer = {name: float(a / e) for name, (a, e) in zip(window.layers, window.counts.tolist()) if e}
        out = {}
        if per_layer:
            out[f"{prefix}deft/density"] = sum(per_layer.values()) / len(per_layer)
        if window.term_count:
            out[f"{prefix}deft/loss"] = window.term_sum / window.term_count
        if mode == "train" and self.weight is not None:
            out.update(self.weight.log())
        if mode == "train" and window.adaptive is not None:
            out.update(window.adaptive.log())
        out.update({f"{prefix}deft/density/{name}": value for name, value in per_layer.items()})
        return out

    def for_log(self, logs: dict) -> dict[str, float]:
        """The metrics that belong in `logs`: the evaluation window for an evaluation log (recognised by its
        `<prefix>_runtime` key, e.g. eval_runtime), the training window for any other log."""
        prefix = eval_prefix(logs)
        if prefix is None:
            return self.pop("train")
        return self.pop("eval", prefix + "_")


def eval_prefix(logs: dict) -> str | None:
    """"eval" (or the evaluate() metric_key_prefix) for the metrics log of an evaluation, None for a training log."""
    for key in logs:
        match = _RUNTIME_KEY.match(key)
        if match and match.group(1) != "train":
            return match.group(1)
    return None
