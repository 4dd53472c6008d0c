"""Block names that survive wrappers: FSDP1, activation checkpointing and torch.compile insert segments into module
paths (`_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`, `_orig_mod.`); DEFT's metric keys and
deft_thresholds.json name the blocks of the plain model, so a file written under them applies to the plain model.

FSDP1 runs here in a one-process gloo group on CPU (FSDP's `device_id=torch.device("cpu")`): enough to see its
module paths; the multi-process paths are tested with the adapters."""

import functools

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                         checkpoint_wrapper)

from deft_common import (DeftConfig, DensityLossEngine, SparsityThresholds, apply_thresholds, calibrate_thresholds,
                         find_mlp_sites, install_sparse_mlp)
from fixtures import make_batch, make_model

PLAIN = ["model.layers.0.mlp", "model.layers.1.mlp"]


def _checkpointed(cls_name: str):
    model = make_model("llama")
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: type(m).__name__ == cls_name)
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    return model


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                       use_orig_params=True)
    assert any("_fsdp_wrapped_module" in name for name, _ in wrapped.named_modules())
    return wrapped


@pytest.mark.parametrize("wrapped", ["LlamaDecoderLayer", "LlamaMLP"])
def test_checkpoint_wrappers_keep_the_plain_names(wrapped):
    assert [site.name for site in find_mlp_sites(_checkpointed(wrapped))] == PLAIN


def test_checkpointed_blocks_keep_the_plain_names_in_metrics():
    model = _checkpointed("LlamaMLP")
    engine = DensityLossEngine(model, DeftConfig())
    batch = make_batch("llama")
    with engine.recording(batch, 0):
        loss = model(**batch).loss + engine.term(0)
    loss.backward()
    keys = {key for key in engine.pop_metrics("train") if key.startswith("deft/density/")}
    assert keys == {f"deft/density/{name}" for name in PLAIN}
    engine.remove()


def test_thresholds_written_under_fsdp_and_checkpointing_apply_to_the_plain_model(tmp_path, process_group):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _fsdp1(make_model("llama"))
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    batch = make_batch("llama", batch_size=4, seq_len=16)
    written = calibrate_thresholds(model, [batch], sparsity=0.9).save(tmp_path)
    thresholds = SparsityThresholds.load(written)
    assert list(thresholds.thresholds) == PLAIN
    plain = make_model("llama").eval()
    with apply_thresholds(plain, thresholds):  # the example raised DeftThresholdsError here
        plain(**batch)
    assert thresholds.thresholds == calibrate_thresholds(make_model("llama"), [batch], sparsity=0.9).thresholds


def test_a_compiled_model_keeps_the_plain_names():
    compiled = torch.compile(make_model("llama"))
    assert any(name.startswith("_orig_mod.") for name, _ in compiled.named_modules())
    assert [site.name for site in find_mlp_sites(compiled)] == PLAIN


@pytest.mark.parametrize("capture", ["act", "down_in"])
def test_sparse_kernel_runs_the_blocks_inside_checkpoint_wrappers(capture):
    # The plain block names are no module paths of the wrapped model (`layers.0._checkpoint_wrapped_module.mlp`);
    # the sparse kernel still finds each block (the wrapper forwards attributes) and computes what the mask computes.
    model = _checkpointed("LlamaDecoderLayer").eval()
    batch = make_batch("llama", batch_size=1, seq_len=8)
    thresholds = calibrate_thresholds(model, [batch], sparsity=0.7, config=DeftConfig(capture=capture))
    with torch.no_grad():
        with apply_thresholds(model, thresholds, kernel="mask"):
            masked = model(**batch).logits
        handles = [install_sparse_mlp(model, site, thresholds.thresholds[site.name], capture,
                                      max_active_fraction=1.0, max_rows=64)
                   for site in find_mlp_sites(model, capture=capture)]
        sparse = model(**batch).logits
    for handle in handles:
        handle.remove()
    assert [handle.site.name for handle in handles] == PLAIN
    assert all(handle.calls["sparse"] > 0 for handle in handles)
    torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-5)
