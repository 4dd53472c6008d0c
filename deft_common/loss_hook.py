"""`DensityLossHook`: fold the density term into the model's own `outputs.loss`.

Two hooks on the top-level module (the plain or PEFT-wrapped model, not a DDP/DeepSpeed wrapper):
a forward pre-hook that starts `tracker.record()` with the batch's masks whenever the module trains with grad
enabled, and a forward hook that stops recording and returns the outputs with

    loss = task loss + term_scale * coef_at(global_step) * density loss

Whatever calls the model and optimises `outputs.loss` (a raw loop, a DeepSpeed engine, DDP, the HF Trainer)
then optimises the DEFT loss without knowing about it; wrappers call `module(...)`, so the hooks fire inside them.

    hook = DensityLossHook(model, DeftConfig(coef=1.0))
    out = model(**batch)              # out.loss already holds the density term
    out.loss.backward()
    hook.global_step += 1             # only needed for DeftConfig.coef_warmup_steps
    hook.last_metrics()               # {"deft/density": ..., "deft/loss": coef × density loss}, all processes
    hook.remove()
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .architectures import base_model_of
from .config import DeftConfig
from .tracker import DensityTracker


class DeftLossError(RuntimeError):
    """The model's output has no loss the density term can be added to."""


NO_LOSS_FIX = (
    "pass `labels` in the batch so the model computes its loss, or add the term yourself: remove this hook, "
    "wrap the forward in `with tracker.record(**tracker.masks_for(batch)):` and add "
    "`config.coef * tracker.density_loss()` to your loss"
)


class DensityLossHook:
    """Adds `coef * density loss` to `outputs.loss` of every training forward of `model`.

    global_step: optimizer steps done; the caller advances it when it uses DeftConfig.coef_warmup_steps.
    term_scale:  optional `f(forward kwargs) -> float`, a factor on the term that undoes how the caller scales the
                 loss afterwards (e.g. the HF Trainer's num_items_in_batch normalisation); default 1.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DeftConfig | None = None,
        term_scale: Callable[[dict], float] | None = None,
    ):
        self.model = model
        self.tracker = DensityTracker(model, config)
        self.config = self.tracker.config
        self.term_scale = term_scale
        self.global_step = 0
        self._record = None  # the open tracker.record() of the running training forward
        self._sums: dict | None = None  # metrics summed over the training forwards since last_metrics()
        self._handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            # always_call: the recording is closed even when the forward raises.
            model.register_forward_hook(self._finish, with_kwargs=True, always_call=True),
        ]

    # ------------------------------------------------------------------ hooks
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._record is not None or not (module.training and torch.is_grad_enabled()):
            return  # eval, generate(), no_grad: the model's loss stays untouched
        inputs = _named_inputs(module, args, kwargs)
        record = self.tracker.record(**self.tracker.masks_for(inputs))
        record.__enter__()
        self._record = record

    def _finish(self, module: nn.Module, args: tuple, kwargs: dict, outputs):
        if self._record is None:
            return None
        record, self._record = self._record, None
        record.__exit__(None, None, None)
        if outputs is None:
            return None  # the forward raised; its own error propagates
        coef = self.config.coef_at(self.global_step)
        term = coef * self.tracker.density_loss()
        self._accumulate(term)
        scale = 1.0 if self.term_scale is None else float(self.term_scale(kwargs))
        if coef == 0 or scale == 0:
            return None  # measuring only (coef=0): outputs as the model made them
        loss = _loss_of(outputs)
        if loss is None:
            raise DeftLossError(
                f"{type(module).__name__} returned no loss ({type(outputs).__name__}), so the DEFT density term "
                f"cannot be added to it; {NO_LOSS_FIX}"
            )
        return _with_loss(outputs, (loss + scale * term).to(loss.dtype))

    # ---------------------------------------------------------------- metrics
    def _accumulate(self, term: torch.Tensor) -> None:
        # Kept as tensors (no device sync per forward); read and reduced in last_metrics().
        active, entries = _layer_counts(self.tracker)
        sums = self._sums or {"active": None, "entries": [0] * len(entries), "loss": 0.0, "forwards": 0}
        if active is not None:
            sums["active"] = active if sums["active"] is None else sums["active"] + active
        sums["entries"] = [a + b for a, b in zip(sums["entries"], entries)]
        sums["loss"] = sums["loss"] + term.detach().to(torch.float64)
        sums["forwards"] += 1
        self._sums = sums

    def last_metrics(self) -> dict[str, float]:
        """{"deft/density": mean over layers of the fraction of active entries, "deft/loss": mean density term
        (coef × density loss, as added to the loss)}
        over the training forwards since the previous call (the micro-batches of the last optimizer step when called
        once per step) and over every process. Empty when nothing was recorded anywhere. A collective when
        torch.distributed is initialised: every process must call it."""
        sums, self._sums = self._sums, None
        layers = len(self.tracker.sites)
        active = None if sums is None else sums["active"]
        device = active.device if active is not None else _device_of(self.model)
        vector = torch.zeros(2 * layers + 2, dtype=torch.float64, device=device)
        if sums is not None:
            if active is not None:
                vector[:layers] = active
            vector[layers : 2 * layers] = torch.tensor(sums["entries"], dtype=torch.float64)
            vector[-2] = sums["loss"]
            vector[-1] = sums["forwards"]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vector)
        values = vector.tolist()
        active_sum, entries, loss_sum, forwards = values[:layers], values[layers : 2 * layers], values[-2], values[-1]
        densities = [a / e for a, e in zip(active_sum, entries) if e]
        if not forwards or not densities:
            return {}
        return {"deft/density": sum(densities) / len(densities), "deft/loss": loss_sum / forwards}

    def density(self, threshold: float | None = None) -> dict[str, float]:
        """{MLP block name: density} of the last training forward on this process."""
        return self.tracker.density(threshold)

    # --------------------------------------------------------------- teardown
    def remove(self) -> None:
        """Remove both hooks and the tracker's: the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.tracker.remove()


