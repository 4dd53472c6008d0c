"""`DeftSFTMixin`: DEFT for TRL's SFTTrainer (and other TRL trainers built on transformers.Trainer).

TRL >= 1.15 computes the SFT loss itself (fused LM head) and ignores the model's `outputs.loss`, so DEFT has to
add its term where the loss leaves `compute_loss`, which is what `deft_hf.DeftTrainerMixin` does: it records the
MLP activations of every forward inside `SFTTrainer.compute_loss` (the fused-head forward included) and scales the
term by TRL's own gradient-accumulation rule (TRL declares it through `loss_is_scaled_for_ga` or, on transformers
< 5.19, through `model_accepts_loss_kwargs` / `compute_loss_func`). Metrics go into the logs beside TRL's own.
"""

from __future__ import annotations

from deft_hf import DeftTrainerMixin


class DeftSFTMixin(DeftTrainerMixin):
    """Put it first: `class MyTrainer(DeftSFTMixin, SFTTrainer)`; pass `deft_config=DeftConfig(...)`.
    Same attributes as DeftTrainerMixin: deft_config, deft_tracker, deft_metrics."""
