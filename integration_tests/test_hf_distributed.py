"""deft_hf with 2 data-parallel processes (CPU, gloo) and gradient accumulation: the density term must be scaled so
that 2 processes × 1 row × 2 accumulation steps give the gradients of one process on the whole 4-row batch."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from fixtures import make_batch, make_model
from processes import subprocess_env
from reference import assert_grads_close, disable_dropout, reference_step

from deft_common import DeftConfig

WORKER = pathlib.Path(__file__).resolve().parent / "hf_ddp_worker.py"


def test_two_processes_with_accumulation_equal_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "results.pt"
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = torch.load(out)

    config = DeftConfig(coef=2.0)
    batch = make_batch("llama", batch_size=4, seq_len=8, padding=False)
    model = disable_dropout(make_model("llama"))
    ref_loss, ref_grads = reference_step(model, batch, config)
    task_loss, _ = reference_step(model, batch, DeftConfig(coef=0.0))
    for kind, result in results.items():
        assert_grads_close(result["grads"], ref_grads, rtol=1e-4)
        assert result["log"]["loss"] == pytest.approx(ref_loss, rel=1e-5), kind
        assert result["log"]["deft/loss"] == pytest.approx(ref_loss - task_loss, rel=1e-4), kind
