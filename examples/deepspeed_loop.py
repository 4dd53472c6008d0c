"""DEFT in a raw DeepSpeed training loop: a loss hook on the model, the loop stays as it is.

Runs offline on a CPU (gloo backend) in under a minute against a tiny random model (the numbers mean nothing); the
first DeepSpeed run on a machine also compiles a small CPU op. From the repository root:

    python examples/make_tiny_model.py --family opt    # writes /tmp/deft-tiny/{model, text.jsonl}
    export PYTHONPATH=$PWD:$PWD/plugins                # not needed after `pip install -e .`
    python examples/deepspeed_loop.py                  # one process; --coef 0: density measured only
    torchrun --nproc_per_node 2 examples/deepspeed_loop.py   # two processes (the logged density is global)

`DeftLossHook(model, DeftConfig(...))` before `deepspeed.initialize` makes `out.loss` hold task loss + coef × density
loss, so `engine.backward(out.loss)` trains both, under every ZeRO stage and with gradient accumulation (deepspeed <
0.19.8 with gradient_accumulation_steps > 1: the hook explains the workaround). The lines marked `# DEFT` are all it takes.
"""

import argparse
import os

import deepspeed
import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

from deft_common import DeftConfig  # DEFT
from deft_deepspeed import DeftLossHook  # DEFT

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="/tmp/deft-tiny/model")
parser.add_argument("--data", default="/tmp/deft-tiny/text.jsonl", help="JSON lines with a 'text' field")
parser.add_argument("--deepspeed-config", default=os.path.join(os.path.dirname(__file__), "deepspeed_zero2.json"))
parser.add_argument("--coef", type=float, default=1.0, help="weight of the density loss (0: only measure density)")
parser.add_argument("--max-steps", type=int, default=30)
args = parser.parse_args()

# Without a launcher: a one-process group (torchrun / the deepspeed launcher set these themselves).
for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "LOCAL_RANK": "0",
                    "WORLD_SIZE": "1"}.items():
    os.environ.setdefault(name, value)
deepspeed.init_distributed(dist_backend="gloo")  # gloo: CPU; use nccl on GPUs

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
hook = DeftLossHook(model, DeftConfig(coef=args.coef))  # DEFT: on the module, before deepspeed.initialize
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=args.deepspeed_config)

data = load_dataset("json", data_files=args.data, split="train")
data = data.map(lambda row: tokenizer(row["text"], truncation=True, max_length=64), remove_columns=["text"])
loader = torch.utils.data.DataLoader(
    data, batch_size=engine.train_micro_batch_size_per_gpu(),
    collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    sampler=torch.utils.data.distributed.DistributedSampler(data, seed=0),  # each process its share of the rows
)

densities, logged_step = [], 0
while engine.global_steps < args.max_steps:
    for batch in loader:
        out = engine(**{key: value.to(engine.device) for key, value in batch.items()})  # out.loss includes DEFT's term
        engine.backward(out.loss)
        engine.step()
        if engine.global_steps % 10 == 0 and engine.global_steps != logged_step:  # every 10 optimizer steps
            logged_step = engine.global_steps
            metrics = hook.last_metrics()  # DEFT: {"deft/density", "deft/loss"} since the last call, all processes
            densities.append(metrics["deft/density"])
            if engine.global_rank == 0:
                print(f"step {engine.global_steps}: loss {out.loss.item():.4f} {metrics}")
        if engine.global_steps >= args.max_steps:
            break

if engine.global_rank == 0:
    print(f"deft/density: {densities[0]:.4f} (first log) -> {densities[-1]:.4f} (last log)")
