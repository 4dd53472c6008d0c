"""SparsitySetpoint: the training-side sparsity set-point (deft_common.sparsity.setpoint) on tiny real models."""

import pathlib
import warnings

import pytest
import torch

from deft_common import DeftConfig, DeftConfigError, find_mlp_sites
from deft_common import SetpointWarning, SparsitySetpoint
from fixtures import make_batch, make_model


def _acts(model, config=None):
    return [site.act for site in find_mlp_sites(model, config or DeftConfig())]


def _watch(model, batch, when="after"):
    """Hooks on every MLP activation that record what the rest of the model sees (registered after the
    set-point's hooks, so they see the masked output) or what the activation computed (`when="before"`, register
    them before the set-point: the model goes on with a copy, which the set-point may zero in place)."""
    seen = []
    real = batch["attention_mask"].reshape(-1).bool()

    def hook(_m, _a, out):
        if out.requires_grad:
            out.retain_grad()
        seen.append((out, real))
        return out.clone() if when == "before" else None

    return seen, [m.register_forward_hook(hook) for m in _acts(model)]


def _density(seen):
    """Mean over blocks of the non-zero share over real token rows."""
    values = [float((out.reshape(-1, out.shape[-1])[real] != 0).float().mean()) for out, real in seen]
    return sum(values) / len(values)


def _density_per_step(family: str, steps: int, **setpoint_kwargs) -> list[float]:
    """Train-mode forwards and backwards of one batch under a set-point (sparsity 0.9), one per optimizer step:
    the density the rest of the model saw at each step."""
    model = make_model(family)
    batch = make_batch(family, batch_size=4, seq_len=16)
    setpoint = SparsitySetpoint(model, sparsity=0.9, **setpoint_kwargs)
    seen, handles = _watch(model, batch)
    measured = []
    for step in range(steps):
        seen.clear()
        model(**batch).loss.backward()
        measured.append(_density(seen))
        setpoint.step(step + 1)
    for h in handles:
        h.remove()
    return measured


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_density_at_end_of_ramp_is_the_setpoint(family):
    measured = _density_per_step(family, 7, ramp_steps=4)
    assert measured[0] == pytest.approx(1.0, abs=0.02)  # ramp starts dense
    assert measured[2] == pytest.approx(1 - 0.9 * 2 / 4, abs=0.02)  # half-way
    for step in (4, 5, 6):  # the set-point is reached and held
        assert measured[step] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dense_every_trains_every_nth_step_dense(family):
    measured = _density_per_step(family, 6, dense_every=3)
    dense = pytest.approx(1.0, abs=0.02)  # GELU/SiLU: (almost) no exact zeros without the mask
    assert measured == [pytest.approx(0.1, abs=0.01), pytest.approx(0.1, abs=0.01), dense] * 2


def test_padding_rows_do_not_count_in_the_quantile_with_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("bert"), LoraConfig(r=4, target_modules=["query", "value"]))
    batch = make_batch("bert", batch_size=3, seq_len=16)  # last row half padding
    before, handles = _watch(model, batch, "before")  # sees the activations before the set-point masks them
    setpoint = SparsitySetpoint(model, sparsity=0.8, ramp_steps=0)
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    for site, (out, real) in zip(setpoint.sites, before):
        values = out.detach().reshape(-1, out.shape[-1])[real].abs().flatten()
        expected = values.kthvalue(int(0.8 * values.numel())).values
        # Every entry counted (fewer than SAMPLE): τ is within one histogram bin (0.27%) of the exact quantile.
        assert setpoint.last_thresholds[site.name] == pytest.approx(float(expected), rel=2 ** (1 / 256) - 1)
        assert setpoint.last_density[site.name] == pytest.approx(0.2, abs=0.01)


def test_mask_only_in_training_forwards_with_gradients():
    model = make_model("bert")
    batch = make_batch("bert")
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        eval_before = model(**batch).logits
    model.train()
    with torch.no_grad():
        nograd_before = model(**batch).logits
    train_before = model(**batch).logits.detach()
    setpoint = SparsitySetpoint(model, sparsity=0.9)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, eval_before)
    assert torch.equal(model(**batch).logits.detach(), eval_before)  # eval mode with gradients: untouched
    model.train()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, nograd_before)
    assert not torch.allclose(model(**batch).logits.detach(), train_before)  # the training forward is masked
    setpoint.remove()
    assert torch.equal(model(**batch).logits.detach(), train_before)


