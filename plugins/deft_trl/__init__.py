"""deft_trl: DEFT for TRL trainers.

    from deft_common import DeftConfig
    from deft_trl import DeftSFTMixin
    from trl import SFTTrainer

    class MySFTTrainer(DeftSFTMixin, SFTTrainer):
        pass

    trainer = MySFTTrainer(model=..., args=SFTConfig(...), train_dataset=..., deft_config=DeftConfig())
"""

from .mixin import DeftSFTMixin

__all__ = ["DeftSFTMixin"]
