"""DEFT with TRL's SFTTrainer: LoRA supervised fine-tuning with the density loss, through a trainer mixin.

Runs offline on a CPU in seconds against a tiny random model (the numbers mean nothing). From the repository root:

    python examples/make_tiny_model.py --family opt    # writes /tmp/deft-tiny/{model, text.jsonl}
    export PYTHONPATH=$PWD:$PWD/plugins                # not needed after `pip install -e .`
    python examples/trl_sft.py                         # --coef 0: the same run, density measured only

TRL >= 1.15 computes the SFT loss itself and ignores the model's outputs.loss, so a callback cannot add the density
term there: the mixin adds it in compute_loss (and works on older TRL too). The lines marked `# DEFT` are all it takes.
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from deft_common import DeftConfig  # DEFT
from deft_trl import DeftSFTMixin  # DEFT


class DeftSFTTrainer(DeftSFTMixin, SFTTrainer):  # DEFT: the mixin first
    pass


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="/tmp/deft-tiny/model")
parser.add_argument("--data", default="/tmp/deft-tiny/text.jsonl", help="JSON lines with a 'text' field")
parser.add_argument("--output-dir", default="/tmp/deft-tiny/out-trl")
parser.add_argument("--coef", type=float, default=1.0, help="weight of the density loss (0: only measure density)")
parser.add_argument("--max-steps", type=int, default=30)
args = parser.parse_args()

trainer = DeftSFTTrainer(
    model=args.model,
    args=SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                   learning_rate=1e-2, max_length=64, logging_steps=10, save_strategy="no", report_to=[],
                   use_cpu=True, bf16=False),
    train_dataset=load_dataset("json", data_files=args.data, split="train"),
    processing_class=AutoTokenizer.from_pretrained(args.model),
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    deft_config=DeftConfig(coef=args.coef),  # DEFT
)
trainer.train()

# deft/density (fraction of non-zero MLP activations) and deft/loss are in the logs, beside TRL's own metrics.
densities = [log["deft/density"] for log in trainer.state.log_history if "deft/density" in log]
print(f"deft/density: {densities[0]:.4f} (first log) -> {densities[-1]:.4f} (last log)")
