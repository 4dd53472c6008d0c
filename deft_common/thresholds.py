"""Calibrated sparsity thresholds: the sparsity a model can spend at inference.

GELU and SiLU reach exact zero only by underflow, so exact zeros are not what inference can skip. Per MLP block,
`calibrate_thresholds` finds τ, the `sparsity` quantile of |a| at the block's capture point over the real tokens of
calibration batches; `apply_thresholds` then sets every |a| <= τ to exactly 0 in every forward (the TEAL/CATS idea).

    from deft_common import DeftConfig, SparsityThresholds, calibrate_thresholds, apply_thresholds
    th = calibrate_thresholds(model, batches, sparsity=0.9, config=DeftConfig(capture="act"))
    th.save(DIR)                                   # DIR/deft_thresholds.json
    handle = apply_thresholds(model, SparsityThresholds.load(DIR))   # every |a| <= τ is now exactly 0
    handle.remove()                                # the model computes exactly what it did before

With `kernel="sparse"` the thresholded blocks are also executed sparsely (deft_common.sparse_mlp).
"""

from __future__ import annotations

import inspect
import itertools
import json
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import MlpSite, base_model_of, device_of, find_mlp_sites, unwrapped
from .config import CAPTURE_POINTS, DeftConfig, DeftConfigError
from .distributed import is_distributed, is_main_process, sum_over_processes
from .tracker import DeftInputError, _prompt_tokens, real_rows, stack_masks

THRESHOLDS_FILE = "deft_thresholds.json"
FILE_FORMAT = "deft_thresholds/1"
KERNELS = ("mask", "sparse")

# |a| is binned by log2 into BINS_PER_OCTAVE bins per factor of 2 over [2^LOWEST_OCTAVE, 2^HIGHEST_OCTAVE); exact
# zeros are counted apart. Within a bin τ is interpolated, so τ is within one bin (a factor 2^(1/256), 0.27%) of
# the exact quantile; values outside the range fall into the first or last bin.
BINS_PER_OCTAVE = 256
LOWEST_OCTAVE, HIGHEST_OCTAVE = -40, 24
NUM_BINS = (HIGHEST_OCTAVE - LOWEST_OCTAVE) * BINS_PER_OCTAVE


class DeftThresholdsError(DeftConfigError):
    """Thresholds that do not fit (sparsity, file, model); the message names what is wrong and the fix."""


class ThresholdsFileNotFound(DeftThresholdsError, FileNotFoundError):
    """No deft_thresholds.json where one was asked for."""


