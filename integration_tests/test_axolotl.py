"""The DEFT Axolotl plugin: real `axolotl train` runs and the DEFT Axolotl trainer against deft_common by hand.

The runs are `python -m axolotl.cli.train config.yml` subprocesses (what `axolotl train` executes), offline, on the
tiny fixture llama saved to a temp folder, a few steps each. They start together, two at a time, the first time a
test needs one (the `runs` fixture), so the whole file takes about as long as three runs. The rest run in-process.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("axolotl", reason="Axolotl is installed only in the axolotl environment (axolotl 0.19.0)")

import deft_axolotl  # noqa: E402
import deft_common  # noqa: E402
from deft_common import DeftConfig, DeftConfigError  # noqa: E402
from fixtures import save_model_dir, write_alpaca_jsonl  # noqa: E402
from processes import free_port  # noqa: E402
from reference import assert_ada_deft_reloads, assert_grads_close, reference_step, trainable_grads  # noqa: E402

DEFT = "deft_axolotl.DeftPlugin"
MARKER = "marker_plugin.MarkerPlugin"

# A second plugin with its own trainer class: DEFT must build on it, not replace it.
MARKER_PLUGIN = '''
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin


class MarkerTrainer(AxolotlTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.store_metrics({"marker/calls": 1.0}, reduction="sum")
        return super().compute_loss(model, inputs, *args, **kwargs)


class MarkerPlugin(BasePlugin):
    def get_trainer_cls(self, cfg):
        return MarkerTrainer
'''

# Axolotl + DeepSpeed on CPU: Axolotl would start torch.distributed on NCCL; started on gloo first, it is reused.
DEEPSPEED_LAUNCHER = '''
import sys

import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group("gloo", rank=0, world_size=1)
    from axolotl.cli.train import do_cli

    do_cli(sys.argv[1])
'''
ZERO2 = {
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}

LORA = {
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "v_proj"],
}


def base_config(work: pathlib.Path, name: str) -> dict:
    """A CPU-friendly Axolotl config for the fixture llama (fp32, plain attention, torch AdamW, no saving midway)."""
    return {
        "base_model": str(work / "model"),
        "model_type": "LlamaForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(work / "alpaca.jsonl"), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(work / f"prepared_{name}"),
        "val_set_size": 0,
        "output_dir": str(work / f"out_{name}"),
        "sequence_len": 128,
        "sample_packing": False,
        "dataset_num_proc": 1,  # no worker processes: faster for 32 rows
        "dataloader_num_workers": 0,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "num_epochs": 1,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "learning_rate": 0.001,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "flash_attention": False,
        "sdp_attention": False,
        "gradient_checkpointing": False,
        "special_tokens": {"pad_token": "<pad>"},
    }


def run_configs(work: pathlib.Path) -> dict[str, tuple[dict, bool]]:
    """name -> (config, through the DeepSpeed launcher)."""
    runs = {
        # LoRA with DEFT and a second plugin whose trainer DEFT must extend
        "lora": {**LORA, "plugins": [DEFT, MARKER], "deft": {"coef": 1.0, "eps": "1e-7"}},
        # the same without the plugin
        "no_plugin": {**LORA},
        # QLoRA (bitsandbytes 4-bit on CPU) with LoRA on the MLP too, and gradient checkpointing
        "qlora_gc": {
            **LORA,
            "adapter": "qlora",
            "load_in_4bit": True,
            "lora_target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
            "gradient_checkpointing": True,
            "plugins": [DEFT],
            "deft": {},
        },
        # full fine-tuning with gradient checkpointing (Axolotl 0.19 would make it reentrant); a strong density
        # loss and τ > 0, so that the measured density visibly falls in five steps
        "full_gc": {
            "gradient_checkpointing": True,
            "learning_rate": 0.01,
            "max_steps": 5,
            "plugins": [DEFT],
            "deft": {"coef": 5.0, "eps": 1e-3, "threshold": 0.01},
        },
        # a typo in the block
        "typo": {**LORA, "plugins": [DEFT], "deft": {"cofe": 1.0}},
        # ADA-DEFT: the layer weights train with LoRA and land in output_dir and the checkpoint; with inference
        # thresholds calibrated on two training batches
        "adaptive": {
            **LORA,
            "plugins": [DEFT],
            "deft": {"adaptive": True, "skip_budget": 1, "inference_sparsity": 0.9, "calibration_batches": 2},
            "save_strategy": "steps",
            "save_steps": 3,
        },
        # the sparsity set-point (no density loss), every 2nd step dense, gradient accumulation 2; the thresholds
        # follow the set-point
        "setpoint": {
            **LORA,
            "plugins": [DEFT],
            "deft": {"coef": 0.0, "sparsity_setpoint": 0.8, "setpoint_ramp_steps": 2, "setpoint_dense_every": 2},
            "gradient_accumulation_steps": 2,
        },
        # DeepSpeed ZeRO-2, gradient accumulation 2
        "deepspeed": {
            **LORA,
            "plugins": [DEFT],
            "deft": {"coef": 1.0, "inference_sparsity": 0.8},
            "deepspeed": str(work / "zero2.json"),
            "gradient_accumulation_steps": 2,
        },
    }
    return {name: ({**base_config(work, name), **extra}, name == "deepspeed") for name, extra in runs.items()}


class Run:
    def __init__(self, name: str, config: dict, returncode: int, output: str):
        self.name, self.config, self.returncode, self.output = name, config, returncode, output

    @property
    def logs(self) -> list[dict]:
        """The training log lines ({'loss': ...} dicts that transformers prints), values as floats."""
        out = []
        for match in re.finditer(r"\{'loss': .*?\}", self.output):
            entry = ast.literal_eval(match.group(0))
            out.append({k: float(v) if isinstance(v, str) else v for k, v in entry.items()})
        return out

    def __repr__(self):
        return f"<axolotl run {self.name}: exit {self.returncode}; output tail:\n{self.output[-4000:]}>"


def _launch(work: pathlib.Path, name: str, config: dict, deepspeed: bool) -> Run:
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    entry = [str(work / "ds_launch.py")] if deepspeed else ["-m", "axolotl.cli.train"]
    command = [sys.executable, *entry, str(path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_python_path(work))}
    if deepspeed:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    return Run(name, config, proc.returncode, proc.stdout + proc.stderr)


def _python_path(work: pathlib.Path) -> list[str]:
    """Where this process finds deft_common and deft_axolotl (source tree or installed), plus the marker plugin."""
    packages = [pathlib.Path(deft_axolotl.__file__).parents[1], pathlib.Path(deft_common.__file__).parents[1]]
    return [str(work), *map(str, packages)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    work = tmp_path_factory.mktemp("axolotl")
    save_model_dir("llama", work / "model")
    write_alpaca_jsonl(work / "alpaca.jsonl", 32)
    (work / "marker_plugin.py").write_text(MARKER_PLUGIN)
    (work / "ds_launch.py").write_text(DEEPSPEED_LAUNCHER)
    (work / "zero2.json").write_text(json.dumps(ZERO2))
    return work


@pytest.fixture(scope="module")
def runs(work) -> dict[str, Run]:
    configs = run_configs(work)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_launch, work, name, cfg, ds) for name, (cfg, ds) in configs.items()}
        return {name: future.result() for name, future in futures.items()}


def _assert_deft_logged(run: Run) -> list[dict]:
    assert run.returncode == 0, run
    logs = run.logs
    assert len(logs) == run.config["max_steps"], run
    for entry in logs:
        assert 0.0 <= entry["deft/density"] <= 1.0, entry
        assert entry["deft/loss"] > 0.0, entry
        assert {"deft/density/model.layers.0.mlp", "deft/density/model.layers.1.mlp"} <= entry.keys(), entry
    # Axolotl 0.19 calls post_train twice; the plugin reports once
    assert run.output.count("DEFT: MLP activation density") == 1, run
    return logs


# ------------------------------------------------------------------------------------------------ axolotl train
def test_lora_run_logs_density_alongside_another_plugin(runs):
    run = runs["lora"]
    _assert_deft_logged(run)
    assert all(entry["marker/calls"] == 1.0 for entry in run.logs), "the second plugin's trainer did not run"
    assert "density loss on 2 MLP block(s)" in run.output
    assert (pathlib.Path(run.config["output_dir"]) / "adapter_model.safetensors").exists()


def test_without_the_plugin_no_density_is_logged(runs):
    run = runs["no_plugin"]
    assert run.returncode == 0, run
    assert len(run.logs) == run.config["max_steps"], run
    assert "deft/" not in run.output and "DEFT" not in run.output


def test_qlora_with_gradient_checkpointing(runs):
    run = runs["qlora_gc"]
    _assert_deft_logged(run)
    assert "gradient checkpointing switched to non-reentrant" in run.output
    assert "lora_mlp_kernel set to false" in run.output  # LoRA on the MLP: Axolotl's fused kernel stays off
    assert all(entry["grad_norm"] > 0 for entry in run.logs)


def test_full_finetune_with_gradient_checkpointing_lowers_density(runs):
    run = runs["full_gc"]
    logs = _assert_deft_logged(run)
    assert "gradient checkpointing switched to non-reentrant" in run.output
    assert logs[-1]["deft/density"] < logs[0]["deft/density"] - 0.02, [e["deft/density"] for e in logs]
    assert logs[-1]["deft/loss"] < logs[0]["deft/loss"], [e["deft/loss"] for e in logs]


def test_typo_in_deft_block_stops_axolotl_train(runs):
    run = runs["typo"]
    assert run.returncode != 0, run
    assert "unknown key(s) ['cofe'] in the `deft:` block" in run.output, run
    assert not run.logs


def test_deepspeed_zero2(runs):
    _assert_deft_logged(runs["deepspeed"])


def test_setpoint_ramps_to_its_density(runs):
    run = runs["setpoint"]
    assert run.returncode == 0, run
    logs = run.logs
    assert [entry["deft/sparsity_setpoint"] for entry in logs] == pytest.approx([0.0, 0.4, 0.8]), run
    assert logs[1]["deft/density"] == pytest.approx(1.0), logs  # setpoint_dense_every: 2, the 2nd step is dense
    assert logs[2]["deft/density"] == pytest.approx(0.2, abs=0.01), logs


@pytest.mark.parametrize("name,sparsity,most_tokens", [("adaptive", 0.9, 2 * 2 * 128), ("deepspeed", 0.8, None),
                                                       ("setpoint", 0.8, None)])
def test_inference_thresholds_are_written_into_output_dir(runs, work, name, sparsity, most_tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deft_common import SparsityThresholds

    run = runs[name]
    assert run.returncode == 0, run
    assert run.output.count(f"DEFT: inference thresholds (sparsity {sparsity:g}") == 1, run
    output_dir = pathlib.Path(run.config["output_dir"])
    saved = SparsityThresholds.load(output_dir)
    assert saved.calibrated == pytest.approx({n: sparsity for n in saved.thresholds}, abs=1e-6)
    if most_tokens is not None:  # calibration_batches: 2 of micro_batch_size 2
        assert saved.tokens <= most_tokens
    assert not (output_dir / "checkpoint-3" / "deft_thresholds.json").exists()
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), output_dir)
    assert [site.name for site in saved.sites_in(fresh)] == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_adaptive_weights_train_are_logged_and_saved_in_output_dir(runs, work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["adaptive"]
    logs = _assert_deft_logged(run)
    keys = ["deft/adaptive_weight/model.layers.0.mlp", "deft/adaptive_weight/model.layers.1.mlp"]
    assert [logs[0][k] for k in keys] == pytest.approx([1.0, 1.0])  # uniform at the first step
    assert logs[-1][keys[0]] != pytest.approx(1.0), logs[-1]  # in the optimizer, with gradient
    assert "ADA-DEFT layer weights saved to" in run.output
    output_dir = pathlib.Path(run.config["output_dir"])
    for folder in (output_dir, output_dir / "checkpoint-3"):
        assert (folder / "adapter_model.safetensors").is_file()
        fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "model"), folder)
        assert_ada_deft_reloads(folder, fresh)


# ------------------------------------------------------------------------------------------------ in-process
def _load_cfg(work: pathlib.Path, name: str, **changes):
    """Axolotl's own config loading (what `axolotl train` does before training) of a DEFT LoRA config."""
    from axolotl.cli.config import load_cfg

    config = {**base_config(work, name), **LORA, "plugins": [DEFT], "deft": {"coef": 1.0}, **changes}
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return load_cfg(str(path))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"deft": {"coef": -1.0}}, r"DeftConfig.coef=-1.0 must be >= 0"),
        ({"deft": {"capture": "mlp"}}, r"DeftConfig.capture='mlp' is unknown; use 'act'"),
        ({"deft": {"layers": [0, "x("]}}, r"not a valid regular expression|neither a layer index"),
        ({"deft": "on"}, r"`deft:` must be a block of settings"),
        ({"dfet": {"coef": 1.0}}, r"\['dfet'\] look like a misspelled `deft:` block"),
        ({"deft_coef": 1.0}, r"\['deft_coef'\] look like a misspelled `deft:` block"),
        ({"rl": "dpo"}, r"DEFT does not support preference / RL training"),
        ({"gradient_checkpointing": "offload"}, r"`gradient_checkpointing: offload`"),
        ({"lora_mlp_kernel": True}, r"set `lora_mlp_kernel: false`"),
        ({"deft": {"skip_budget": 1}}, r"DeftConfig.skip_budget selects MLP blocks .* set adaptive=True too"),
        ({"deft": {"adaptive": True, "skip_budget": 1.5}}, r"skip budget 1.5 must be a fraction in \(0, 1\)"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(work, changes, message):
    with pytest.raises((DeftConfigError, ValueError), match=message):
        _load_cfg(work, "bad", **changes)


def test_config_block_reaches_the_trainer_settings(work):
    from deft_axolotl.plugin import deft_config_from

    cfg = _load_cfg(work, "good", deft={"coef": 0.5, "eps": "1e-6", "layers": "1-1", "coef_warmup_steps": 2})
    assert deft_config_from(cfg) == DeftConfig(coef=0.5, eps=1e-6, layers=[1], coef_warmup_steps=2)
    assert cfg.lora_mlp_kernel is False
    assert deft_config_from(_load_cfg(work, "off", deft={"enabled": False, "coef": 3.0})) is None
    cfg = _load_cfg(work, "adaptive", deft={"adaptive": True, "skip_budget": 2, "adaptive_temperature": 0.2})
    assert deft_config_from(cfg) == DeftConfig(adaptive=True, skip_budget=2, adaptive_temperature=0.2)
    assert isinstance(deft_config_from(cfg).skip_budget, int)  # 2 blocks, not the fraction 2.0
    cfg = _load_cfg(work, "gc", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_example_config_is_valid(work):
    from axolotl.cli.config import load_cfg

    example = pathlib.Path(__file__).resolve().parents[1] / "examples" / "axolotl" / "deft_lora.yml"
    text = example.read_text().replace("/tmp/deft-tiny/", f"{work}/")  # the fixture model instead of the example's
    (work / "example.yml").write_text(text)
    cfg = load_cfg(str(work / "example.yml"))
    assert DEFT in cfg.plugins
    assert cfg.deft.coef == 1.0 and cfg.deft.enabled is True
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}


@pytest.fixture(scope="module")
def built(work):
    """(trainer, model) built by Axolotl's own code path (config, datasets, model, trainer builder), LoRA, GA 1."""
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    cfg = _load_cfg(work, "inprocess", deft={"coef": 2.0, "eps": 1e-3})
    trainer, model, *_ = setup_model_and_trainer(cfg, load_datasets(cfg=cfg))
    return trainer, model


def test_axolotl_builds_the_deft_trainer(built):
    trainer, _ = built
    assert isinstance(trainer, deft_axolotl.DeftAxolotlTrainer)
    assert trainer.deft_config == DeftConfig(coef=2.0, eps=1e-3)


def test_trainer_matches_deft_common_by_hand(built):
    """Same batch: Axolotl's training step (task loss + coef × density loss, backward) gives the loss and the
    LoRA gradients that deft_common gives by hand; with gradient accumulation 2 both are halved."""
    trainer, model = built
    with torch.no_grad():  # LoRA B starts at zero (no gradient for A): give both matrices a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    expected_loss, expected_grads = reference_step(model, batch, trainer.deft_config)
    assert {n for n in expected_grads if "lora_A" in n} and {n for n in expected_grads if "lora_B" in n}

    for accumulation in (1, 2):  # the training loop sets current_gradient_accumulation_steps for each step
        model.zero_grad(set_to_none=True)
        trainer.current_gradient_accumulation_steps = accumulation
        loss = trainer.training_step(model, dict(batch))
        assert float(loss) == pytest.approx(expected_loss / accumulation, rel=1e-5)
        assert_grads_close(trainable_grads(model), {n: g / accumulation for n, g in expected_grads.items()})
    model.zero_grad(set_to_none=True)


def test_a_plugin_listed_before_deft_that_picks_the_trainer_is_an_error(built):
    from axolotl.core.trainers.base import AxolotlTrainer

    trainer, model = built
    plain = AxolotlTrainer(model=model, args=trainer.args)  # what Axolotl builds when another plugin chose first
    with pytest.raises(DeftConfigError, match="list deft_axolotl.DeftPlugin first"):
        deft_axolotl.DeftPlugin().post_trainer_create(trainer.axolotl_cfg, plain)


def test_target_density_in_the_deft_block_steers_the_axolotl_trainer(work, built):
    from deft_axolotl.plugin import deft_config_from

    config = deft_config_from(_load_cfg(work, "target", deft={"target_density": 0.5, "controller_gain": 0.2}))
    assert config == DeftConfig(target_density=0.5, controller_gain=0.2)
    trainer, model = built
    steered = deft_axolotl.deft_trainer_class(None, config)(model=model, args=trainer.args)
    steered.current_gradient_accumulation_steps = 1
    batch = next(iter(trainer.get_train_dataloader()))
    task_loss, _ = reference_step(model, batch, DeftConfig(coef=0.0))
    try:
        assert float(steered.training_step(model, dict(batch))) == pytest.approx(task_loss, rel=1e-5)  # weight 0
        density = steered.deft_tracker.mean_density()
        steered.state.global_step = 1  # the next optimizer step: the controller has seen step 0's density
        loss = float(steered.training_step(model, dict(batch)))
        assert steered.deft_coef_schedule.controller.coef == pytest.approx(0.2 * (density - 0.5))
        assert loss > task_loss  # now the density term is in the loss
    finally:
        steered.deft_tracker.remove()
        model.zero_grad(set_to_none=True)
