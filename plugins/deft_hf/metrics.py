"""DEFT metrics for the Trainer's logs: density and density loss since the last log, summed over every process.

Each recorded forward pass adds its active / real entry counts per MLP layer (and, in training, its density term)
to a window of the run's deft_common.DensityLossEngine, one for training and one for evaluation (tensors, so a
forward costs no device sync and no collective). `for_log(logs)` sums the matching window over every process, turns
it into log keys and empties it; the Trainer logs on every process, so that collective is reached everywhere. The
keys are those of `DensityLossEngine.pop_metrics` (deft/density, deft/density/<block>, deft/loss, deft/coef, ...);
evaluation logs carry them behind their prefix: `eval_deft/density`, `eval_deft/density/<block>`.
"""

from __future__ import annotations

import re

from deft_common import DensityLossEngine

_RUNTIME_KEY = re.compile(r"^(.+)_runtime$")


class DeftMetrics:
    """The Trainer's view of the metrics windows of `engine` (the DensityLossEngine of the run): which window a log
    gets."""

    def __init__(self, engine: DensityLossEngine | None = None):
        self.engine = engine

    def clear(self, mode: str) -> None:
        if self.engine is not None:
            self.engine.clear(mode)

    def pop(self, mode: str, prefix: str = "") -> dict[str, float]:
        """The window's metrics as log keys (`prefix` + "deft/..."), and an empty window. A collective when
        torch.distributed is initialised (when any process recorded in this mode, every process must call it)."""
        return {} if self.engine is None else self.engine.pop_metrics(mode, prefix)

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