def test_remove_restores_the_model_exactly():
    model = make_model("llama")
    batch = make_batch("llama")
    before = model(**batch).logits.detach()
    setpoint = SparsitySetpoint(model, sparsity=0.95, gradient="ste")
    model(**batch).loss.backward()
    setpoint.step(1)
    model.zero_grad()
    setpoint.remove()
    assert torch.equal(model(**batch).logits.detach(), before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_resume_continues_the_ramp():
    model = make_model("bert")
    batch = make_batch("bert")
    first = SparsitySetpoint(model, sparsity=0.9, ramp_steps=10)
    for step in range(3):
        model(**batch).loss.backward()
        first.step(step + 1)
    state = first.state_dict()
    first.remove()
    resumed = SparsitySetpoint(model, sparsity=0.9, ramp_steps=10)
    assert resumed.current_sparsity == 0.0
    resumed.load_state_dict(state)
    assert resumed.current_step == 3
    assert resumed.current_sparsity == pytest.approx(0.27)
    with pytest.raises(ValueError, match="resume with the settings the run started with"):
        SparsitySetpoint(model, sparsity=0.95, ramp_steps=10).load_state_dict(state)


@pytest.mark.parametrize("gradient", ["mask", "ste"])
def test_gradient_through_the_zeroed_entries(gradient):
    model = make_model("bert")
    batch = make_batch("bert", batch_size=4, seq_len=16)
    before, handles = _watch(model, batch, "before")
    SparsitySetpoint(model, sparsity=0.9, gradient=gradient)
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    out, real = before[0]
    threshold = out.detach().reshape(-1, out.shape[-1])[real].abs().flatten().kthvalue(int(0.9 * real.sum() * out.shape[-1])).values
    zeroed = out.detach().abs() <= threshold
    grad_on_zeroed = out.grad[zeroed].abs().sum()
    if gradient == "mask":
        assert grad_on_zeroed == 0
    else:
        assert grad_on_zeroed > 0


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), True, "0.9"])
def test_setpoint_outside_0_1_is_an_error(sparsity):
    with pytest.raises(DeftConfigError, match=r"sparsity_setpoint=.* must be a number in \[0, 1\)"):
        SparsitySetpoint(make_model("bert"), sparsity=sparsity)


@pytest.mark.parametrize("dense_every,fix", [(1, "use 2"), (-1, "whole number >= 0"), (2.0, "whole number >= 0")])
def test_bad_dense_every_is_an_error(dense_every, fix):
    with pytest.raises(DeftConfigError, match=f"setpoint_dense_every=.*{fix}"):
        SparsitySetpoint(make_model("bert"), sparsity=0.9, dense_every=dense_every)


@pytest.mark.parametrize("ramp", [-1, 2.5, None])
def test_bad_ramp_is_an_error(ramp):
    with pytest.raises(DeftConfigError, match="setpoint_ramp_steps=.* must be a whole number >= 0"):
        SparsitySetpoint(make_model("bert"), sparsity=0.9, ramp_steps=ramp)


def test_ramp_longer_than_the_run_warns():
    setpoint = SparsitySetpoint(make_model("bert"), sparsity=0.9, ramp_steps=400)
    with pytest.warns(SetpointWarning, match=r"set-point 0.9 will not be reached \(the run ends at 0.675\)"):
        assert setpoint.check_ramp(300) == pytest.approx(0.675)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert setpoint.check_ramp(400) == 0.9


def test_capture_point_that_cannot_be_masked_is_an_error():
    class FusedMlp(torch.nn.Module):  # activation as a plain function: nothing to hook at capture="act"
        def __init__(self):
            super().__init__()
            self.up_proj, self.down_proj = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))

    model = torch.nn.Sequential(FusedMlp())
    with pytest.raises(DeftConfigError, match="capture='act'.*use capture='down_in'"):
        SparsitySetpoint(model, sparsity=0.9)
    setpoint = SparsitySetpoint(model, sparsity=0.5, config=DeftConfig(capture="down_in"))
    x = torch.randn(3, 4, requires_grad=True)
    seen = []
    model[0].down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model(x).sum().backward()
    assert float((seen[0] != 0).float().mean()) == pytest.approx(0.5, abs=0.05)
    setpoint.remove()


