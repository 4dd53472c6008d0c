"""DEFT under FSDP2 (and FSDP1, and DDP) with the HF Trainer, on CPU: 2 processes (gloo) against one process on the
same rows.

How FSDP runs on CPU here: accelerate turns FSDP on only for GPU-like backends, so fsdp_worker.py wraps
accelerate's AcceleratorState to take the FSDP plugin that transformers hands it (TrainingArguments(fsdp=...,
fsdp_config={"version": 2, ...})) on CPU processes too; everything else (fully_shard / FullyShardedDataParallel, the
optimizer, the Trainer's FSDP branches, checkpointing) is accelerate's and transformers' own code. See the worker's
docstring for FSDP1's extra settings. No GPU runs in CI: NCCL, mixed precision and CPU offload are not covered.

One worker command (2 processes, ~20 s) trains each run for 2 SGD steps on 4 equal rows (2 per process) with
ADA-DEFT and the sparsity set-point, a checkpoint after each step, then save_model; the one-process reference
trains the same rows in this process. Checked: every step's loss, density term and gradients (LoRA weights and
ADA-DEFT's logits, after the engine's reduction) equal one process's; the ADA-DEFT weights saved beside the model
and in each checkpoint (file and trainer_state.json) are the trained ones; a run resumed from checkpoint-1 ends
where the uninterrupted one does; the inference thresholds are written once and equal a DDP run's.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "fsdp_worker.py"
RUNS = ["ddp:mixin", "fsdp2:mixin", "fsdp2:resume", "fsdp2:callback", "fsdp2:trl", "fsdp1:mixin"]  # ddp first:
# an FSDP run leaves ACCELERATE_USE_FSDP set in the processes (the worker clears it for ddp, order kept anyway)
TRAINED = ["ddp:mixin", "fsdp2:mixin", "fsdp2:callback", "fsdp2:trl", "fsdp1:mixin"]

pytest.importorskip("accelerate")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from processes import subprocess_env

    pytest.importorskip("trl")
    out = tmp_path_factory.mktemp("fsdp") / "results.pt"
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(out), ",".join(RUNS)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The one-process reference: the same rows, one micro-batch of 4 per step, no torch.distributed."""
    import fsdp_worker

    pytest.importorskip("trl")
    directory = tmp_path_factory.mktemp("single")
    return {kind: fsdp_worker.train(kind, "single", directory) for kind in ("mixin", "trl")}


def _reference(single: dict, run: str) -> dict:
    return single["trl" if run.endswith(":trl") else "mixin"]


def _assert_close(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))[:5]
    for name, want in expected.items():
        error = (actual[name].double() - want.double()).norm().item()
        assert error <= rtol * want.double().norm().item() + 1e-8, f"{name}: |diff| {error:.3g} vs |grad| {want.norm():.3g}"


def test_the_runs_really_use_fsdp_on_two_processes(runs):
    for run in TRAINED:
        result = runs[run]
        assert result["world_size"] == 2, run
        engine = run.split(":")[0]
        if engine == "ddp":
            assert not result["fsdp"] and result["wrapped"] == "DistributedDataParallel"
        else:
            assert result["fsdp"] and result["fsdp_version"] == int(engine[-1]), run
            assert result["wrapped"] == ("FullyShardedDataParallel" if engine == "fsdp1" else "FSDPPeftModel"), run


