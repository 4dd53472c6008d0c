"""FSDP2, FSDP1 and DDP runs of the HF Trainer with DEFT for test_fsdp.py, on CPU with gloo:

    python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_worker.py OUT fsdp2:mixin,ddp:mixin,...

Each RUN is ENGINE:KIND, ENGINE one of ddp, fsdp1, fsdp2, KIND one of mixin (DeftTrainerMixin), callback
(DeftCallback), trl (deft_trl.DeftSFTMixin on TRL's SFTTrainer), resume (the mixin resumed from its run's
checkpoint-1). They run one after the other in these processes; rank 0 saves {RUN: results} to OUT (torch.save).
`train(...)` with ENGINE "single" is the one-process reference, which the test runs in its own process.

How FSDP runs on CPU: transformers hands accelerate an FSDP plugin (TrainingArguments(fsdp=..., fsdp_config=...)),
but accelerate's AcceleratorState switches to FSDP only for GPU-like backends (MULTI_GPU, MULTI_XPU, ...) and
otherwise keeps MULTI_CPU, i.e. DDP. `force_fsdp_on_cpu()` wraps AcceleratorState.__init__ so that a MULTI_CPU
state given an FSDP plugin becomes DistributedType.FSDP with that plugin, which is what the GPU path sets; the rest
(fully_shard for FSDP2, FullyShardedDataParallel for FSDP1, the optimizer, the Trainer's FSDP branches) is
accelerate's and transformers' own code. FSDP1 also needs ACCELERATE_TORCH_DEVICE=cpu (accelerate would pass
device_id "cpu:0", which FSDP1 refuses for CPU parameters), sync_module_states=False (FSDP1 cannot broadcast CPU
modules) and use_orig_params=True (LoRA mixes frozen and trainable weights in a unit).

Every run: the tiny fixture Llama with LoRA on every linear layer, 4 equal rows (2 per process, no gradient
accumulation), 2 SGD steps (lr 0.1, no clipping), DeftConfig with ADA-DEFT and the sparsity set-point, a checkpoint
after each step, then `trainer.save_model(DIR)` (ADA-DEFT weights and inference thresholds). Results: each step's
gradients after the engine's reduction (whole tensors: DTensor.full_tensor() under FSDP2, summon_full_params under
FSDP1), the logs, the files written.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
for path in (HERE.parent / "plugins", HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from fixtures import make_batch, make_model, make_tokenizer  # noqa: E402
from processes import end_distributed_worker  # noqa: E402
from reference import dataset_from_batch, disable_dropout, lora_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402

from deft_common import THRESHOLDS_FILE, DeftConfig  # noqa: E402
from deft_common.adaptive import WEIGHTS_FILE  # noqa: E402

CONFIG = DeftConfig(coef=2.0, eps=1e-3, threshold=0.02, adaptive=True, sparsity_setpoint=0.5, calibration_batches=1)
ROWS, SEQ_LEN, STEPS = 4, 8, 2
ENGINES = {
    "single": {},
    "ddp": {},
    "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                     "state_dict_type": "SHARDED_STATE_DICT"}},
    "fsdp1": {"fsdp": "full_shard", "fsdp_config": {"version": 1, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                     "sync_module_states": False, "use_orig_params": True,
                                                     "state_dict_type": "SHARDED_STATE_DICT"}},
}
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def force_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # Also in the shared process state, as accelerate's GPU path sets it: an AcceleratorState made again
            # later (accelerate's optimizer wrapper makes one) would otherwise copy MULTI_CPU back.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_with_fsdp_on_cpu
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"


def plain_name(name: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


class FullGrads(TrainerCallback):
    """The whole gradient of every trainable parameter before each optimizer step (a collective under FSDP: every
    process runs it)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.modes: list[str] = []  # accelerate's distributed type at each optimizer step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        from accelerate.state import PartialState
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.modes.append(PartialState().distributed_type.name)

        if FullyShardedDataParallel.fsdp_modules(model):  # FSDP1: views into sharded flat parameters
            with FullyShardedDataParallel.summon_full_params(model, writeback=False, with_grads=True):
                self.grads.append(self._read(model))
        else:
            self.grads.append(self._read(model))

    @staticmethod
    def _read(model) -> dict[str, torch.Tensor]:
        grads = {}
        for name, param in model.named_parameters():
            if param.requires_grad and param.grad is not None:
                grad = param.grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                grads[plain_name(name)] = grad.detach().clone().float()
        return grads