@pytest.mark.parametrize("field,value,match", [
    ("gradient", "sign", "gradient='sign' is unknown"),
    ("schedule", "cosine", "schedule='cosine' is unknown"),
])
def test_bad_options_are_errors(field, value, match):
    with pytest.raises(DeftConfigError, match=match):
        SparsitySetpoint(make_model("bert"), sparsity=0.9, **{field: value})


def test_geometric_schedule_spends_the_ramp_at_high_sparsity():
    setpoint = SparsitySetpoint(make_model("bert"), sparsity=0.99, ramp_steps=100, schedule="geometric")
    assert setpoint.at(0) == 0.0 and setpoint.at(100) == 0.99 and setpoint.at(500) == 0.99
    assert setpoint.at(50) == pytest.approx(0.9)  # kept share sqrt(0.01) = 0.1 half-way


def test_no_host_read_in_the_forward_off_cpu():
    """On a device other than the CPU the set-point computes τ and the mask without reading anything back to the host
    (a sync that would stall a GPU): on the meta device, which holds no data, any such read raises."""
    model = make_model("llama")
    setpoint = SparsitySetpoint(model, sparsity=0.9)
    site = setpoint.sites[0]
    mask = torch.ones(16, 128, dtype=torch.long, device="meta")
    setpoint._capture._read = {"encoder": mask, "decoder": mask}  # as read from a forward's attention_mask
    for shape in [(16, 128, 64), (16, 128, 1536)]:  # every entry counted, and a sample
        a = torch.empty(*shape, device="meta", requires_grad=True)
        assert setpoint._mask(site, a, 0.9).shape == a.shape
    setpoint.remove()


