"""The gradient of the density term alone reaches the trainable parameters of every PEFT method:
LoRA, prefix tuning, prompt tuning, IA3 and QLoRA (bitsandbytes 4-bit on CPU)."""

import importlib.util

import pytest
import torch

from core_reference import ActivationRecorder, assert_grads_close, hand_loss, real_token_masks
from deft_common import (
    DeftCheckpointingError,
    DeftConfig,
    DensityTracker,
    make_checkpointing_non_reentrant,
    uses_reentrant_checkpointing,
)
from fixtures import ENCODER_DECODER, make_batch, make_model, save_model_dir

peft = pytest.importorskip("peft")

# Projections that feed the MLP of their own layer (so every one of them must get a gradient): the attention's,
# except for Phi, whose attention runs in parallel with the MLP; there it is the MLP's up-projection.
ATTENTION_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"], "t5_gated": ["q", "v"],
    "gpt2": ["c_attn"], "phi3": ["qkv_proj"], "phi": ["fc1"],
}


def _task_type(family):
    return "SEQ_2_SEQ_LM" if family in ENCODER_DECODER else "CAUSAL_LM"


def _density_grads(model, family):
    """Backward of the density term alone (paper settings); returns {trainable parameter name: grad}."""
    tracker = DensityTracker(model, DeftConfig())
    batch = make_batch(family)
    with tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    loss = tracker.density_loss()
    assert loss.requires_grad
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _wrap(family, peft_config):
    return peft.get_peft_model(make_model(family), peft_config)


def _assert_all_nonzero(grads, min_count):
    assert len(grads) >= min_count
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient from the density term"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_lora_gradient(family):
    targets = ATTENTION_TARGETS.get(family, ["q_proj", "v_proj"])  # llama, mistral, qwen2, gemma, opt
    # init_lora_weights=False: B starts non-zero, so A gets a gradient too (with B = 0 only B would).
    model = _wrap(family, peft.LoraConfig(target_modules=targets, r=2, init_lora_weights=False))
    grads = _density_grads(model, family)
    assert all("lora_A" in n or "lora_B" in n or "classifier" in n or "score" in n for n in grads)
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    _assert_all_nonzero(lora, min_count=2 * len(targets) * 2)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_lora_gradient_equals_the_gradient_of_the_formula():
    model = _wrap("llama", peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "gate_proj"], r=2,
                                           init_lora_weights=False))
    batch = make_batch("llama")
    tracker = DensityTracker(model, DeftConfig(capture="down_in", eps=1e-3))
    with ActivationRecorder("llama", model, "down_in") as recorder, tracker.record(**tracker.masks_for(batch)):
        model(**batch)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(tracker.density_loss(), params, retain_graph=True)
    expected = torch.autograd.grad(hand_loss(recorder, real_token_masks("llama", batch), 1e-3), params)
    assert_grads_close(got, expected)
    assert all(e.abs().sum() > 0 for e in expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_prefix_tuning_gradient(family):
    model = _wrap(family, peft.PrefixTuningConfig(task_type=_task_type(family), num_virtual_tokens=4))
    grads = _density_grads(model, family)
    assert list(grads) == ["prompt_encoder.default.embedding.weight"]
    _assert_all_nonzero(grads, min_count=1)


@pytest.mark.parametrize("family", ["llama", "t5", "phi3"])
def test_prompt_tuning_gradient(family):
    model = _wrap(family, peft.PromptTuningConfig(task_type=_task_type(family), num_virtual_tokens=4))
    grads = _density_grads(model, family)
    assert list(grads) == ["prompt_encoder.default.embedding.weight"]
    _assert_all_nonzero(grads, min_count=1)


@pytest.mark.parametrize("family, targets, feedforward", [
    ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("t5", ["k", "v", "wo"], ["wo"]),
])
def test_ia3_gradient(family, targets, feedforward):
    config = peft.IA3Config(task_type=_task_type(family), target_modules=targets, feedforward_modules=feedforward)
    grads = _density_grads(_wrap(family, config), family)
    attention = {n: g for n, g in grads.items() if ".wo." not in n and "down_proj" not in n}
    _assert_all_nonzero(attention, min_count=4)
    # A down-projection's IA3 vector scales the input of the layer *after* its MLP: only the last one is out of reach.
    ffn = [n for n, g in grads.items() if n not in attention and g is not None and g.abs().sum() > 0]
    assert ffn


def test_qlora_gradient(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install 'deft-plugins[qlora]')")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_model_dir("llama", tmp_path / "llama")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.gate_proj, bnb.nn.Linear4bit)
    # The usual QLoRA recipe, with reentrant checkpointing (torch's default when use_reentrant is not given).
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": True})
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj", "gate_proj"], r=2,
                                                       init_lora_weights=False))
    model.train()
    with pytest.raises(DeftCheckpointingError, match="use_reentrant"):
        _density_grads(model, "llama")
    assert make_checkpointing_non_reentrant(model) >= 2  # every decoder layer (and modules holding the function)
    assert not uses_reentrant_checkpointing(model)
    grads = _density_grads(model, "llama")
    _assert_all_nonzero(grads, min_count=12)
    assert all("lora_" in n for n in grads)
