"""DEFT with the Hugging Face Trainer: LoRA fine-tuning of a causal LM, DEFT added by one callback.

Runs offline on a CPU in seconds against a tiny random model (the numbers mean nothing). From the repository root:

    python examples/make_tiny_model.py --family opt    # writes /tmp/deft-tiny/{model, text.jsonl}
    export PYTHONPATH=$PWD:$PWD/plugins                # not needed after `pip install -e .`
    python examples/hf_trainer.py                      # --coef 0: the same run, density measured only

The lines marked `# DEFT` are all it takes; the rest is plain transformers + PEFT. For your own trainer class, use
`class MyTrainer(DeftTrainerMixin, Trainer)` and `MyTrainer(..., deft_config=DeftConfig(...))` instead.
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from deft_common import DeftConfig  # DEFT
from deft_hf import DeftCallback  # DEFT

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="/tmp/deft-tiny/model")
parser.add_argument("--data", default="/tmp/deft-tiny/text.jsonl", help="JSON lines with a 'text' field")
parser.add_argument("--output-dir", default="/tmp/deft-tiny/out-hf")
parser.add_argument("--coef", type=float, default=1.0, help="weight of the density loss (0: only measure density)")
parser.add_argument("--max-steps", type=int, default=30)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
data = load_dataset("json", data_files=args.data, split="train")
data = data.map(lambda row: tokenizer(row["text"], truncation=True, max_length=64), remove_columns=["text"])

trainer = Trainer(
    model=model,
    args=TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8,
                           learning_rate=1e-2, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True),
    train_dataset=data,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    callbacks=[DeftCallback(DeftConfig(coef=args.coef))],  # DEFT: the density loss joins the optimised loss
)
trainer.train()

# deft/density (fraction of non-zero MLP activations) and deft/loss are in the logs, like the task loss.
densities = [log["deft/density"] for log in trainer.state.log_history if "deft/density" in log]
print(f"deft/density: {densities[0]:.4f} (first log) -> {densities[-1]:.4f} (last log)")
