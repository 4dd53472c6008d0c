"""An independent reference for the core tests: where each fixture family keeps its MLP activation, written out
by hand from the transformers modelling code (not found by deft_common's structural search), hooks of our own
that capture those activations, and the density loss and density computed directly from the formulas.

    loss    = mean over layers of [ mean over real token positions and hidden units of a² / (a² + ε) ]
    density = per layer, (# entries with |a| > τ over real token positions) / (# real positions × hidden units)
"""

from __future__ import annotations

import torch

from fixtures import ENCODER_DECODER, FAMILIES

# Every family at capture="act", and capture="down_in" on one family per MLP shape (gated SiLU, T5 gated-GELU,
# GPT-2 Conv1D, Phi-3 fused gate_up, OPT flattened tokens, BERT split over two modules), to keep sweeps fast.
DOWN_IN_FAMILIES = ["llama", "t5_gated", "gpt2", "phi3", "opt", "bert"]
FAMILY_CAPTURES = [(f, "act") for f in FAMILIES] + [(f, "down_in") for f in DOWN_IN_FAMILIES]

# family -> [(block path pattern, stack)], activation module and down-projection relative to the block.
_DECODER = [("model.layers.{i}.mlp", "decoder")]
MLP_LAYOUT = {
    "bert": ([("bert.encoder.layer.{i}", "encoder")], "intermediate.intermediate_act_fn", "output.dense"),
    "roberta": ([("roberta.encoder.layer.{i}", "encoder")], "intermediate.intermediate_act_fn", "output.dense"),
    "t5": ([("encoder.block.{i}.layer.1.DenseReluDense", "encoder"), ("decoder.block.{i}.layer.2.DenseReluDense", "decoder")], "act", "wo"),
    "t5_gated": ([("encoder.block.{i}.layer.1.DenseReluDense", "encoder"), ("decoder.block.{i}.layer.2.DenseReluDense", "decoder")], "act", "wo"),
    "gpt2": ([("transformer.h.{i}.mlp", "decoder")], "act", "c_proj"),
    "opt": ([("model.decoder.layers.{i}", "decoder")], "activation_fn", "fc2"),
    "llama": (_DECODER, "act_fn", "down_proj"),
    "mistral": (_DECODER, "act_fn", "down_proj"),
    "qwen2": (_DECODER, "act_fn", "down_proj"),
    "gemma": (_DECODER, "act_fn", "down_proj"),
    "phi": (_DECODER, "activation_fn", "fc2"),
    "phi3": (_DECODER, "activation_fn", "down_proj"),
}


def base_of(model):
    """The transformers model under a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def num_mlp_layers(model) -> int:
    config = base_of(model).config
    if config.is_encoder_decoder:
        return config.num_layers + config.num_decoder_layers
    return config.num_hidden_layers


def capture_points(family: str, model, capture: str) -> list[tuple[str, str, str]]:
    """[(MLP block name, module path of the capture point, stack)] in forward order (encoder first)."""
    blocks, act, down = MLP_LAYOUT[family]
    layers = num_mlp_layers(model) // len(blocks)
    return [
        (block.format(i=i), f"{block.format(i=i)}.{act if capture == 'act' else down}", stack)
        for block, stack in blocks
        for i in range(layers)
    ]


class ActivationRecorder:
    """Our own hooks: the output of each activation module (capture="act") or the input of each
    down-projection (capture="down_in"), kept with their autograd graph, by MLP block name."""

    def __init__(self, family: str, model, capture: str):
        self.points = capture_points(family, model, capture)
        self.capture = capture
        self.model = base_of(model)
        self.acts: dict[str, list[torch.Tensor]] = {}
        self.stacks = {block: stack for block, _, stack in self.points}
        self._handles = []

    def __enter__(self):
        for block, path, _ in self.points:
            module = self.model.get_submodule(path)
            if self.capture == "act":
                hook = module.register_forward_hook(lambda _m, _i, out, block=block: self._keep(block, out))
            else:
                hook = module.register_forward_pre_hook(lambda _m, args, block=block: self._keep(block, args[0]))
            self._handles.append(hook)
        return self

    def _keep(self, block, tensor):
        self.acts.setdefault(block, []).append(tensor)

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def real_token_masks(family: str, batch: dict, virtual_tokens: int = 0) -> dict[str, torch.Tensor]:
    """{stack: (batch, positions) bool mask of real positions}: the attention mask, for T5's decoder the label
    positions that are not -100, and with prompt tuning the virtual tokens in front count as real."""
    encoder = batch["attention_mask"].bool()
    if virtual_tokens:
        encoder = torch.cat([torch.ones(encoder.shape[0], virtual_tokens, dtype=torch.bool), encoder], dim=1)
    if family in ENCODER_DECODER:
        return {"encoder": encoder, "decoder": batch["labels"] != -100}
    return {"encoder": encoder, "decoder": encoder}


def hand_layer_losses(recorder: ActivationRecorder, masks: dict, eps: float, dtype=torch.float32,
                      l1: bool = False, taus: dict | None = None) -> dict[str, torch.Tensor]:
    """Per block: mean of a²/(a²+ε) (l1: |a|; taus, {block: τ}: min(|a|, τ)/τ) over real positions and hidden units,
    in `dtype` (differentiable)."""
    out = {}
    for block, tensors in recorder.acts.items():
        values = []
        for a in tensors:
            mask = masks[recorder.stacks[block]]
            a = a.to(dtype).reshape(*mask.shape, a.shape[-1])  # OPT flattens (batch, seq) before its MLP
            if taus is not None:
                s = a.abs().clamp(max=taus[block]) / taus[block]
            else:
                s = a.abs() if l1 else a * a / (a * a + eps)
            values.append(s[mask])  # (real positions, hidden)
        out[block] = torch.cat(values).mean()
    return out


def hand_loss(recorder: ActivationRecorder, masks: dict, eps: float, dtype=torch.float32, l1: bool = False,
              taus: dict | None = None) -> torch.Tensor:
    return torch.stack(list(hand_layer_losses(recorder, masks, eps, dtype, l1, taus).values())).mean()


def hand_counts(recorder: ActivationRecorder, masks: dict, threshold: float) -> dict[str, tuple[int, int]]:
    """Per block: (entries with |a| > threshold, entries) over real positions."""
    out = {}
    for block, tensors in recorder.acts.items():
        real = []
        for a in tensors:
            mask = masks[recorder.stacks[block]]
            real.append(a.detach().float().reshape(*mask.shape, a.shape[-1])[mask])
        real = torch.cat(real)
        out[block] = (int((real.abs() > threshold).sum()), real.numel())
    return out


def assert_grads_close(got, expected, rtol: float = 1e-4) -> None:
    """Gradient lists agree up to float noise; the absolute tolerance is relative to the largest gradient, since
    some parameters (e.g. a bias just before a LayerNorm) have a mathematically ~zero gradient of pure noise."""
    scale = max(float(e.abs().max()) for e in expected if e is not None)
    assert scale > 0
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=rtol, atol=1e-5 * scale)
