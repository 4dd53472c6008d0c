"""Sparse MLP execution (kernel="sparse"): same outputs as the mask path, the fallback rule, remove(), bad input."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_batch, make_model

from deft_common import (DeftConfig, DeftThresholdsError, SparseMlpError, apply_thresholds, base_model_of,
                         calibrate_thresholds, find_mlp_sites, install_sparse_mlp)
from deft_common.sparsity import kernels, sparse_mlp

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi3", "t5_gated", "gpt2", "opt", "bert", "t5"]
GATED = {"llama", "qwen2", "mistral", "gemma", "phi3", "t5_gated"}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _model(family: str, dtype=torch.float32):
    model = make_model(family, dtype=dtype)
    model.eval()
    return model


def _thresholds(model, family: str, capture: str = "act", sparsity: float = 0.7):
    batches = [make_batch(family, seed=s) for s in range(2)]
    return calibrate_thresholds(model, batches, sparsity=sparsity, config=DeftConfig(capture=capture))


def _one_token_inputs(family: str) -> dict:
    batch = make_batch(family, batch_size=1, seq_len=1, padding=False, seed=3)
    batch.pop("labels")
    if family in ("t5", "t5_gated"):
        batch["decoder_input_ids"] = torch.tensor([[0]])
    return batch


def _outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_sparse_equals_mask_one_token(family, dtype, backend, monkeypatch):
    """Decoding-shaped input (one token, batch 1): the sparse path is taken and matches the mask path."""
    monkeypatch.setenv("DEFT_SPARSE_KERNEL", backend)
    monkeypatch.setattr(sparse_mlp, "MAX_ACTIVE_FRACTION", {k: 1.0 for k in sparse_mlp.MAX_ACTIVE_FRACTION})
    model = _model(family, dtype)
    th = _thresholds(model, family)
    batch = _one_token_inputs(family)
    with apply_thresholds(model, th, kernel="mask"):
        masked = _outputs(model, batch)
    handle = apply_thresholds(model, th, kernel="sparse")
    sparse = _outputs(model, batch)
    calls = [h.calls for h in handle._handles]
    assert all(h.backend == backend for h in handle._handles)
    handle.remove()
    assert all(c["sparse"] >= 1 for c in calls), calls
    scale = masked.abs().max()
    assert (sparse - masked).abs().max() <= TOLERANCE[dtype] * scale * 10, (sparse - masked).abs().max()


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bert"])
def test_sparse_equals_mask_batches_fall_back(family):
    """Many rows at once: the dense fallback is taken and the outputs equal the mask path's."""
    model = _model(family)
    th = _thresholds(model, family)
    batch = {k: v for k, v in make_batch(family, batch_size=2, seq_len=8).items() if k != "labels"}
    with apply_thresholds(model, th, kernel="mask"):
        masked = _outputs(model, batch)
    handle = apply_thresholds(model, th, kernel="sparse")
    sparse = _outputs(model, batch)
    calls = [(h.masked_only, h.calls) for h in handle._handles]
    handle.remove()
    # density 0.3: non-gated blocks are above their limit and only masked; gated ones fall back per forward
    assert all(c["sparse"] == 0 and (masked_only or c["dense"] >= 1) for masked_only, c in calls), calls
    assert torch.allclose(sparse, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, sparsity, masked_only", [
    ("bert", 0.5, True), ("bert", 0.9, False), ("llama", 0.2, True), ("llama", 0.5, False)])
