"""DEFT metrics for the Trainer's logs: density and density loss since the last log, summed over every process.

Each recorded forward pass adds its active / real entry counts per MLP layer (and, in training, its density term)
to a window, one for training and one for evaluation (deft_common.DensitySums: tensors, so a forward costs no device
sync and no collective). `for_log(logs)` sums the matching window over every process, turns it into log keys and
empties it; the Trainer logs on every process, so that collective is reached everywhere:

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

from deft_common import DensitySums, DensityTracker, DensityWeight

_RUNTIME_KEY = re.compile(r"^(.+)_runtime$")


class DeftMetrics:
    """weight: the DensityWeight of the run, whose log() (deft/coef, ...) joins each training log."""

    def __init__(self, weight: DensityWeight | None = None):
        self.weight = weight
        self._windows: dict[str, tuple[list[str], DensitySums] | None] = {"train": None, "eval": None}
        self._adaptive = None  # the ADA-DEFT weights module of the last training tracker, when it has one
        self._device = None

    def add(self, mode: str, tracker: DensityTracker, term: torch.Tensor | None = None, device=None) -> None:
        """Add the last `tracker.record()` to the "train" or "eval" window. `term`: the density term of that forward
        (training only)."""
        layers = [site.name for site in tracker.sites]
        window = self._windows[mode]
        if window is None or window[0] != layers:
            window = self._windows[mode] = (layers, DensitySums(len(layers)))
        window[1].add(tracker, term)
        self._device = device
        if mode == "train":
            self._adaptive = tracker.adaptive

    def clear(self, mode: str) -> None:
        self._windows[mode] = None

    def pop(self, mode: str, prefix: str = "") -> dict[str, float]:
        """The window's metrics as log keys (`prefix` + "deft/..."), and an empty window. A collective when
        torch.distributed is initialised (when any process recorded in this mode, every process must call it)."""
        window = self._windows[mode]
        self.clear(mode)
        if window is None:
            return {}
        layers, sums = window
        totals = sums.pop(self._device if self._device is not None else "cpu")
        per_layer = {name: value for name, value in zip(layers, totals.layers) if value is not None}
        out = {}
        if totals.density is not None:
            out[f"{prefix}deft/density"] = totals.density
        if totals.term is not None:
            out[f"{prefix}deft/loss"] = totals.term
        if mode == "train" and self.weight is not None:
            out.update(self.weight.log())
        if mode == "train" and self._adaptive is not None:
            out.update(self._adaptive.log())
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
