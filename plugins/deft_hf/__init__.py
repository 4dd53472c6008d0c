"""deft_hf: DEFT for the Hugging Face transformers Trainer.

    from deft_common import DeftConfig
    from deft_hf import DeftCallback, DeftTrainerMixin

    Trainer(..., callbacks=[DeftCallback(DeftConfig())])          # existing code: one callback
    class MyTrainer(DeftTrainerMixin, Trainer): ...               # the general way: a compute_loss override
    MyTrainer(..., deft_config=DeftConfig())
"""

from deft_common import DeftConfig

from .callback import DeftCallback, DeftCallbackError
from .metrics import DeftMetrics
from .mixin import DeftTrainerMixin

__all__ = ["DeftCallback", "DeftCallbackError", "DeftConfig", "DeftMetrics", "DeftTrainerMixin"]
