"""Checks of the `deft` commands' arguments, made before any model is loaded or any data downloaded, and the
writing of their output files.

Each command has one function that checks all of its arguments (`DemoSettings.check`, `BenchSettings.check`,
`density.check_args`, `sparsify.check_args`); they are built from the helpers here, whose messages name the flag
and the fix. An output folder is checked for writing first (`check_output_dir`) but made only when there is
something to write (`write_text`), so a run that fails or is interrupted before leaves no empty folder behind.
"""

from __future__ import annotations

import math
import pathlib
import re
import tempfile

from deft_common import DeftError


class DeftArgumentError(DeftError, ValueError):
    """A command-line argument is unusable; the message names the flag and the fix."""


def whole(flag: str, value, minimum: int, fix: str = "") -> None:
    """A whole number >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DeftArgumentError(f"{flag} {value} must be a whole number >= {minimum}{_fix(fix)}")


def number(flag: str, value, minimum: float | None = None, strict: bool = False, maximum: float | None = None,
           strict_maximum: bool = False, fix: str = "") -> None:
    """A finite number within the bounds (strict: the bound itself excluded)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    low = "" if minimum is None else (f"> {minimum:g}" if strict else f">= {minimum:g}")
    high = "" if maximum is None else (f"< {maximum:g}" if strict_maximum else f"<= {maximum:g}")
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if strict_maximum else value <= maximum
    if not ok:
        bounds = " and ".join(b for b in (low, high) if b)
        raise DeftArgumentError(f"{flag} {value} must be a finite number{' ' + bounds if bounds else ''}{_fix(fix)}")


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def check_device(device: str, flag: str = "--device") -> None:
    """`device` is one torch can use here: auto, cpu, cuda (cuda:N) with a GPU visible, mps where available."""
    import torch

    kind, _, index = device.partition(":")
    if device in ("auto", "cpu"):
        return
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
            raise DeftArgumentError(f"{flag} {device}: torch sees no CUDA GPU here (torch {torch.__version__}, built "
                                    f"with {build}); use {flag} cpu, or {flag} auto to take a GPU when there is one")
        if index and int(index) >= torch.cuda.device_count():
            raise DeftArgumentError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA GPU(s), "
                                    f"numbered from 0; use {flag} cuda:0")
        return
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeftArgumentError(f"{flag} mps: torch has no MPS (Apple GPU) here; use {flag} cpu or auto")
        return
    raise DeftArgumentError(f"{flag} {device!r} is not a device the `deft` commands run on; use {DEVICES}")


# -------------------------------------------------------------------------------------------- output files
def check_output_dir(path, flag: str = "--out") -> pathlib.Path:
    """Fail now, before any work, unless files can be written into the folder `path` (made later, when there is
    something to write, by `write_text`). The check writes and removes a small file in the folder, or, when the
    folder does not exist yet, in the nearest folder above it that does (as the later mkdir needs)."""
    path = pathlib.Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise DeftArgumentError(f"{flag} {path}: {existing} is a link to nothing; choose another folder")
        existing = existing.parent
    if not existing.is_dir():
        raise DeftArgumentError(f"{flag} {path}: {existing} is a file, not a folder; choose another folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".deft-write-check-"):
            pass
    except OSError as err:
        where = "" if existing == path else f" ({existing}, where it would be made)"
        raise DeftArgumentError(f"{flag} {path}: cannot write there{where}: {err.strerror or err}; choose a "
                                f"folder you can write to") from err
    return path


def write_text(path, text: str) -> pathlib.Path:
    """Write `text` to `path`, making its folder first; a failure says where and why."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        raise DeftArgumentError(f"could not write {path}: {err.strerror or err}") from err
    return path


def writing(path, action) -> pathlib.Path:
    """Run action(path) (e.g. a plot's savefig) after making path's folder; a failure says where and why."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        action(path)
    except OSError as err:
        raise DeftArgumentError(f"could not write {path}: {err.strerror or err}") from err
    return path


# ---------------------------------------------------------------------------------- DeftConfig field names
_FIELD = re.compile(r"DeftConfig\.([a-z_]+)=")


def config_error_with_flags(err: DeftError) -> DeftArgumentError:
    """A DeftConfigError about the fields given as command-line flags (--<field-name>), with the flags named:
    "DeftConfig.coef=-1.0 must be >= 0" -> "--coef -1.0 must be >= 0"."""
    message = _FIELD.sub(lambda m: f"--{m.group(1).replace('_', '-')} ", str(err))
    message = re.sub(r"DeftConfig\.([a-z_]+)", lambda m: f"--{m.group(1).replace('_', '-')}", message)
    message = re.sub(r"^(DeftConfig: )?skip (budget|threshold) ", lambda m: f"--skip-{m.group(2)} ", message)
    return DeftArgumentError(message)
