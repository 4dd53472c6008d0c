"""Calibration: per MLP block, τ = a quantile of |a| at the capture point over the real tokens of some batches.

One pass of the model (no gradients, eval mode) fills a bounded log2 histogram per block (an "observe" stage of
deft_common.capture, so it measures what the model really computes, thresholds and set-point included); any number
of sparsities are then read off the same pass:

    th = calibrate_thresholds(model, batches, sparsity=0.9)                  # SparsityThresholds
    histograms = measure_histograms(model, batches); histograms.thresholds(0.5); histograms.thresholds(0.7)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..architectures import MlpSite, device_of, find_mlp_sites
from ..capture import ActivationCapture, forward_input_names, is_activation
from ..config import DeftConfig
from ..distributed import is_distributed, is_main_process, sum_over_processes
from ..errors import DeftConfigError, DeftInputError, DeftThresholdsError
from .histogram import NUM_BINS, bin_index, bin_value
from .thresholds import SparsityThresholds, sparsity_per_block



class ActivationHistograms:
    """Per MLP block, a log2 histogram of |a| over real entries (sparsity.histogram), and the count of exact zeros
    apart (bounded memory)."""

    def __init__(self, names: list[str], capture: str, model_blocks: int | None = None):
        self.capture, self.model_blocks = capture, model_blocks
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
        counts = torch.bincount(bin_index(x), minlength=NUM_BINS).to(torch.float64).cpu()
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
        tau = bin_value(k + share)  # interpolated in log space within bin k
        return tau, q

    def thresholds(self, sparsity: float | Mapping[str, float]) -> SparsityThresholds:
        """SparsityThresholds at `sparsity` (a number for every block, or {block name: number})."""
        wanted = sparsity_per_block(sparsity, list(self.bins))
        thresholds, calibrated = {}, {}
        for name, q in wanted.items():
            thresholds[name], calibrated[name] = self.quantile(name, q)
        return SparsityThresholds(thresholds=thresholds, sparsity=wanted, calibrated=calibrated, capture=self.capture,
                                  tokens=max(self.entries[n] // self.widths[n] for n in wanted),
                                  widths={n: self.widths[n] for n in wanted}, model_blocks=self.model_blocks)


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
    sparsity_per_block(sparsity, [site.name for site in find_mlp_sites(model, config)])  # fail before any forward
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
    names = forward_input_names(model)
    chosen = ({k: v for k, v in batch.items() if names is None or k in names}
              for batch in itertools.islice(batches, config.calibration_batches))
    thresholds = calibrate_thresholds(model, chosen, config.thresholds_sparsity, config)
    if write if write is not None else is_main_process():
        thresholds.save(directory)
    return thresholds


def measure_histograms(model: nn.Module, batches: Iterable[Mapping], config: DeftConfig | None = None
                       ) -> "ActivationHistograms":
    """One calibration pass (see calibrate_thresholds), kept so that thresholds for several sparsities come from
    the same pass: `measure_histograms(model, batches, config).thresholds(0.9)`."""
    config = _checked_config(config)
    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        what = "one batch (a dict)" if isinstance(batches, Mapping) else type(batches).__name__
        raise DeftInputError(f"calibration wants an iterable of batches (model-input dicts), got {what}; pass a list "
                             "of batches, e.g. [batch], or a DataLoader")
    sites = find_mlp_sites(model, config)
    # Every MLP block of the model, selected or not, so the file refuses a model with other blocks of the same names.
    model_blocks = len(find_mlp_sites(model, capture=config.capture)) if config.modules is None else None
    histograms = ActivationHistograms([site.name for site in sites], config.capture, model_blocks)
    capture = ActivationCapture.of(model)

    def observe(site: MlpSite, a) -> None:
        if is_activation(a):
            histograms.add(site.name, a, capture.real_rows(site, a))

    # An "observe" stage: it sees the activations after the set-point and any applied thresholds, as computed.
    stage = capture.add("observe", sites, config.capture, observe, read_masks_of=model)
    was_training = model.training
    device = device_of(model)
    batches_seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, Mapping):
                    raise DeftInputError(f"calibration batches must be dicts of model inputs, got {type(batch).__name__}")
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
                batches_seen += 1
    finally:
        stage.remove()
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
