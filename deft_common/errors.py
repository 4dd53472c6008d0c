"""Every DEFT error, on one base: `except DeftError` catches whatever DEFT raises on purpose.

Each message names what is wrong, where, and the fix. The second base says what kind of problem it is, so code that
catches the built-in kind (ValueError, RuntimeError, FileNotFoundError) keeps working.
"""

from __future__ import annotations


class DeftError(Exception):
    """Base of every DEFT error."""


class DeftConfigError(DeftError, ValueError):
    """A DEFT setting is wrong; the message names the field and how to fix it."""


class DeftInputError(DeftError, ValueError):
    """A tensor handed to DEFT (attention mask, calibration batches) does not fit the model's activations."""


class DeftLossError(DeftError, RuntimeError):
    """The model's output has no loss the density term can be added to."""


class DeftCheckpointingError(DeftConfigError):
    """Reentrant gradient checkpointing would give the density term no gradient."""


class DeftThresholdsError(DeftError, ValueError):
    """Thresholds that do not fit (sparsity, file, model); the message names what is wrong and the fix."""


class ThresholdsFileNotFound(DeftThresholdsError, FileNotFoundError):
    """No deft_thresholds.json where one was asked for."""


class SparseMlpError(DeftThresholdsError):
    """A block that cannot be executed sparsely; the message names the block, the reason and the fix."""