def _layer_counts(tracker: DensityTracker) -> tuple[torch.Tensor | None, list[int]]:
    """Active entries (a float64 tensor, read without a device sync) and real entries of the last record per MLP
    block, in the order of tracker.sites (0 for a block not seen). Like tracker.layer_counts(), which would sync
    the device once per layer and forward to turn the counts into Python ints."""
    k = tracker._threshold_index(None)
    records = [tracker._records.get(site.name) for site in tracker.sites]
    records = [rec if rec is not None and rec.entries else None for rec in records]
    seen = [rec for rec in records if rec is not None]
    if not seen:
        return None, [0] * len(records)
    zero = torch.zeros((), dtype=torch.float64, device=seen[0].active.device)
    active = torch.stack([zero if rec is None else rec.active[k].to(torch.float64) for rec in records])
    return active, [0 if rec is None else rec.entries for rec in records]


def _named_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward's inputs by name, so a positionally passed attention_mask is found too. Bound against the base
    model's forward: PEFT wrappers take (*args, **kwargs) and hand them on unchanged."""
    if not args:
        return kwargs
    try:
        return dict(inspect.signature(base_model_of(module).forward).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return kwargs


def _loss_of(outputs) -> torch.Tensor | None:
    """The loss of a ModelOutput / dict (key "loss"), a tuple whose first item is a scalar (return_dict=False),
    or a bare scalar tensor."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        loss = outputs[0] if outputs else None
    else:
        loss = outputs
    if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point():
        return loss
    return None


def _with_loss(outputs, loss: torch.Tensor):
    if isinstance(outputs, Mapping):
        outputs["loss"] = loss  # ModelOutput.__setitem__ updates the attribute too
        return outputs
    if isinstance(outputs, (tuple, list)):
        return type(outputs)([loss, *outputs[1:]]) if type(outputs) in (tuple, list) else (loss, *outputs[1:])
    return loss


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