def test_calibrated_density_above_the_limit_is_masked_only(family, sparsity, masked_only):
    """apply_thresholds passes each block's calibrated density: above the fallback limit (non-gated 0.25, gated
    0.7) the block is only masked (no forward override, no per-token check), below it the sparse path is
    installed; either way the outputs are the mask path's."""
    model = _model(family)
    th = _thresholds(model, family, sparsity=sparsity)
    batch = _one_token_inputs(family)
    with apply_thresholds(model, th, kernel="mask"):
        masked = _outputs(model, batch)
    with apply_thresholds(model, th, kernel="sparse") as handle:
        sparse = _outputs(model, batch)
        assert [h.masked_only for h in handle._handles] == [masked_only] * len(handle._handles)
        overridden = [site.name for site in th.sites_in(model)
                      if "forward" in vars(base_model_of(model).get_submodule(site.name))
                      or "forward" in vars(site.down)]
        assert bool(overridden) != masked_only, overridden
        if not masked_only:
            assert sum(h.calls["sparse"] for h in handle._handles) >= 1
    assert torch.allclose(sparse, masked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("capture", ["act", "down_in"])
@pytest.mark.parametrize("family", ["gpt2", "opt", "bert", "t5"])
def test_non_gated_both_capture_points(family, capture):
    model = _model(family)
    th = _thresholds(model, family, capture=capture, sparsity=0.9)  # density 0.1: below the crossover
    batch = _one_token_inputs(family)
    with apply_thresholds(model, th, kernel="mask"):
        masked = _outputs(model, batch)
    with apply_thresholds(model, th, kernel="sparse") as handle:
        sparse = _outputs(model, batch)
        assert sum(h.calls["sparse"] for h in handle._handles) >= 1
    assert torch.allclose(sparse, masked, atol=1e-5, rtol=1e-4)


def _site(model, name_part: str = "", capture: str = "act"):
    sites = find_mlp_sites(model, DeftConfig(capture=capture))
    return next(s for s in sites if name_part in s.name)


def test_fallback_rule_by_active_fraction():
    """The rule: sparse when the union of active neurons is at most the crossover fraction, dense above it."""
    model = _model("llama")
    site = _site(model)
    block = base_model_of(model).get_submodule(site.name)
    x = torch.randn(1, 1, block.gate_proj.in_features)
    with torch.no_grad():
        a = block.act_fn(block.gate_proj(x)).abs().flatten()
    width = a.numel()
    for fraction_limit in (0.25, 0.5):
        for keep in (0.2, 0.6):
            tau = float(a.sort(descending=True).values[int(keep * width)])  # about `keep` of the neurons stay active
            handle = install_sparse_mlp(model, site, tau, "act", max_active_fraction=fraction_limit)
            with torch.no_grad():
                block(x)
            handle.remove()
            active = int((a > tau).sum())
            expected = "sparse" if active <= fraction_limit * width else "dense"
            assert handle.calls[expected] == 1, (fraction_limit, keep, handle.calls)


def test_fallback_rule_by_rows():
    model = _model("llama")
    site = _site(model)
    block = base_model_of(model).get_submodule(site.name)
    handle = install_sparse_mlp(model, site, 1e9, "act")  # everything zero: any row count is sparse enough
    with torch.no_grad():
        block(torch.randn(1, sparse_mlp.MAX_SPARSE_ROWS, block.gate_proj.in_features))
        block(torch.randn(1, sparse_mlp.MAX_SPARSE_ROWS + 1, block.gate_proj.in_features))
    handle.remove()
    assert handle.calls == {"sparse": 1, "dense": 1}


def test_with_gradients_computes_densely():
    model = _model("llama")
    site = _site(model)
    block = base_model_of(model).get_submodule(site.name)
    handle = install_sparse_mlp(model, site, 0.0, "act", max_active_fraction=1.0)
    x = torch.randn(1, 1, block.gate_proj.in_features)
    block(x).sum().backward()
    handle.remove()
    assert handle.calls == {"sparse": 0, "dense": 1}
    assert block.gate_proj.weight.grad is not None


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bert"])
def test_remove_restores_the_model_exactly(family):
    model = _model(family)
    th = _thresholds(model, family)
    batch = _one_token_inputs(family)
    before = _outputs(model, batch)
    modules = dict(model.named_modules())
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    handle = apply_thresholds(model, th, kernel="sparse")
    _outputs(model, batch)
    handle.remove()
    assert dict(model.named_modules()) == modules
    for name, (param, value) in params.items():
        assert dict(model.named_parameters())[name] is param and torch.equal(param, value)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(_outputs(model, batch), before)


def test_weight_changed_after_install_is_followed():
    model = _model("llama")
    site = _site(model)
    block = base_model_of(model).get_submodule(site.name)
    x = torch.randn(1, 1, block.gate_proj.in_features)
    handle = install_sparse_mlp(model, site, 0.0, "act", max_active_fraction=1.0)
    with torch.no_grad():
        block.down_proj.weight.mul_(2.0)
        sparse = block(x)
    handle.remove()
    with torch.no_grad():
        dense = block(x)
    assert handle.calls["sparse"] == 1
    assert torch.allclose(sparse, dense, atol=1e-5)


@pytest.mark.parametrize("capture", ["act", "down_in"])
def test_generate_same_tokens_sparse_and_mask(capture):
    model = _model("llama")
    # density 0.2 (act) and 0.1 (down_in): below the crossover
    th = _thresholds(model, "llama", capture=capture, sparsity=0.8 if capture == "act" else 0.9)
    prompt = make_batch("llama", batch_size=1, seq_len=6, padding=False)
    kwargs = dict(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=12,
                  do_sample=False, pad_token_id=0)
    with apply_thresholds(model, th, kernel="mask"):
        masked = model.generate(**kwargs)
    with apply_thresholds(model, th, kernel="sparse") as handle:
        sparse = model.generate(**kwargs)
        assert all(h.calls["sparse"] >= 11 for h in handle._handles)  # every decoding step after the prompt
    assert torch.equal(sparse, masked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(GATED))
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_gated_down_in_sparse_path(family, dtype, backend, monkeypatch):
    """Gated MLP, capture="down_in": gate and up dense, the down-projection over the active rows of act(gate) * up.
    One token at a low density takes the sparse path, many rows and a high density fall back (the latter masked
    only); the outputs are the mask path's and remove() restores the model exactly."""
    monkeypatch.setenv("DEFT_SPARSE_KERNEL", backend)
    model = _model(family, dtype)
    one = _one_token_inputs(family)
    rows = {k: v for k, v in make_batch(family, batch_size=2, seq_len=8, seed=4).items() if k != "labels"}
    if family == "t5_gated":
        rows["decoder_input_ids"] = torch.zeros(2, 8, dtype=torch.long)  # every block sees 16 rows
    before = {name: _outputs(model, batch) for name, batch in (("one", one), ("rows", rows))}
    modules = dict(model.named_modules())
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    for sparsity, masked_only in ((0.95, False), (0.1, True)):  # density 0.05: sparse; 0.9: above every limit
        th = _thresholds(model, family, capture="down_in", sparsity=sparsity)
        for name, batch in (("one", one), ("rows", rows)):
            with apply_thresholds(model, th, kernel="mask"):
                masked = _outputs(model, batch)
            with apply_thresholds(model, th, kernel="sparse") as handle:
                sparse = _outputs(model, batch)
                hs = handle._handles
                assert all(h.backend == backend and h.masked_only == masked_only for h in hs), hs
                calls = [h.calls for h in hs]
                if masked_only or name == "rows":
                    assert all(c["sparse"] == 0 for c in calls), calls
                else:
                    assert all(c["sparse"] > 0 for c in calls), calls
                    assert all("forward" in vars(h.site.down) for h in hs)
                    assert all("forward" not in vars(base_model_of(model).get_submodule(h.site.name)) for h in hs)
            scale = masked.abs().max()
            assert (sparse - masked).abs().max() <= TOLERANCE[dtype] * scale * 10, (name, (sparse - masked).abs().max())
    # a high density seen per forward (no calibrated density given): the per-token check falls back to dense
    sites = find_mlp_sites(model, DeftConfig(capture="down_in"))
    handles = [install_sparse_mlp(model, site, 0.0, "down_in") for site in sites]  # τ 0: nearly all active
    _outputs(model, one)
    for h in handles:
        h.remove()
    assert all(h.calls == {"sparse": 0, "dense": 1} for h in handles), [h.calls for h in handles]
    assert dict(model.named_modules()) == modules
    for name, (param, value) in params.items():
        assert dict(model.named_parameters())[name] is param and torch.equal(param, value)
    assert all("forward" not in m.__dict__ for m in model.modules())
    for name, batch in (("one", one), ("rows", rows)):
        assert torch.equal(_outputs(model, batch), before[name])


def test_speedup_limit():
    """The bound the weight bytes a sparse step reads put on its speedup: gated act 3/(1+2d), gated down_in
    3/(2+d), non-gated 2/(1+d)."""
    for d in (0.0, 0.1, 0.5, 1.0):
        assert sparse_mlp.speedup_limit(True, "act", d) == pytest.approx(3 / (1 + 2 * d))
        assert sparse_mlp.speedup_limit(True, "down_in", d) == pytest.approx(3 / (2 + d))
        for capture in ("act", "down_in"):
            assert sparse_mlp.speedup_limit(False, capture, d) == pytest.approx(2 / (1 + d))
    assert sparse_mlp.speedup_limit(True, "down_in", 1.0) == pytest.approx(1.0)
    with pytest.raises(SparseMlpError, match="capture='gate' is unknown"):
        sparse_mlp.speedup_limit(True, "gate", 0.5)
    with pytest.raises(SparseMlpError, match="density=1.5"):
        sparse_mlp.speedup_limit(True, "act", 1.5)


# --------------------------------------------------------------------------------------------- bad input
def test_gated_down_in_lora_on_the_down_projection_is_refused():
    """capture="down_in" replaces only the down-projection's forward: a PEFT adapter there is refused with the fix
    (gate and up run through their own modules)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=["down_proj"]))
    th = _thresholds(model, "llama", capture="down_in", sparsity=0.95)
    with pytest.raises(SparseMlpError, match=r"down-projection\) is a PEFT adapter.*merge_and_unload"):
        apply_thresholds(model, th, kernel="sparse")
    assert all("forward" not in m.__dict__ for m in model.modules())  # nothing left installed


def test_lora_layers_are_refused_with_the_fix():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=["up_proj", "down_proj"]))
    th = _thresholds(model, "llama")
    with pytest.raises(SparseMlpError, match=r"PEFT adapter.*merge_and_unload"):
        apply_thresholds(model, th, kernel="sparse")
    merged = model.merge_and_unload()
    with apply_thresholds(merged, th, kernel="sparse"):
        _outputs(merged, _one_token_inputs("llama"))


def test_unknown_kernel_and_backend():
    model = _model("llama")
    th = _thresholds(model, "llama")
    with pytest.raises(DeftThresholdsError, match="kernel='fast' is unknown"):
        apply_thresholds(model, th, kernel="fast")
    with pytest.raises(SparseMlpError, match="backend='gpu' is unknown"):
        install_sparse_mlp(model, _site(model), 0.1, "act", backend="gpu")


def test_installed_twice_is_refused():
    model = _model("llama")
    site = _site(model)
    handle = install_sparse_mlp(model, site, 0.1, "act")
    with pytest.raises(SparseMlpError, match="installed twice"):
        install_sparse_mlp(model, site, 0.1, "act")
    handle.remove()


def test_thresholds_of_another_model_are_refused():
    th = _thresholds(_model("gpt2"), "gpt2")
    with pytest.raises(DeftThresholdsError, match="another model"):
        apply_thresholds(_model("llama"), th, kernel="sparse")


def test_no_compiler_falls_back_to_torch(tmp_path, monkeypatch):
    """Without a working compiler the C++ build fails with a warning and the plain torch kernels are used."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv("DEFT_SPARSE_KERNEL", raising=False)
    monkeypatch.setattr(kernels, "_EXTENSION_NAME", "deft_sparse_mlp_no_compiler_test")
    monkeypatch.setattr(kernels, "_compiled", {})
    model = _model("llama")
    with pytest.warns(UserWarning, match="could not be built"):
        handle = install_sparse_mlp(model, _site(model), 0.1, "act")
    assert handle.backend == "torch"
    handle.remove()
    with pytest.raises(SparseMlpError, match="backend='cpp' was asked for"):
        install_sparse_mlp(model, _site(model), 0.1, "act", backend="cpp")