@dataclass
class SparsityThresholds:
    """Per-MLP-block thresholds τ: at inference |a| <= τ at the block's capture point is set to 0.

    thresholds: {MLP block name: τ}
    sparsity:   {MLP block name: the fraction of zeros asked for}
    calibrated: {MLP block name: fraction of calibration entries at or below τ (read off the histogram: exact for
                τ = 0, e.g. a ReLU block with more exact zeros than asked; otherwise the interpolated quantile)}
    capture:    the capture point the thresholds were calibrated at ("act" or "down_in")
    tokens:     real tokens seen during calibration (per block: tokens × the block's width entries)
    widths:     {MLP block name: hidden units}, to refuse the thresholds of another model
    """

    thresholds: dict[str, float]
    sparsity: dict[str, float]
    calibrated: dict[str, float]
    capture: str
    tokens: int
    widths: dict[str, int]

    # ------------------------------------------------------------------ files
    def save(self, directory) -> pathlib.Path:
        """Write DIRECTORY/deft_thresholds.json (the folder is created); returns the file's path."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / THRESHOLDS_FILE
        blocks = {name: {"threshold": tau, "sparsity": self.sparsity[name], "calibrated": self.calibrated[name],
                         "width": self.widths[name]} for name, tau in self.thresholds.items()}
        payload = {"format": FILE_FORMAT, "capture": self.capture, "tokens": self.tokens, "blocks": blocks}
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "SparsityThresholds":
        """Read a deft_thresholds.json: `path` is the file or the folder holding it."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / THRESHOLDS_FILE
        if not path.is_file():
            raise ThresholdsFileNotFound(
                f"no sparsity thresholds at {path}; write them with SparsityThresholds.save(DIR) or "
                "`deft sparsify MODEL --data FILE.jsonl --sparsity 0.9`"
            )
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DeftThresholdsError(f"{path} is not valid JSON ({err}); calibrate again to rewrite it") from None
        return cls._from_payload(payload, path)

    @classmethod
    def _from_payload(cls, payload, path) -> "SparsityThresholds":
        def malformed(what: str) -> DeftThresholdsError:
            return DeftThresholdsError(f"{path} is not a DEFT thresholds file: {what}; calibrate again to rewrite it")

        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise malformed(f"its 'format' is {payload.get('format') if isinstance(payload, dict) else None!r}, "
                            f"expected {FILE_FORMAT!r}")
        if payload.get("capture") not in CAPTURE_POINTS:
            raise malformed(f"'capture' is {payload.get('capture')!r}, expected one of {CAPTURE_POINTS}")
        blocks = payload.get("blocks")
        if not isinstance(blocks, dict) or not blocks:
            raise malformed("'blocks' must map MLP block names to their thresholds")
        out = {key: {} for key in ("thresholds", "sparsity", "calibrated", "widths")}
        for name, block in blocks.items():
            try:
                tau, width = float(block["threshold"]), int(block["width"])
                out["sparsity"][name] = float(block["sparsity"])
                out["calibrated"][name] = float(block["calibrated"])
            except (KeyError, TypeError, ValueError):
                raise malformed(f"block {name!r} needs numbers 'threshold', 'sparsity', 'calibrated' and 'width'") from None
            if not tau >= 0:
                raise malformed(f"block {name!r} has threshold {tau}, expected a number >= 0")
            out["thresholds"][name], out["widths"][name] = tau, width
        tokens = payload.get("tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise malformed(f"'tokens' is {tokens!r}, expected a whole number >= 1")
        return cls(capture=payload["capture"], tokens=tokens, **out)

    # ----------------------------------------------------------------- checks
    def sites_in(self, model: nn.Module) -> list[MlpSite]:
        """The model's MLP blocks these thresholds name, in forward order; a clear error when they do not fit."""
        sites = {site.name: site for site in find_mlp_sites(model, DeftConfig(capture=self.capture))}
        unknown = [name for name in self.thresholds if name not in sites]
        if unknown:
            raise DeftThresholdsError(
                f"these thresholds name MLP block(s) {unknown[:3]} that {type(base_model_of(model)).__name__} does "
                f"not have (its blocks are named like {next(iter(sites))!r}): they belong to another model; "
                "calibrate this model with calibrate_thresholds or `deft sparsify`"
            )
        for name in self.thresholds:
            width = _width_of(sites[name])
            if width is not None and width != self.widths[name]:
                raise DeftThresholdsError(
                    f"MLP block {name!r} has {width} hidden units but these thresholds were calibrated on one with "
                    f"{self.widths[name]}: they belong to another model; calibrate this model"
                )
        return [site for site in sites.values() if site.name in self.thresholds]

    def mean_calibrated_density(self) -> float:
        """Mean over the blocks of 1 - calibrated: the density the thresholds give on the calibration data."""
        return sum(1.0 - c for c in self.calibrated.values()) / len(self.calibrated)

    def log(self) -> dict[str, float]:
        """What the adapters log when they write the thresholds: deft/inference_sparsity (mean over the blocks of
        the sparsity asked for) and deft/calibrated_density (mean_calibrated_density)."""
        return {"deft/inference_sparsity": sum(self.sparsity.values()) / len(self.sparsity),
                "deft/calibrated_density": self.mean_calibrated_density()}


# -------------------------------------------------------------------------------------------- calibration
class ActivationHistograms:
    """Per MLP block, a log2 histogram of |a| over real entries, and the count of exact zeros (bounded memory)."""

    def __init__(self, names: list[str], capture: str):
        self.capture = capture
        self.bins = {name: torch.zeros(NUM_BINS, dtype=torch.float64) for name in names}
        self.zeros = {name: 0 for name in names}
        self.entries = {name: 0 for name in names}
        self.widths: dict[str, int] = {}

    def add(self, name: str, a: torch.Tensor, real: torch.Tensor | None) -> None:
        x = a.detach().reshape(-1, a.shape[-1])
        if real is not None:
            x = x[real]
        x = x.abs().float().flatten()
        self.widths[name] = a.shape[-1]
        zeros = int((x == 0).sum())
        index = ((torch.log2(x) - LOWEST_OCTAVE) * BINS_PER_OCTAVE).floor_().clamp_(0, NUM_BINS - 1).long()
        counts = torch.bincount(index, minlength=NUM_BINS).to(torch.float64).cpu()
        counts[0] -= zeros  # log2(0) = -inf landed in bin 0: the zeros are counted apart
        self.bins[name] += counts
        self.zeros[name] += zeros
        self.entries[name] += x.numel()

    def sum_over_processes(self, device: torch.device) -> None:
        """Add up every process's counts (a collective under torch.distributed, run on `device`)."""
        if not is_distributed():
            return
        names = sorted(self.bins)
        stacked = torch.stack([torch.cat([self.bins[n], torch.tensor([self.zeros[n], self.entries[n]],
                                                                      dtype=torch.float64)]) for n in names])
        stacked = sum_over_processes(stacked.to(device)).cpu()
        for n, row in zip(names, stacked):
            self.bins[n], self.zeros[n], self.entries[n] = row[:NUM_BINS], int(row[-2]), int(row[-1])

    def quantile(self, name: str, q: float) -> tuple[float, float]:
        """(τ, fraction of entries at or below τ) for the q-quantile of |a|."""
        entries, zeros = self.entries[name], self.zeros[name]
        if q <= 0.0 or zeros >= q * entries:
            return 0.0, zeros / entries  # e.g. a ReLU block with more exact zeros than asked: τ = 0 is enough
        wanted = q * entries - zeros
        cumulative = torch.cumsum(self.bins[name], 0)
        k = int(torch.searchsorted(cumulative, torch.tensor([wanted], dtype=torch.float64))[0])
        k = min(k, NUM_BINS - 1)
        before = float(cumulative[k - 1]) if k else 0.0
        inside = float(self.bins[name][k])
        share = (wanted - before) / inside if inside else 1.0
        tau = 2.0 ** (LOWEST_OCTAVE + (k + share) / BINS_PER_OCTAVE)  # interpolated in log space within bin k
        return tau, q

    def thresholds(self, sparsity: float | Mapping[str, float]) -> SparsityThresholds:
        """SparsityThresholds at `sparsity` (a number for every block, or {block name: number})."""
        wanted = _sparsity_per_block(sparsity, list(self.bins))
        thresholds, calibrated = {}, {}
        for name, q in wanted.items():
            thresholds[name], calibrated[name] = self.quantile(name, q)
        return SparsityThresholds(thresholds=thresholds, sparsity=wanted, calibrated=calibrated, capture=self.capture,
                                  tokens=max(self.entries[n] // self.widths[n] for n in wanted),
                                  widths={n: self.widths[n] for n in wanted})


def calibrate_thresholds(model: nn.Module, batches: Iterable[Mapping], sparsity: float | Mapping[str, float] = 0.9,
                         config: DeftConfig | None = None) -> SparsityThresholds:
    """Per MLP block τ = the `sparsity` quantile of |a| at `config.capture` over the real tokens of `batches`.

    model:    a plain or PEFT-wrapped HF model (fp32 or bf16); `config.layers` / `config.modules` select blocks.
    batches:  model-input dicts (tensors are moved to the model's device); attention masks are honoured, padding
              never counts; encoder and decoder stacks are both calibrated (decoder_attention_mask, else the real
              label positions, as DensityTracker does).
    sparsity: one number in [0, 1) for every block, or {block name: number} for some blocks.
    Runs without gradients with the model in eval mode (its mode is restored). Memory stays bounded: one
    histogram of 16,384 log-spaced bins per block, so τ is within 0.27% of the exact quantile. Under
    torch.distributed the counts are summed over processes: every process must call it.
    """
    config = _checked_config(config)
    _sparsity_per_block(sparsity, [site.name for site in find_mlp_sites(model, config)])  # fail before any forward
    return measure_histograms(model, batches, config).thresholds(sparsity)


def save_inference_thresholds(model: nn.Module, batches: Iterable[Mapping], config: DeftConfig, directory,
                              write: bool | None = None) -> SparsityThresholds:
    """The end of training: calibrate at DeftConfig.thresholds_sparsity (inference_sparsity, else the training
    set-point sparsity_setpoint) on the first `config.calibration_batches` of `batches` (training batches; keys the
    model's forward does not name, such as a collator's completion_mask, are left out) and write
    DIRECTORY/deft_thresholds.json where `write` (default: on the main process only). The blocks and capture point
    are the config's, those DEFT trained. Every process must call it (the counts are summed over processes)."""
    config = _checked_config(config)
    if config.thresholds_sparsity is None:
        raise DeftThresholdsError("DeftConfig.inference_sparsity is None (and no sparsity_setpoint): set it (e.g. "
                                  "DeftConfig(inference_sparsity=0.9)) to calibrate and write the inference thresholds")
    names = _forward_input_names(model)
    chosen = ({k: v for k, v in batch.items() if names is None or k in names}
              for batch in itertools.islice(batches, config.calibration_batches))
    thresholds = calibrate_thresholds(model, chosen, config.thresholds_sparsity, config)
    if write if write is not None else is_main_process():
        thresholds.save(directory)
    return thresholds


def _forward_input_names(model: nn.Module) -> set[str] | None:
    """The named inputs of the base model's forward (PEFT wrappers hand theirs on), None when it takes **kwargs only."""
    try:
        parameters = inspect.signature(base_model_of(model).forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names or None


def measure_histograms(model: nn.Module, batches: Iterable[Mapping], config: DeftConfig | None = None
                       ) -> "ActivationHistograms":
    """One calibration pass (see calibrate_thresholds), kept so that thresholds for several sparsities come from
    the same pass: `measure_histograms(model, batches, config).thresholds(0.9)`."""
    config = _checked_config(config)
    sites = find_mlp_sites(model, config)
    histograms = ActivationHistograms([site.name for site in sites], config.capture)
    base = base_model_of(model)
    is_encoder_decoder = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
    virtual_tokens = _prompt_tokens(model)
    masks: dict[str, torch.Tensor | None] = {}

    def observe(site: MlpSite, value) -> None:
        a = value[0] if isinstance(value, (tuple, list)) else value
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            return
        histograms.add(site.name, a, real_rows(masks, a, site, is_encoder_decoder, virtual_tokens))

    handles = []
    for site in sites:
        module = site.capture_module(config.capture)
        if config.capture == "act":
            handles.append(module.register_forward_hook(lambda _m, _args, out, site=site: observe(site, out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda _m, args, site=site: observe(site, args)))
    was_training = model.training
    device = device_of(model)
    batches_seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, Mapping):
                    raise DeftInputError(f"calibration batches must be dicts of model inputs, got {type(batch).__name__}")
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                masks = stack_masks(batch, is_encoder_decoder)
                model(**batch)
                batches_seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not batches_seen:
        raise DeftInputError("calibration got no batches; pass an iterable of model-input dicts "
                             "(e.g. a few hundred texts tokenized with their attention masks)")
    histograms.sum_over_processes(device)
    empty = [site.name for site in sites if not histograms.entries[site.name]]
    if empty:
        raise DeftInputError(
            f"calibration saw no real token at MLP block(s) {empty[:3]}: every attention-mask entry was 0 "
            "or the batches never reached those blocks; pass batches with real tokens (attention_mask 1)"
        )
    return histograms


def _checked_config(config: DeftConfig | None) -> DeftConfig:
    config = config if config is not None else DeftConfig()
    if not isinstance(config, DeftConfig):
        raise DeftConfigError(f"calibration needs a deft_common.DeftConfig, got {type(config).__name__}")
    return config


def _sparsity_per_block(sparsity, names: list[str]) -> dict[str, float]:
    def check(value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise DeftThresholdsError(
                f"sparsity{where}={value!r} must be a fraction in [0, 1): the share of activations set to zero "
                "(e.g. 0.9); 1 would zero every activation"
            )
        return float(value)

    if isinstance(sparsity, Mapping):
        unknown = [name for name in sparsity if name not in names]
        if unknown:
            raise DeftThresholdsError(
                f"sparsity names MLP block(s) {unknown[:3]} that the model does not have (selected blocks: "
                f"{names[:3]}{' ...' if len(names) > 3 else ''}); use the block names of find_mlp_sites"
            )
        if not sparsity:
            raise DeftThresholdsError("sparsity is an empty dict; give a number for every block or name some blocks")
        return {name: check(value, f"[{name!r}]") for name, value in sparsity.items()}
    value = check(sparsity, "")
    return {name: value for name in names}


# -------------------------------------------------------------------------------------------- application
class ThresholdsHandle:
    """What `apply_thresholds` returns: `remove()` takes the thresholds off again (also as a context manager)."""

    def __init__(self, model: nn.Module, thresholds: SparsityThresholds, kernel: str, handles: list):
        self.model, self.thresholds, self.kernel = model, thresholds, kernel
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(base_model_of(self.model), _APPLIED, None) is self:
            delattr(base_model_of(self.model), _APPLIED)

    def __enter__(self) -> "ThresholdsHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_APPLIED = "_deft_thresholds_handle"  # set on the base model while thresholds are applied


def apply_thresholds(model: nn.Module, thresholds: SparsityThresholds, kernel: str = "mask") -> ThresholdsHandle:
    """From now on every |a| <= τ at each thresholded block's capture point is exactly 0 (inference and training
    forwards alike). kernel="mask" only zeroes; kernel="sparse" also skips the work behind the zeros
    (deft_common.sparse_mlp). `handle.remove()` restores the model exactly."""
    if not isinstance(thresholds, SparsityThresholds):
        raise DeftThresholdsError(f"apply_thresholds needs SparsityThresholds (calibrate_thresholds or "
                                  f"SparsityThresholds.load), got {type(thresholds).__name__}")
    if kernel not in KERNELS:
        raise DeftThresholdsError(f"apply_thresholds: kernel={kernel!r} is unknown; use 'mask' (zero the entries) "
                                  "or 'sparse' (zero them and skip their multiply-adds)")
    base = base_model_of(model)
    if getattr(base, _APPLIED, None) is not None:
        raise DeftThresholdsError("thresholds are already applied to this model; call .remove() on the handle "
                                  "apply_thresholds returned before applying others")
    sites = thresholds.sites_in(model)
    handles = []
    try:
        for site in sites:
            tau = thresholds.thresholds[site.name]
            if kernel == "sparse":
                from .sparse_mlp import install_sparse_mlp

                handles.append(install_sparse_mlp(model, site, tau, thresholds.capture,
                                                  calibrated_density=1.0 - thresholds.calibrated[site.name]))
            else:
                handles.append(mask_hook(site, tau, thresholds.capture))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    handle = ThresholdsHandle(model, thresholds, kernel, handles)
    setattr(base, _APPLIED, handle)
    return handle


def zero_at_or_below(a: torch.Tensor, tau: float) -> torch.Tensor:
    """`a` with every entry |a| <= tau set to exactly 0: the one rule both kernels follow. hardshrink is exactly
    that rule in one fused pass (measured 10x faster than abs, compare and masked_fill on a 32x128x1536 batch)."""
    return F.hardshrink(a, float(tau))


def mask_hook(site: MlpSite, tau: float, capture: str):
    """The mask path of one block: a hook that sets |a| <= tau to 0 at its capture point (remove() undoes it)."""
    module = site.capture_module(capture)
    if capture == "act":
        return module.register_forward_hook(lambda _m, _args, out: _zeroed(out, tau))
    return module.register_forward_pre_hook(lambda _m, args: _zeroed(args, tau))


def _zeroed(value, tau: float):
    if isinstance(value, (tuple, list)):
        if not value or not isinstance(value[0], torch.Tensor):
            return None
        return (zero_at_or_below(value[0], tau), *value[1:])
    return zero_at_or_below(value, tau) if isinstance(value, torch.Tensor) else None


def _width_of(site: MlpSite) -> int | None:
    """Hidden units at the capture point: the down-projection's input size (None when it is not a known layer)."""
    down = unwrapped(site.down)
    for attr in ("in_features", "nx"):  # nn.Linear (and bitsandbytes' subclasses); GPT-2's Conv1D
        value = getattr(down, attr, None)
        if isinstance(value, int):
            return value
    return None
