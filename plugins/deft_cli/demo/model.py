"""The demo's model: a LoRA-wrapped transformer with a mean-pooling classification head."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from deft_common import DeftConfig, base_model_of, budget_to_count, find_mlp_sites, unwrapped, up_projection

from ..data import DeftDataError
from .settings import DemoSettings


def build_classifier(settings: DemoSettings, num_labels: int):
    """(tokenizer, MeanPoolClassifier) for settings.model with LoRA on settings.lora_targets."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()  # unused pooler weights and the like are expected here
    tokenizer = transformers.AutoTokenizer.from_pretrained(settings.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    body = transformers.AutoModel.from_pretrained(settings.model)
    if getattr(body.config, "is_encoder_decoder", False):
        body = body.get_encoder()  # classify with the encoder of an encoder-decoder model
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules=settings.lora_targets)
    try:
        body = get_peft_model(body, lora)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise DeftDataError(f"LoRA cannot wrap {settings.model} with --lora-targets "
                            f"{settings.lora_targets}: {err}; try --lora-targets all-linear") from err
    return tokenizer, MeanPoolClassifier(body, num_labels, settings.mlp_bias_lr, settings.head_lr)


def seeded_classifier(settings: DemoSettings, num_labels: int):
    """build_classifier after seeding everything with settings.seed: the same LoRA and head initialisation for
    every run of the same settings."""
    import transformers

    transformers.set_seed(settings.seed)
    return build_classifier(settings, num_labels)


class MeanPoolClassifier(torch.nn.Module):
    """A LoRA-wrapped transformer body and a linear head on the mean of its last hidden states over real tokens.

    Mean pooling rather than transformers' *ForSequenceClassification heads: all-MiniLM-L6-v2 is trained for
    mean pooling and its [CLS] token carries almost nothing, and the same head works for any body (encoder or
    decoder). Optionally the biases of the MLP up-projections train too (LoRA adapts weights, not biases)."""

    def __init__(self, body, num_labels: int, mlp_bias_lr: float = 0.0, head_lr: float | None = None):
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(body.config.hidden_size, num_labels)
        self.mlp_biases = mlp_up_biases(body) if mlp_bias_lr > 0 else []
        for bias in self.mlp_biases:
            bias.requires_grad_(True)
        self.mlp_bias_lr, self.head_lr = mlp_bias_lr, head_lr

    def parameter_groups(self) -> list[dict]:
        """LoRA at the base learning rate; the head and the MLP biases at their own, when set."""
        head = list(self.head.parameters()) if self.head_lr else []
        special = {id(p) for p in self.mlp_biases + head}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in special]}]
        if head:
            groups.append({"params": head, "lr": self.head_lr})
        if self.mlp_biases:
            groups.append({"params": self.mlp_biases, "lr": self.mlp_bias_lr})
        return groups

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def mlp_up_biases(body) -> list:
    """The bias of the layer that feeds each MLP activation (BERT's intermediate.dense, GPT-2's c_fc, ...)."""
    base = base_model_of(body)
    biases = []
    for site in find_mlp_sites(body, DeftConfig(coef=0.0)):
        up = up_projection(base.get_submodule(site.name))
        up = unwrapped(up) if up is not None else None  # the bias sits under a LoRA wrapper
        if isinstance(getattr(up, "bias", None), torch.nn.Parameter):
            biases.append(up.bias)
    return biases


def check_model(settings: DemoSettings, num_labels: int) -> None:
    """Fail before training when DEFT cannot work on the model: build it without weights and find its MLPs."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(settings.model)
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config)
    except (OSError, ValueError) as err:
        raise DeftDataError(f"{settings.model}: transformers cannot build this model ({err})") from err
    sites = find_mlp_sites(model, settings.deft)
    if settings.deft.adaptive and settings.deft.skip_budget is not None:
        budget_to_count(settings.deft.skip_budget, len(sites))  # a budget the model cannot meet fails now, not after training
