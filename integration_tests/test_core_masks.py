"""Padding is never counted, masks reach the right stack, and PEFT prompt tuning's virtual tokens count as real."""

import pytest
import torch

from core_reference import FAMILY_CAPTURES, ActivationRecorder, hand_loss, real_token_masks
from deft_common import DeftConfig, DensityTracker
from fixtures import ENCODER_DECODER, ENCODER_ONLY, INTERMEDIATE, make_batch, make_model, make_tokenizer

peft = pytest.importorskip("peft")


def _pad_right(family, batch, extra):
    """The same batch with `extra` padding columns appended (pad ids, mask 0, label -100)."""
    pad = make_tokenizer().pad_token_id
    rows = batch["input_ids"].shape[0]
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((rows, extra), pad)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(rows, extra, dtype=torch.long)], dim=1),
    }
    if family in ENCODER_ONLY:
        padded["labels"] = batch["labels"]
    else:
        padded["labels"] = torch.cat([batch["labels"], torch.full((rows, extra), -100)], dim=1)
    return padded


def _measure(model, tracker, batch, **masks):
    with tracker.record(**(masks or tracker.masks_for(batch))):
        model(**batch)
    return tracker.density_loss().detach(), tracker.layer_counts(), tracker.density()


@pytest.mark.parametrize("family, capture", FAMILY_CAPTURES)
def test_padding_changes_neither_loss_nor_density(family, capture):
    model = make_model(family)
    tracker = DensityTracker(model, DeftConfig(capture=capture, eps=1e-3))
    batch = make_batch(family, batch_size=2, seq_len=8, padding=False)
    padded = _pad_right(family, batch, extra=5)

    loss, counts, density = _measure(model, tracker, batch)
    padded_loss, padded_counts, padded_density = _measure(model, tracker, padded)
    torch.testing.assert_close(padded_loss, loss, rtol=1e-5, atol=1e-6)
    assert [entries for _, entries in padded_counts.values()] == [entries for _, entries in counts.values()]
    for name in counts:  # the same real activations, up to float noise in the attention over more columns
        assert abs(padded_counts[name][0] - counts[name][0]) <= 1
        assert padded_density[name] == pytest.approx(density[name], abs=2e-3)

    # The padded columns hold activations that would move the loss if they were counted.
    unmasked_loss, _, _ = _measure(model, tracker, padded, attention_mask=None)
    assert abs(unmasked_loss.item() - loss.item()) > 1e-4


def test_left_padding_is_masked_too():
    model = make_model("llama")
    batch = make_batch("llama", batch_size=3, seq_len=10)
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # real tokens at the end of the last row
    tracker = DensityTracker(model, DeftConfig(eps=1e-3))
    with ActivationRecorder("llama", model, "act") as recorder, tracker.record(**tracker.masks_for(batch)):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(tracker.density_loss(), hand_loss(recorder, real_token_masks("llama", batch), 1e-3))


def test_masks_for_decoder_only_and_encoder_only():
    for family in ("llama", "bert"):
        batch = make_batch(family)
        masks = DensityTracker(make_model(family)).masks_for(batch)
        assert list(masks) == ["attention_mask"] and masks["attention_mask"] is batch["attention_mask"]


@pytest.mark.parametrize("family", sorted(ENCODER_DECODER))
def test_masks_for_encoder_decoder(family):
    tracker = DensityTracker(make_model(family))
    batch = make_batch(family)
    masks = tracker.masks_for(batch)
    assert masks["attention_mask"] is batch["attention_mask"]
    assert torch.equal(masks["decoder_attention_mask"], (batch["labels"] != -100).long())
    explicit = torch.ones_like(batch["labels"])
    assert tracker.masks_for({**batch, "decoder_attention_mask": explicit})["decoder_attention_mask"] is explicit
    # Labels do not describe user-given decoder inputs.
    assert tracker.masks_for({**batch, "decoder_input_ids": batch["labels"].clamp(min=0)})["decoder_attention_mask"] is None


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_prompt_tuning_virtual_tokens_count_as_real(family):
    """Prompt tuning prepends virtual tokens: activations are longer than the attention mask, and the virtual
    positions are real positions the MLP computes (documented), so the loss and density count them."""
    virtual = 4
    task = "SEQ_2_SEQ_LM" if family in ENCODER_DECODER else "CAUSAL_LM"
    model = peft.get_peft_model(make_model(family), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=virtual))
    batch = make_batch(family)
    tracker = DensityTracker(model, DeftConfig(eps=1e-3))
    assert tracker.virtual_tokens == virtual
    with ActivationRecorder(family, model, "act") as recorder, tracker.record(**tracker.masks_for(batch)):
        model(**batch)

    first = tracker.sites[0]
    assert recorder.acts[first.name][0].shape[1] == batch["input_ids"].shape[1] + virtual  # longer than the mask
    masks = real_token_masks(family, batch, virtual_tokens=virtual)
    real_rows = int(batch["attention_mask"].sum()) + virtual * batch["input_ids"].shape[0]
    assert tracker.layer_counts()[first.name][1] == real_rows * INTERMEDIATE
    if family in ENCODER_DECODER:  # the decoder sees no virtual tokens
        last = tracker.sites[-1]
        assert tracker.layer_counts()[last.name][1] == int((batch["labels"] != -100).sum()) * INTERMEDIATE
    torch.testing.assert_close(tracker.density_loss(), hand_loss(recorder, masks, 1e-3))
