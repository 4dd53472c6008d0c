"""The demo's texts: the records split into training and held-out ones, tokenized, and batched."""

from __future__ import annotations

import torch

from ..data import DeftDataError, label_ids, load_imdb, read_jsonl, split
from .settings import DemoSettings


def load_records(settings: DemoSettings) -> tuple[list[dict], list[dict], list]:
    """(train, held_out, label names) with integer labels; IMDB unless settings.data names a JSONL file."""
    if settings.data is None:
        records, names = load_imdb(), ["negative", "positive"]
    else:
        records = read_jsonl(settings.data, need_labels=True)
        ids, names = label_ids(records)
        records = [{"text": r["text"], "label": y} for r, y in zip(records, ids)]
    if len(names) < 2:
        raise DeftDataError(f"{settings.data}: every record has the label {names[0]!r}; classification needs at least 2 labels")
    train, held_out = split(records, settings.train_size, settings.eval_size, settings.seed)
    return train, held_out, names


def encode(tokenizer, records: list[dict], max_length: int) -> list[list[int]]:
    """The token ids of each record's text, truncated to max_length."""
    return tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)["input_ids"]


def batches(tokenizer, encodings, labels, order, batch_size, device):
    """Padded batches (with "labels") of the rows `order` names, batch_size at a time, on `device`."""
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encodings[i] for i in rows]}, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in rows])
        yield {k: v.to(device) for k, v in batch.items()}


def scoring_batches(tokenizer, records: list[dict], max_length: int, device, batch_size: int = 32) -> list[dict]:
    """Every record once, in order, in batches of 32: what the demo scores and calibrates on."""
    return list(batches(tokenizer, encode(tokenizer, records, max_length), [r["label"] for r in records],
                        range(len(records)), batch_size, device))


def training_order(n: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """Record indices for `steps` batches: whole epochs, each a fresh permutation drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch_size // n)
    return [i for _ in range(epochs) for i in torch.randperm(n, generator=generator).tolist()]