@pytest.mark.parametrize("run", TRAINED)
def test_loss_and_gradients_equal_one_process_on_the_same_rows(runs, single, run):
    result, reference = runs[run], _reference(single, run)
    assert len(result["grads"]) == len(reference["grads"]) == 2
    for step, (grads, want) in enumerate(zip(result["grads"], reference["grads"])):
        logits = [name for name in want if name.endswith("deft_adaptive.logits")]
        assert len(logits) == 1, "ADA-DEFT's logits got no gradient"
        _assert_close({n: g for n, g in grads.items() if n not in logits},
                      {n: g for n, g in want.items() if n not in logits}, rtol=1e-4)
        # ADA-DEFT's logits (step 0: uniform p, KL gradient 0; step 1: p moved, KL gradient not 0)
        _assert_close({n: grads[n] for n in logits}, {n: want[n] for n in logits}, rtol=1e-3)
        assert want[logits[0]].abs().max() > 1e-3, f"step {step}: the logits' gradient is too small to compare"
    for got, want in zip(result["logs"], reference["logs"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["deft/loss"] == pytest.approx(want["deft/loss"], rel=1e-4)
        assert got["deft/loss"] > 0.1  # the density term is a clear part of the loss
        assert got["deft/density"] == pytest.approx(want["deft/density"], rel=1e-4)
        assert got["deft/sparsity_setpoint"] == pytest.approx(0.5)  # τ over both processes: one process's density
        assert got["deft/density"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("run", TRAINED)
def test_ada_deft_weights_are_saved_and_checkpointed_whole(runs, single, run):
    from fixtures import make_model
    from reference import assert_ada_deft_reloads

    result, reference = runs[run], _reference(single, run)
    logits = torch.tensor(result["adaptive"]["logits"])
    assert logits.numel() == 2  # every block, not a shard
    assert torch.allclose(logits, torch.tensor(reference["adaptive"]["logits"]), rtol=1e-4, atol=1e-6)
    for step in (1, 2):  # trainer_state.json (for resuming) and the file beside the checkpoint's adapter
        checkpoint = result["checkpoints"][step]
        assert checkpoint["state_logits"] == checkpoint["file_logits"]
    assert result["checkpoints"][2]["file_logits"] == result["adaptive"]["logits"]
    assert_ada_deft_reloads(result["final_dir"], make_model("llama"), logits)


def test_deft_common_alone_saves_the_whole_weights_or_refuses_with_the_way_out(runs):
    # After save_model's calibration forwards FSDP2 (and FSDP1) may leave the root unit unsharded: then the plain
    # save reads the whole logits; where this process holds a shard it must refuse, naming the gathering call.
    for run in ("ddp:mixin", "fsdp2:mixin", "fsdp1:mixin"):
        result = runs[run]
        if result["core_save_error"] is None:
            assert result["core_logits"] == result["adaptive"]["logits"], run
        else:
            assert "save_gathered_layer_weights" in result["core_save_error"], run
    assert runs["ddp:mixin"]["core_save_error"] is None  # DDP replicates it


def test_resuming_from_a_fsdp2_checkpoint_continues_the_ada_deft_weights(runs, single):
    resumed, uninterrupted = runs["fsdp2:resume"], runs["fsdp2:mixin"]
    assert len(resumed["grads"]) == 1  # only step 2 ran
    _assert_close(resumed["grads"][0], single["mixin"]["grads"][1], rtol=1e-3)
    assert resumed["adaptive"]["logits"] == pytest.approx(uninterrupted["adaptive"]["logits"], rel=1e-6)


@pytest.mark.parametrize("run", [r for r in TRAINED if r != "ddp:mixin"])
def test_inference_thresholds_are_written_once_and_equal_a_ddp_runs(runs, single, run):
    result, ddp = runs[run], runs["ddp:mixin"]
    assert len(result["threshold_logs"]) == 1  # calibrated and logged once, by save_model
    for name, block in ddp["thresholds"]["blocks"].items():
        assert result["thresholds"]["blocks"][name]["threshold"] == pytest.approx(block["threshold"], rel=1e-6)
    assert result["thresholds"]["tokens"] == ddp["thresholds"]["tokens"] == _reference(single, run)["thresholds"]["tokens"]


def test_axolotl_fsdp2():
    """Axolotl's `fsdp_version: 2` with the `deft:` block cannot run on a CPU-only torch: Axolotl 0.19.0 builds its
    FSDP device mesh for CUDA unconditionally (axolotl.utils.distributed.build_parallelism_config calls
    ParallelismConfig.build_device_mesh("cuda"), whose init_device_mesh calls torch.cuda.set_device), before any
    trainer or DEFT code runs. Axolotl builds its trainer on the HF Trainer with DeftTrainerMixin (deft_axolotl),
    which the HF FSDP2 runs above test."""
    pytest.importorskip("axolotl", reason="Axolotl is installed only in the axolotl environment (axolotl 0.19.0)")
    import inspect

    from axolotl.utils import distributed

    source = inspect.getsource(distributed)
    if 'build_device_mesh("cuda")' in source and not torch.cuda.is_available():
        pytest.skip("axolotl builds its FSDP device mesh for CUDA only (build_parallelism_config: "
                    "build_device_mesh(\"cuda\") -> torch.cuda.set_device), so fsdp_version: 2 cannot run on CPU")
    pytest.fail("this Axolotl no longer hard-codes a CUDA device mesh (or a GPU is present): add an Axolotl "
                "fsdp_version: 2 run with the deft: block to test_fsdp.py")
