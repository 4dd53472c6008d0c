"""Calibrated sparsity thresholds: the sparsity a model can spend at inference, and their file.

GELU and SiLU reach exact zero only by underflow, so exact zeros are not what inference can skip. Per MLP block,
`calibrate_thresholds` (sparsity.calibration) finds τ, the `sparsity` quantile of |a| at the block's capture point
over the real tokens of calibration batches; `apply_thresholds` (sparsity.masking) then sets every |a| <= τ to
exactly 0 in every forward (the TEAL/CATS idea).

    from deft_common import DeftConfig, SparsityThresholds, calibrate_thresholds, apply_thresholds
    th = calibrate_thresholds(model, batches, sparsity=0.9, config=DeftConfig(capture="act"))
    th.save(DIR)                                   # DIR/deft_thresholds.json
    handle = apply_thresholds(model, SparsityThresholds.load(DIR))   # every |a| <= τ is now exactly 0
    handle.remove()                                # the model computes exactly what it did before
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..architectures import MlpSite, base_model_of, find_mlp_sites, width_of
from ..config import CAPTURE_POINTS
from ..errors import DeftThresholdsError, ThresholdsFileNotFound

THRESHOLDS_FILE = "deft_thresholds.json"
FILE_FORMAT = "deft_thresholds/1"


class ThresholdsWarning(UserWarning):
    """Thresholds that apply, but maybe not as meant (an older file that covers only some of the model's blocks)."""


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
    model_blocks: MLP blocks of the calibrated model (all of them, thresholded or not), to refuse the thresholds of
                a model with other blocks of the same names and widths; None in files written before it was kept

    What a file must be to load, and what applying it checks (an error names the file and the fix):
    - errors: a value that is not a number in range (τ finite and >= 0, sparsity in [0, 1), calibrated in [0, 1],
      width and tokens whole numbers >= 1), a file changed after it was written (its checksum differs), a block the
      model does not have or of another width, and a model with another number of MLP blocks (model_blocks);
    - a warning (ThresholdsWarning): a file without model_blocks that covers only some of the model's blocks (the
      others stay dense). A file with model_blocks may cover some blocks: that was chosen at calibration
      (DeftConfig.layers).
    """

    thresholds: dict[str, float]
    sparsity: dict[str, float]
    calibrated: dict[str, float]
    capture: str
    tokens: int
    widths: dict[str, int]
    model_blocks: int | None = None

    # ------------------------------------------------------------------ files
    def save(self, directory) -> pathlib.Path:
        """Write DIRECTORY/deft_thresholds.json (the folder is created); returns the file's path."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / THRESHOLDS_FILE
        blocks = {name: {"threshold": tau, "sparsity": self.sparsity[name], "calibrated": self.calibrated[name],
                         "width": self.widths[name]} for name, tau in self.thresholds.items()}
        payload = {"format": FILE_FORMAT, "capture": self.capture, "tokens": self.tokens, "blocks": blocks}
        if self.model_blocks is not None:
            payload["model_blocks"] = self.model_blocks
        payload["checksum"] = _checksum(payload)
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
        checksum = payload.get("checksum")
        if checksum is not None and checksum != _checksum({k: v for k, v in payload.items() if k != "checksum"}):
            raise DeftThresholdsError(
                f"{path} was changed after it was written (its 'checksum' does not match its content), so its "
                "capture point or thresholds may not be what was calibrated; calibrate again to rewrite it, or delete "
                "the 'checksum' line to use the file as edited")
        out = {key: {} for key in ("thresholds", "sparsity", "calibrated", "widths")}
        for name, block in blocks.items():
            try:
                tau, width = float(block["threshold"]), block["width"]
                out["sparsity"][name] = float(block["sparsity"])
                out["calibrated"][name] = float(block["calibrated"])
            except (KeyError, TypeError, ValueError):
                raise malformed(f"block {name!r} needs numbers 'threshold', 'sparsity', 'calibrated' and 'width'") from None
            if not (math.isfinite(tau) and tau >= 0):
                raise malformed(f"block {name!r} has threshold {tau}, expected a finite number >= 0 (an infinite "
                                "threshold would zero the whole block)")
            if not 0.0 <= out["sparsity"][name] < 1.0:
                raise malformed(f"block {name!r} has sparsity {out['sparsity'][name]}, expected a fraction in [0, 1)")
            if not 0.0 <= out["calibrated"][name] <= 1.0:
                raise malformed(f"block {name!r} has calibrated {out['calibrated'][name]}, expected a fraction in "
                                "[0, 1]")
            if not _whole(width):
                raise malformed(f"block {name!r} has width {width!r}, expected a whole number >= 1")
            out["thresholds"][name], out["widths"][name] = tau, width
        tokens, model_blocks = payload.get("tokens"), payload.get("model_blocks")
        if not _whole(tokens):
            raise malformed(f"'tokens' is {tokens!r}, expected a whole number >= 1")
        if model_blocks is not None and not _whole(model_blocks):
            raise malformed(f"'model_blocks' is {model_blocks!r}, expected a whole number >= 1")
        return cls(capture=payload["capture"], tokens=tokens, model_blocks=model_blocks, **out)

    # ----------------------------------------------------------------- checks
    def sites_in(self, model: nn.Module) -> list[MlpSite]:
        """The model's MLP blocks these thresholds name, in forward order; a clear error when they do not fit."""
        sites = {site.name: site for site in find_mlp_sites(model, capture=self.capture)}
        model_name = type(base_model_of(model)).__name__
        if self.model_blocks is not None and self.model_blocks != len(sites):
            raise DeftThresholdsError(
                f"these thresholds were calibrated on a model with {self.model_blocks} MLP blocks, but {model_name} has "
                f"{len(sites)}: they belong to another model; calibrate this model with calibrate_thresholds or "
                "`deft sparsify`")
        unknown = [name for name in self.thresholds if name not in sites]
        if unknown:
            raise DeftThresholdsError(
                f"these thresholds name MLP block(s) {unknown[:3]} that {model_name} does "
                f"not have (its blocks are named like {next(iter(sites))!r}): they belong to another model; "
                "calibrate this model with calibrate_thresholds or `deft sparsify`"
            )
        for name in self.thresholds:
            width = width_of(sites[name])
            if width is not None and width != self.widths[name]:
                raise DeftThresholdsError(
                    f"MLP block {name!r} has {width} hidden units but these thresholds were calibrated on one with "
                    f"{self.widths[name]}: they belong to another model; calibrate this model"
                )
        dense = [name for name in sites if name not in self.thresholds]
        if dense and self.model_blocks is None:
            warnings.warn(f"these thresholds cover {len(self.thresholds)} of the {len(sites)} MLP blocks of "
                          f"{model_name}; {len(dense)} stay dense (first: {dense[0]}). If they were calibrated on "
                          "another model, calibrate this one", ThresholdsWarning, stacklevel=3)
        return [site for site in sites.values() if site.name in self.thresholds]

    def mean_calibrated_density(self) -> float:
        """Mean over the blocks of 1 - calibrated: the density the thresholds give on the calibration data."""
        return sum(1.0 - c for c in self.calibrated.values()) / len(self.calibrated)

    def log(self) -> dict[str, float]:
        """What the adapters log when they write the thresholds: deft/inference_sparsity (mean over the blocks of
        the sparsity asked for) and deft/calibrated_density (mean_calibrated_density)."""
        return {"deft/inference_sparsity": sum(self.sparsity.values()) / len(self.sparsity),
                "deft/calibrated_density": self.mean_calibrated_density()}


def sparsity_per_block(sparsity, names: list[str]) -> dict[str, float]:
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


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _checksum(payload: dict) -> str:
    """SHA-256 of the file's content in one canonical JSON form (sorted keys), so any later change shows."""
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
