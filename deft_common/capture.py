"""One capture mechanism per MLP block: every DEFT stage that reads or changes an MLP activation goes through it.

The hooks are installed once per model, on each block's capture point (`capture="act"`: the activation module's
output; `capture="down_in"`: the down-projection's input), when the first stage needs them, and removed with the
last stage (the same design as transformers' `utils/output_capturing.py`). A hook runs the stages that cover its
block in a fixed order, each on what the one before returned:

    STAGES = ("setpoint", "inference", "observe")

- "setpoint":  the sparsity set-point zeroes the smallest activations of a training forward (sparsity.setpoint)
- "inference": calibrated thresholds zero |a| <= τ, optionally with sparse execution (sparsity.masking)
- "observe":   the density tracker and threshold calibration measure what the model really computes (tracker,
               sparsity.calibration)

so the density that is measured is always that of the activations the model uses, whatever order the owners were
built in. One reading of the forward's real tokens serves every stage: a forward pre-hook on the model reads its
attention masks (`forward_arguments`), or an owner pins the masks it was given (`DensityTracker.record`);
`capture.real_rows(site, a)` aligns them with an activation once per shape and forward.

    capture = ActivationCapture.of(model)
    handle = capture.add("observe", sites, "act", lambda site, a: print(site.name, a.shape))
    model(**batch)
    handle.remove()        # the last stage gone: every hook is off, the model is exactly as before
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import MlpSite, base_model_of
from .errors import DeftInputError

STAGES = ("setpoint", "inference", "observe")

# A stage's function: (the block, its activation at the capture point) -> the activation to use instead, or None to
# leave it as it is. `a` is whatever the capture point gives (check it with is_activation).
StageFn = Callable[[MlpSite, object], "torch.Tensor | None"]

_REGISTRY = "_deft_activation_capture"  # the ActivationCapture of a base model, while it has stages


# ------------------------------------------------------------------------------------------ public helpers
def in_backward() -> bool:
    """True while the autograd engine runs backward, e.g. during a gradient-checkpoint recompute. False while
    torch.compile traces a forward (a compiled graph's recompute does not run the hooks again), which also keeps this
    untraceable call out of the graph."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def is_activation(a) -> bool:
    """Whether a capture point gave a floating-point tensor (what the stages can read and change)."""
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(base_model_of(model), "config", None), "is_encoder_decoder", False))