def build(kind: str, engine: str, output_dir: pathlib.Path, callbacks, world: int):
    from deft_hf import DeftCallback, DeftTrainerMixin

    batch = make_batch("llama", batch_size=ROWS, seq_len=SEQ_LEN, padding=False)
    model = disable_dropout(lora_model(make_model("llama")))
    common = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True, optim="sgd",
                  learning_rate=0.1, max_grad_norm=0, logging_steps=1, per_device_train_batch_size=ROWS // world,
                  gradient_accumulation_steps=1, max_steps=STEPS, seed=0, save_strategy="steps", save_steps=1,
                  **ENGINES[engine])
    if kind == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer

        from deft_trl import DeftSFTMixin

        class DeftSFTTrainer(DeftSFTMixin, SFTTrainer):
            pass

        rows = datasets.Dataset.from_dict({"input_ids": batch["input_ids"].tolist()})
        return DeftSFTTrainer(model=model, args=SFTConfig(**common, bf16=False), train_dataset=rows,
                              processing_class=make_tokenizer(), callbacks=callbacks, deft_config=CONFIG)
    common = dict(model=model, args=TrainingArguments(**common), train_dataset=dataset_from_batch(batch),
                  data_collator=default_data_collator)
    if kind in ("mixin", "resume"):
        cls = type("DeftTrainer", (DeftTrainerMixin, Trainer), {})
        return cls(**common, callbacks=callbacks, deft_config=CONFIG)
    return Trainer(**common, callbacks=[*callbacks, DeftCallback(CONFIG)])


def train(kind: str, engine: str, directory: pathlib.Path, world: int = 1) -> dict:
    """One run (see the module docstring); its results."""
    if engine in ("single", "ddp"):
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by an earlier run's accelerator: FSDP1 by default
    capture = FullGrads()
    run_dir = directory / f"{engine}_{'mixin' if kind == 'resume' else kind}"
    trainer = build(kind, engine, run_dir / ("resumed" if kind == "resume" else "out"), [capture], world)
    if kind == "resume":
        trainer.train(resume_from_checkpoint=str(run_dir / "out" / "checkpoint-1"))
    else:
        trainer.train()
    final = run_dir / ("final_resumed" if kind == "resume" else "final")
    trainer.save_model(str(final))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 wrote the files
    core_error = core_logits = None
    if kind == "mixin":  # deft_common's one-process save: the whole logits, or refused with the way out
        from deft_common import DeftConfigError, save_layer_weights

        try:
            written = save_layer_weights(trainer.model, run_dir / f"core{trainer.args.process_index}")
            core_logits = json.loads(written.read_text())["logits"]
        except DeftConfigError as error:
            core_error = str(error)
    out = run_dir / ("resumed" if kind == "resume" else "out")
    checkpoints = {}
    for step in range(1, STEPS + 1):
        folder = out / f"checkpoint-{step}"
        if folder.is_dir():
            state = json.loads((folder / "trainer_state.json").read_text())
            checkpoints[step] = {
                "state_logits": state["stateful_callbacks"].get("DeftTrainingState", {}).get("adaptive_logits"),
                "file_logits": json.loads((folder / WEIGHTS_FILE).read_text())["logits"],
            }
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "grads": capture.grads,
        "logs": logs,
        "threshold_logs": [entry for entry in trainer.state.log_history if "deft/inference_sparsity" in entry],
        "final_dir": str(final),
        "adaptive": json.loads((final / WEIGHTS_FILE).read_text()),
        "thresholds": json.loads((final / THRESHOLDS_FILE).read_text()),
        "checkpoints": checkpoints,
        "core_save_error": core_error,
        "core_logits": core_logits,
        "world_size": trainer.args.world_size,
        "fsdp": getattr(trainer, "is_fsdp_enabled", False),
        "modes": capture.modes,
        "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
        "wrapped": type(trainer.model_wrapped).__name__,
    }


def main(out: str, runs: str) -> None:
    force_fsdp_on_cpu()
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    directory = pathlib.Path(out).parent
    results = {}
    for run in runs.split(","):
        engine, kind = run.split(":")
        print(f"fsdp_worker: {run}", flush=True)  # a failure's traceback follows the run it belongs to
        results[run] = train(kind, engine, directory, world)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    end_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
