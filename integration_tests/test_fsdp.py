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
            assert set(result["modes"]) == {"FSDP"}, run  # FSDP through every step, not only at setup
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


# A second Axolotl plugin whose trainer (under DEFT's: deft_axolotl builds on it) reports, on every training step,
# the task loss averaged over the processes as the logged loss is, and once per process what the model is wrapped in.
OBSERVER_PLUGIN = '''
import torch.distributed as dist
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin
from torch.distributed.tensor import DTensor


class ObserverTrainer(AxolotlTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            task = (out[0] if isinstance(out, tuple) else out).detach().clone()
            dist.all_reduce(task)
            self.store_metrics({"observer/task_loss": task.item() / dist.get_world_size()})
            if not getattr(self, "_observed", False):
                self._observed = True
                sharded = sum(isinstance(p, DTensor) for p in model.parameters())
                print(f"OBSERVER rank {dist.get_rank()} of {dist.get_world_size()}: {type(model).__name__}, "
                      f"{self.accelerator.distributed_type}, is_fsdp2 {self.accelerator.is_fsdp2}, "
                      f"{sharded} DTensor params", flush=True)
        return out


class ObserverPlugin(BasePlugin):
    def get_trainer_cls(self, cfg):
        return ObserverTrainer
'''


def test_axolotl_fsdp2(tmp_path):
    """`axolotl train` (python -m axolotl.cli.train) with `fsdp_version: 2` and the `deft:` block (density loss,
    set-point 0.5, inference thresholds at 0.8) on 2 CPU processes (gloo), LoRA on the tiny Llama, 2 steps.

    Axolotl 0.19.0 cannot run FSDP2 on a CPU-only torch by itself: axolotl_fsdp_launch.py (see its docstring) sets
    ACCELERATE_USE_CPU (as `accelerate launch --cpu` does), wraps accelerate's AcceleratorState as fsdp_worker.py does
    (plus PartialState's shared distributed_type, which accelerate's own optimizer wrapper reads back), and makes
    axolotl.utils.distributed.build_parallelism_config build its device mesh for "cpu" instead of the hard-coded
    "cuda" (whose init_device_mesh calls torch.cuda.set_device); then it runs Axolotl's CLI module unchanged.
    Checked: the model is FSDP2-sharded on 2 processes; each step's logged loss is the task loss plus DEFT's term
    (deft/loss, > 0), both averaged over the processes; the set-point holds the density at 0.5; the thresholds
    are written once; the LoRA adapter is saved."""
    pytest.importorskip("axolotl", reason="Axolotl is installed only in the axolotl environment (axolotl 0.19.0)")
    import os
    import re

    import yaml
    from fixtures import save_model_dir, write_alpaca_jsonl
    from processes import subprocess_env
    from test_axolotl import LORA, Run, base_config

    from deft_common import SparsityThresholds

    save_model_dir("llama", tmp_path / "model")
    write_alpaca_jsonl(tmp_path / "alpaca.jsonl", 16)
    (tmp_path / "observer_plugin.py").write_text(OBSERVER_PLUGIN)
    config = {
        **base_config(tmp_path, "fsdp2"),
        **LORA,
        "max_steps": 2,
        "plugins": ["deft_axolotl.DeftPlugin", "observer_plugin.ObserverPlugin"],
        "deft": {"coef": 1.0, "eps": 1e-3, "sparsity_setpoint": 0.5, "inference_sparsity": 0.8,
                 "calibration_batches": 1},
        "fsdp_version": 2,
        "fsdp_config": {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                        "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True},
    }
    (tmp_path / "fsdp2.yml").write_text(yaml.safe_dump(config))
    env = subprocess_env()
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tmp_path), env["PYTHONPATH"]]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "axolotl_fsdp_launch.py"), str(tmp_path / "fsdp2.yml")]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    run = Run("fsdp2", config, proc.returncode, proc.stdout + proc.stderr)
    assert run.returncode == 0, run

    pattern = r"OBSERVER rank (\d) of (\d): (\w+), DistributedType\.(\w+), is_fsdp2 (\w+), (\d+) DTensor"
    observed = sorted(re.findall(pattern, run.output))
    assert [o[:2] for o in observed] == [("0", "2"), ("1", "2")], run
    for _, _, wrapped, distributed_type, is_fsdp2, sharded in observed:  # at the first step, after accelerate's prepare
        assert (wrapped, distributed_type, is_fsdp2) == ("FSDPPeftModelForCausalLM", "FSDP", "True"), observed
        assert int(sharded) > 0, observed  # fully_shard made the weights DTensors

    logs = run.logs
    assert len(logs) == 2, run
    for entry in logs:
        assert entry["deft/loss"] > 0.1, entry  # the density term is a clear part of the loss
        # Axolotl logs 4 significant digits
        assert entry["loss"] == pytest.approx(entry["observer/task_loss"] + entry["deft/loss"], abs=2e-3), entry
        assert entry["deft/sparsity_setpoint"] == pytest.approx(0.5), entry
        assert entry["deft/density"] == pytest.approx(0.5, abs=0.01), entry  # τ from the counts of both processes
        assert {"deft/density/model.layers.0.mlp", "deft/density/model.layers.1.mlp"} <= entry.keys(), entry

    output_dir = pathlib.Path(config["output_dir"])
    assert run.output.count("DEFT: inference thresholds (sparsity 0.8") == 1, run
    saved = SparsityThresholds.load(output_dir)
    assert saved.calibrated == pytest.approx({name: 0.8 for name in saved.thresholds}, abs=1e-6)
    assert sorted(saved.thresholds) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert run.output.count("Saved FSDP2-gathered LoRA adapter") == 1, run
    assert (output_dir / "adapter_model.safetensors").is_file()