def virtual_tokens(model: nn.Module) -> int:
    """How many virtual tokens PEFT prompt tuning / p-tuning prepends to the input (0 for any other model):
    only then may activations be longer than the attention mask."""
    while not hasattr(model, "active_peft_config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DDP / DeepSpeed wrappers
    peft_config = getattr(model, "active_peft_config", None)
    if not getattr(peft_config, "is_prompt_learning", False):
        return 0
    return int(getattr(peft_config, "num_virtual_tokens", 0) or 0)


def forward_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A forward's inputs by name, so a positionally passed attention_mask is found too. Bound against the base
    model's forward (PEFT wrappers take (*args, **kwargs) and hand them on unchanged); a `**kwargs` catch-all is
    merged in."""
    if not args:
        return dict(kwargs)
    try:
        signature = inspect.signature(base_model_of(module).forward)
        bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            bound = {**bound.pop(param.name, {}), **bound}
    return bound


def forward_input_names(model: nn.Module) -> set[str] | None:
    """The named inputs of the base model's forward (PEFT wrappers hand theirs on), None when it takes **kwargs only."""
    try:
        parameters = inspect.signature(base_model_of(model).forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names or None


def masks_for_batch(batch: Mapping, encoder_decoder: bool) -> dict[str, torch.Tensor | None]:
    """The real-token masks of a model-input batch, as DensityTracker.record() takes them: its attention mask, and for
    encoder-decoder models its decoder_attention_mask or, failing that, the real label positions (labels != -100)."""
    masks = {"attention_mask": batch.get("attention_mask")}
    if encoder_decoder:
        decoder_mask = batch.get("decoder_attention_mask")
        labels = batch.get("labels")
        if decoder_mask is None and labels is not None and batch.get("decoder_input_ids") is None:
            decoder_mask = (labels != -100).long()
        masks["decoder_attention_mask"] = decoder_mask
    return masks


def stack_masks(batch: Mapping, encoder_decoder: bool) -> dict[str, torch.Tensor | None]:
    """{"encoder": mask, "decoder": mask} of a model-input batch (see `masks_for_batch`); a decoder-only model's
    blocks are all read with the attention mask."""
    masks = masks_for_batch(batch, encoder_decoder)
    encoder = masks["attention_mask"]
    return {"encoder": encoder, "decoder": masks.get("decoder_attention_mask") if encoder_decoder else encoder}


def check_mask(name: str, mask) -> torch.Tensor | None:
    """`mask` detached, or a DeftInputError when it is not a (batch, seq_len) tensor."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DeftInputError(f"{name} must be a (batch, seq_len) tensor of 1 for real tokens and 0 for padding, got {shape}")
    return mask.detach()


def align_mask(mask: torch.Tensor, a: torch.Tensor, site: MlpSite, stack: str, virtual: int = 0) -> torch.Tensor:
    """Boolean (rows,) over a.reshape(-1, hidden), True for real token rows, from a (batch, seq_len) mask; PEFT prompt
    tuning's `virtual` tokens are real positions the MLP computes."""
    name = "attention_mask" if stack == "encoder" else "decoder_attention_mask"
    batch, length = mask.shape
    if a.dim() == 3:
        if a.shape[0] != batch or a.shape[1] not in (length, length + virtual):
            raise DeftInputError(
                f"{name} has shape {tuple(mask.shape)} but {site.name} saw activations of shape {tuple(a.shape)}; "
                "pass the (batch, seq_len) mask of the batch given to the model (with PEFT prompt tuning, "
                "build the DensityTracker on the PeftModel so it knows the virtual tokens)"
            )
        extra = a.shape[1] - length
        if extra:
            mask = torch.cat([mask.new_ones(batch, extra), mask], dim=1)
    elif a.dim() != 2 or a.shape[0] != mask.numel():
        raise DeftInputError(
            f"{name} has shape {tuple(mask.shape)} but {site.name} saw activations of shape {tuple(a.shape)}"
        )
    return mask.reshape(-1).to(device=a.device) != 0


# ------------------------------------------------------------------------------------------ the mechanism
@dataclass(eq=False)
class _Stage:
    rank: int
    capture: str
    fn: StageFn
    sites: dict[int, MlpSite]  # id(capture module) -> block
    reads_masks: bool  # needs the masks read from the forward's arguments


@dataclass
class _RealRows:
    real: torch.Tensor  # bool (rows,): True for the rows of real tokens
    pad_rows: torch.Tensor | None = None  # indices of the padding rows (None: none), once `count` is known
    count: int | None = None  # real rows; None until pad_rows() needed them


@dataclass(eq=False)
class _Hooks:
    module_hooks: dict[tuple[str, int], object] = field(default_factory=dict)  # (capture, id(module)) -> handle
    readers: dict[int, object] = field(default_factory=dict)  # id(model) -> forward pre-hook reading its masks


class StageHandle:
    """What `ActivationCapture.add` returns: `remove()` takes the stage off (idempotent)."""

    def __init__(self, capture: "ActivationCapture", stage: _Stage):
        self._capture, self._stage = capture, stage

    def remove(self) -> None:
        if self._stage is not None:
            self._capture._remove(self._stage)
            self._stage = None


class ActivationCapture:
    """The capture hooks of one model (shared by its PEFT and DDP wrappers: it lives on the base model)."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.is_encoder_decoder = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
        self.virtual_tokens = 0
        self._stages: list[_Stage] = []
        self._hooks = _Hooks()
        self._read: dict[str, torch.Tensor | None] = {}  # masks of the latest forward, read from its arguments
        self._pinned: dict[str, torch.Tensor | None] | None = None  # masks an owner gave explicitly
        self._pinned_pads: dict[str, tuple[torch.Tensor, torch.Size]] = {}  # their padding positions, per stack
        self._rows: dict[tuple, _RealRows] = {}  # real rows per (stack, shape, device) for the current masks

    @classmethod
    def of(cls, model: nn.Module) -> "ActivationCapture":
        """The model's capture (made on first use). PEFT prompt tuning's virtual tokens are taken from `model`."""
        base = base_model_of(model)
        capture = base.__dict__.get(_REGISTRY)
        if capture is None:
            capture = cls(base)
            base.__dict__[_REGISTRY] = capture  # a plain attribute, not a submodule
        capture.virtual_tokens = max(capture.virtual_tokens, virtual_tokens(model))
        return capture

    @staticmethod
    def existing(model: nn.Module) -> "ActivationCapture | None":
        """The model's capture when some stage is on it, else None."""
        return base_model_of(model).__dict__.get(_REGISTRY)

    def has_stage(self, stage: str) -> bool:
        return any(s.rank == STAGES.index(stage) for s in self._stages)

    # ------------------------------------------------------------------------------------ stages
    def add(self, stage: str, sites: Iterable[MlpSite], capture: str, fn: StageFn,
            read_masks_of: nn.Module | None = None) -> StageHandle:
        """Run `fn(site, a)` at `capture` ("act" or "down_in") of each of `sites` in every forward, in the stage
        order. `read_masks_of`: also read the real-token masks from this model's forward arguments (and its base
        model's, which PEFT may call directly, past the wrapper's hooks; the innermost call seen last wins)."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is unknown; stages are {STAGES}")
        entry = _Stage(STAGES.index(stage), capture, fn, {}, read_masks_of is not None)
        for site in sites:
            module = site.capture_module(capture)
            entry.sites[id(module)] = site
            key = (capture, id(module))
            if key not in self._hooks.module_hooks:
                self._hooks.module_hooks[key] = self._hook(module, capture)
        if read_masks_of is not None:
            for model in dict.fromkeys([read_masks_of, self.base]):
                if id(model) not in self._hooks.readers:
                    self._hooks.readers[id(model)] = model.register_forward_pre_hook(self._read_masks, with_kwargs=True)
        self._stages.append(entry)
        self._stages.sort(key=lambda s: s.rank)  # stable: within a stage, the order of adding
        self.base.__dict__[_REGISTRY] = self
        return StageHandle(self, entry)

    def _remove(self, stage: _Stage) -> None:
        self._stages = [s for s in self._stages if s is not stage]
        used = {(s.capture, key) for s in self._stages for key in s.sites}
        for key in [k for k in self._hooks.module_hooks if k not in used]:
            self._hooks.module_hooks.pop(key).remove()
        if not any(s.reads_masks for s in self._stages):
            for handle in self._hooks.readers.values():
                handle.remove()
            self._hooks.readers, self._read, self._rows = {}, {}, {}
        if not self._stages:
            self._pinned = None
            if self.base.__dict__.get(_REGISTRY) is self:
                del self.base.__dict__[_REGISTRY]

    def _hook(self, module: nn.Module, capture: str):
        key = id(module)
        if capture == "act":
            return module.register_forward_hook(lambda _m, _args, out: self._run(capture, key, out))
        return module.register_forward_pre_hook(lambda _m, args: self._run(capture, key, args))

    def _run(self, capture: str, key: int, value):
        """The hook body: `value` is the activation (or a tuple starting with it); returns what the module should use
        instead, or None to leave it as it is."""
        is_tuple = isinstance(value, (tuple, list))
        a = value[0] if is_tuple and value else value
        changed = False
        for stage in self._stages:
            site = stage.sites.get(key) if stage.capture == capture else None
            if site is None:
                continue
            out = stage.fn(site, a)
            if out is not None:
                a, changed = out, True
        if not changed:
            return None
        return (a, *value[1:]) if is_tuple else a

    # ------------------------------------------------------------------------------------ real tokens
    def _read_masks(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._read = stack_masks(forward_arguments(module, args, kwargs), self.is_encoder_decoder)
        self._rows = {}

    def pin_masks(self, masks: dict[str, torch.Tensor | None] | None) -> None:
        """Use these {"encoder", "decoder"} masks for every forward until `pin_masks(None)` (instead of the ones read
        from the forward's arguments). Their padding positions are found here, once, before the forwards: reading
        them back to the host inside a forward would stall a GPU and break a torch.compile graph at every block."""
        self._pinned = masks
        self._rows = {}
        self._pinned_pads = {}
        for stack, mask in (masks or {}).items():
            if mask is not None:
                pad = torch.nonzero(mask.reshape(-1) == 0).flatten()
                self._pinned_pads[stack] = (pad, mask.shape)

    @property
    def masks(self) -> dict[str, torch.Tensor | None]:
        return self._pinned if self._pinned is not None else self._read

    def _real(self, site: MlpSite, a: torch.Tensor) -> _RealRows | None:
        """The real rows of `a` under the current masks (None: no mask, every row is real), once per shape."""
        stack = "decoder" if (self.is_encoder_decoder and site.stack == "decoder") else "encoder"
        mask = self.masks.get(stack)
        if mask is None:
            return None
        key = (stack, tuple(a.shape[:-1]), a.device)
        if key not in self._rows:
            self._rows[key] = _RealRows(align_mask(mask, a, site, stack, self.virtual_tokens))
        return self._rows[key]

    def real_rows(self, site: MlpSite, a: torch.Tensor) -> torch.Tensor | None:
        """Boolean (rows,) over a.reshape(-1, hidden): True for the rows of real tokens (None = every row is real).
        Computed on a's device without reading anything back to the host."""
        rows = self._real(site, a)
        return rows.real if rows is not None else None

    def pad_rows(self, site: MlpSite, a: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """(indices of the padding rows of a.reshape(-1, hidden), None if there are none; number of real rows).
        With pinned masks the indices come from their padding positions (found in pin_masks), shifted past PEFT's
        virtual tokens; otherwise they are read back to the host, once per shape and forward."""
        rows = self._real(site, a)  # also checks that the mask fits the activation
        if rows is None:
            return None, a.numel() // a.shape[-1]
        if rows.count is None:
            stack = "decoder" if (self.is_encoder_decoder and site.stack == "decoder") else "encoder"
            pinned = self._pinned_pads.get(stack) if self._pinned is not None else None
            if pinned is not None:
                pad, (batch, length) = pinned
                extra = rows.real.numel() // batch - length  # virtual tokens ahead of every row
                pad = pad + (pad // length + 1) * extra if extra else pad
            else:
                pad = torch.nonzero(~rows.real).flatten()
            rows.pad_rows, rows.count = (pad if pad.numel() else None), rows.real.numel() - pad.numel()
        return rows.pad_rows, rows.count
