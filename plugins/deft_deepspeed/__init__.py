"""deft_deepspeed: DEFT for DeepSpeed training loops.

    from deft_common import DeftConfig
    from deft_deepspeed import DeftLossHook

    hook = DeftLossHook(model, DeftConfig(coef=1.0))   # on the (PEFT) model, before deepspeed.initialize
    engine, *_ = deepspeed.initialize(model=model, ...)
    out = engine(**batch); engine.backward(out.loss); engine.step()
    hook.save_layer_weights(DIR)                       # with DeftConfig(adaptive=True): beside the saved adapter

Works under ZeRO 0-3 and with gradient accumulation (deepspeed >= 0.19.8 for gradient_accumulation_steps > 1 with
the default engine.backward; older versions raise a clear error). With the HF Trainer use deft_hf.
"""

from deft_common import DeftConfig
from deft_common import DeftLossError

from .hook import DeftLossHook, save_layer_weights

__all__ = ["DeftConfig", "DeftLossError", "DeftLossHook", "save_layer_weights"]