def _setpoint_taus(rank: int, world: int, rendezvous: str, out: str) -> None:
    """One process of a gloo group: the tiny llama under a set-point, a training forward and backward on this rank's
    rows of the batch; writes τ per block."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    model = make_model("llama")
    batch = make_batch("llama", batch_size=4, seq_len=16)  # padded rows
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    setpoint = SparsitySetpoint(model, sparsity=0.8)
    model(**{k: v[rows] for k, v in batch.items()}).loss.backward()
    with open(out, "w") as f:
        json.dump({"taus": setpoint.last_thresholds}, f)
    dist.destroy_process_group()


def test_tau_is_the_same_for_any_number_of_processes(tmp_path):
    """The histograms of every process are summed: two processes on two halves of a batch mask with the τ that one
    process computes on the whole batch (padding included), and the same τ on both."""
    import json

    import torch.multiprocessing as mp

    outputs = {}
    for world in (1, 2):
        files = [str(tmp_path / f"w{world}_r{rank}.json") for rank in range(world)]
        context = mp.get_context("spawn")
        processes = [context.Process(target=_setpoint_taus, args=(rank, world, str(tmp_path / f"rdv{world}"), file))
                     for rank, file in enumerate(files)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(120)
            assert process.exitcode == 0
        outputs[world] = [json.loads(pathlib.Path(file).read_text()) for file in files]
    one, (first, second) = outputs[1][0], outputs[2]
    assert first["taus"] == second["taus"]
    assert first["taus"] == pytest.approx(one["taus"], rel=1e-6)


def test_bf16_autocast_keeps_the_density_term_in_fp32_and_the_setpoint_on_target():
    from deft_common import DensityLossEngine

    model = make_model("llama")
    batch = make_batch("llama", batch_size=4, seq_len=16)
    engine = DensityLossEngine(model, DeftConfig(coef=1.0, eps=1e-3, sparsity_setpoint=0.9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with engine.recording(batch, 0):
            task = model(**batch).loss
        term = engine.term(0)
    assert term.dtype == torch.float32 and torch.isfinite(term) and term.requires_grad
    (task + term).backward()
    assert engine.tracker.mean_density(0.0) == pytest.approx(0.1, abs=0.02)  # what the rest of the model saw
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    engine.remove()


def test_setpoint_alone_only_counts_the_density():
    """coef 0 (the demo's set-point alone): the engine's tracker counts active entries and computes no density loss
    (no surrogate in the graph), and reports the same density as a tracker that computes it."""
    from deft_common import DensityLossEngine, DensityTracker

    model = make_model("llama")
    batch = make_batch("llama", batch_size=4, seq_len=16)
    engine = DensityLossEngine(model, DeftConfig(coef=0.0, sparsity_setpoint=0.9))
    full = DensityTracker(model, DeftConfig(coef=1.0))
    seen, handles = _watch(model, batch)
    with engine.recording(batch, 0), full.record(**full.masks_for(batch)):
        loss = model(**batch).loss + engine.term(0)
    assert float(engine.term(0)) == 0.0 and not engine.term(0).requires_grad
    assert engine.tracker.density(0.0) == pytest.approx(full.density(0.0))
    assert engine.tracker.mean_density(0.0) == pytest.approx(_density(seen), abs=1e-6)
    loss.backward()
    for h in handles:
        h.remove()
    full.remove()
    engine.remove()


def test_the_mask_zeroes_the_activation_in_place():
    """GELU keeps its input for backward, not its output: the set-point zeroes the activation in its own memory
    (no new activation-sized tensor per block) and its backward reads the masked output, which the down-projection
    keeps anyway."""
    model = make_model("bert")
    batch = make_batch("bert", batch_size=4, seq_len=16)
    made, used = [], []
    handles = [m.register_forward_hook(lambda _m, _a, out: made.append(out.data_ptr())) for m in _acts(model)]
    setpoint = SparsitySetpoint(model, sparsity=0.9)  # its hook runs after those, before the ones below
    handles += [m.register_forward_hook(lambda _m, _a, out: used.append(out)) for m in _acts(model)]
    model(**batch).loss.backward()
    assert made and made == [out.data_ptr() for out in used]
    assert all(0.05 < float((out != 0).float().mean()) < 0.15 for out in used)  # masked at 0.9
    for h in handles:
        h.remove()
    setpoint.remove()


@pytest.mark.parametrize("family", ["bert", "t5", "opt", "llama", "phi", "gemma"])
def test_the_gradient_is_the_same_whether_the_mask_works_in_place_or_not(family):
    """The mask overwrites the activation only when the op that made it does not keep it for backward (ReLU, in T5
    and OPT, keeps its output; GELU, SiLU and products do not). A hook in front that hands the model a copy lets it
    work in place every time: the gradients must not change (and a wrong in-place write would raise in backward)."""
    def gradients(copy_first: bool):
        model = make_model(family)
        batch = make_batch(family, batch_size=3, seq_len=12)
        handles = [m.register_forward_hook(lambda _m, _a, out: out.clone()) for m in _acts(model)] if copy_first else []
        setpoint = SparsitySetpoint(model, sparsity=0.8)
        model(**batch).loss.backward()
        for h in handles:
            h.remove()
        setpoint.remove()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, copied = gradients(False), gradients(True)
    assert plain.keys() == copied.keys() and plain
    for name in plain:
        torch.testing.assert_close(plain[name], copied[name], rtol=1e-5, atol=1e-7, msg=name)


def test_counts_read_zeros_with_their_sign_bit_as_zeros():
    """GELU writes -0.0 where x · Φ(x) underflows: a count of the non-zeros must not count them. The set-point's mask
    writes only +0.0, so its output is counted on the bits (faster); both counts agree on what is zero."""
    from deft_common.sparsity.zeroing import MaskAtOrBelow, has_only_positive_zeros
    from deft_common.surrogate import count_active

    gelu = torch.nn.functional.gelu(torch.tensor([[-40.0, -30.0, 0.0, 1.0, -0.5, 2.0]], requires_grad=True))
    assert torch.signbit(gelu[0, :2]).all() and (gelu[0, :2] == 0).all()  # -0.0
    assert not has_only_positive_zeros(gelu)
    assert count_active(gelu, None, (0.0,)).tolist() == [3]
    masked = MaskAtOrBelow.apply(gelu * 1.0, 0.4, False, True)  # keeps GELU(1) and GELU(2)
    assert has_only_positive_zeros(masked)
    assert count_active(masked, None, (0.0,), positive_zeros=True).tolist() == [2]
    assert count_active(masked, None, (0.0,)).tolist() == [2]
