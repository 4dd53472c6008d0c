"""Run by test_hf_distributed.py under `torch.distributed.run --nproc_per_node 2` (CPU, gloo): one optimizer step
of the same 4-row batch (2 processes × 1 row × 2 accumulation steps) through DeftCallback and DeftTrainerMixin.
Rank 0 saves the gradients (after DDP's averaging) and the first log entry of each to the file given as argv[1]."""

import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "plugins")]

import torch  # noqa: E402
from fixtures import make_batch, make_model  # noqa: E402
from processes import end_distributed_worker  # noqa: E402
from reference import GradCapture, dataset_from_batch, disable_dropout  # noqa: E402
from test_hf import build_trainer, train_logs  # noqa: E402

from deft_common import DeftConfig  # noqa: E402

COEF = 2.0


def main(out_path: str) -> None:
    batch = make_batch("llama", batch_size=4, seq_len=8, padding=False)
    results = {}
    for kind in ("callback", "mixin"):
        capture = GradCapture()
        trainer = build_trainer(kind, disable_dropout(make_model("llama")), dataset_from_batch(batch),
                                DeftConfig(coef=COEF), pathlib.Path(tempfile.mkdtemp()), callbacks=[capture],
                                per_device_train_batch_size=1, gradient_accumulation_steps=2)
        trainer.train()
        assert trainer.args.world_size == 2, trainer.args.world_size
        results[kind] = {"grads": capture.grads, "log": train_logs(trainer)[0]}
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_path)
    end_distributed_worker()


if __name__ == "__main__":
    main(sys.argv[1])
