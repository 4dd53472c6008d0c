"""Tiny offline models, tokenizer and data for the integration tests.

Everything is built locally and deterministically: a byte-level BPE tokenizer trained on a generated corpus,
and randomly initialised 2-layer models (hidden 32, intermediate 64) of each architecture family DEFT supports.
Nothing is downloaded. Import as `from fixtures import ...` (pytest puts this folder on sys.path) or
`from integration_tests.fixtures import ...`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import random

import torch

FAMILIES = ["bert", "roberta", "t5", "t5_gated", "gpt2", "opt", "llama", "mistral", "qwen2", "gemma", "phi", "phi3"]
ENCODER_DECODER = {"t5", "t5_gated"}
ENCODER_ONLY = {"bert", "roberta"}
DECODER_ONLY = [f for f in FAMILIES if f not in ENCODER_DECODER | ENCODER_ONLY]

HIDDEN, INTERMEDIATE, LAYERS, HEADS, MAX_POSITIONS = 32, 64, 2, 2, 256

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# A chat template with {% generation %} markers, so assistant-only losses (TRL) work with it too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# ----------------------------------------------------------------------------------------------- text corpora
_SUBJECTS = ["the cat", "a dog", "the old man", "my friend", "the teacher", "a small bird", "the farmer", "our team",
             "the river", "a young girl", "the city", "this machine", "the baker", "a quiet student", "the moon"]
_VERBS = ["sees", "likes", "carries", "finds", "builds", "paints", "follows", "watches", "opens", "cleans",
          "remembers", "visits", "moves", "reads", "helps"]
_OBJECTS = ["a red ball", "the green door", "an old book", "the long road", "a warm bread", "the tall tree",
            "a bright lamp", "the wooden table", "a cold river", "the empty house", "a new song", "the blue sky"]
_TAILS = ["in the morning", "after the rain", "near the market", "with great care", "before dinner", "every day",
          "at night", "under the bridge", "on the hill", "for a while"]
_POSITIVE = ["good", "great", "happy", "lovely", "wonderful", "excellent"]
_NEGATIVE = ["bad", "awful", "sad", "terrible", "horrible", "poor"]
_NOUNS = ["cat", "dog", "river", "city", "book", "tree", "song", "house", "bridge", "market"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(_TAILS))
    return " ".join(words).capitalize() + "."


def make_texts(n: int = 64) -> list[str]:
    """`n` English-like texts; every third is short (one sentence), the others 2-6 sentences.
    Deterministic, and make_texts(k) == make_texts(n)[:k] for k <= n."""
    rng = random.Random(1234)
    texts = []
    for i in range(n):
        count = 1 if i % 3 == 0 else rng.randint(2, 6)
        texts.append(" ".join(_sentence(rng) for _ in range(count)))
    return texts


def make_labelled_texts(n: int = 64) -> tuple[list[str], list[int]]:
    """Texts with a label learnable from one word: 1 = a positive word, 0 = a negative word; balanced."""
    rng = random.Random(4321)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        mood = rng.choice(_POSITIVE if label else _NEGATIVE)
        texts.append(f"{_sentence(rng)[:-1]}, it was {mood}.")
        labels.append(label)
    return texts, labels


def make_alpaca_records(n: int = 64) -> list[dict]:
    rng = random.Random(2468)
    records = []
    for i in range(n):
        noun = rng.choice(_NOUNS)
        if i % 2:
            records.append({"instruction": f"Describe the {noun}.", "input": "", "output": _sentence(rng)})
        else:
            records.append({"instruction": "Repeat the sentence.", "input": (s := _sentence(rng)), "output": s})
    return records


# ------------------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=None)
def make_tokenizer():
    """A byte-level BPE tokenizer (any text encodes, no unknown tokens) trained on the fixture corpora,
    with <pad>/<s>/</s>/<unk>, role tokens and a chat template. Right padding, no automatic special tokens.
    Shared (cached): copy.deepcopy it before changing its settings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = make_texts(256) + make_labelled_texts(64)[0]
    corpus += [" ".join(r.values()) for r in make_alpaca_records(64)]
    corpus += ["### Instruction: ### Input: ### Response: Below is an instruction that describes a task."]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(SPECIAL_TOKENS.values()) + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        **SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------- models
def _config(family: str):
    import transformers as tf

    tok = make_tokenizer()
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id}
    decoder = {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
               "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "max_position_embeddings": MAX_POSITIONS}
    if family in ("bert", "roberta"):
        cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
        # RoBERTa offsets positions by pad_token_id + 1, so it needs a few more position embeddings.
        return cls(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, hidden_act="gelu", max_position_embeddings=MAX_POSITIONS + 8,
                   num_labels=2, **ids)
    if family in ("t5", "t5_gated"):
        return tf.T5Config(d_model=HIDDEN, d_ff=INTERMEDIATE, d_kv=HIDDEN // HEADS, num_layers=LAYERS,
                           num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
                           feed_forward_proj="relu" if family == "t5" else "gated-gelu",
                           decoder_start_token_id=tok.pad_token_id, num_labels=2, **ids)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS,
                             n_positions=MAX_POSITIONS, activation_function="gelu", num_labels=2, **ids)
    if family == "opt":
        return tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS,
                            word_embed_proj_dim=HIDDEN, activation_function="relu", num_labels=2, **ids)
    if family == "llama":
        return tf.LlamaConfig(hidden_act="silu", num_labels=2, **decoder, **ids)
    if family == "mistral":
        return tf.MistralConfig(hidden_act="silu", sliding_window=None, num_labels=2, **decoder, **ids)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_act="silu", num_labels=2, **decoder, **ids)
    if family == "gemma":
        return tf.GemmaConfig(head_dim=HIDDEN // HEADS, hidden_act="gelu_pytorch_tanh",
                              hidden_activation="gelu_pytorch_tanh", num_labels=2, **decoder, **ids)
    if family == "phi":
        return tf.PhiConfig(hidden_act="gelu_new", partial_rotary_factor=0.5, num_labels=2, **decoder, **ids)
    if family == "phi3":
        return tf.Phi3Config(hidden_act="silu", num_labels=2, **decoder, **ids)
    raise ValueError(f"unknown fixture family {family!r}; known: {FAMILIES}")


# Dropout is off so two forwards of the same batch agree (padding, checkpointing and dtype comparisons).
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout_rate",
                   "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "dropout", "attention_dropout",
                   "activation_dropout", "layerdrop", "embedding_dropout", "hidden_dropout", "resid_dropout",
                   "classifier_dropout_rate")


def make_config(family: str):
    """The tiny transformers config of `family` (dropout 0)."""
    config = _config(family)
    for field in _DROPOUT_FIELDS:
        if isinstance(getattr(config, field, None), float):
            setattr(config, field, 0.0)
    return config


def model_class(family: str, task: str = "lm"):
    """The transformers model class make_model builds for (family, task)."""
    import transformers as tf

    if task not in ("lm", "cls"):
        raise ValueError(f"task must be 'lm' or 'cls', got {task!r}")
    if family in ENCODER_ONLY:
        return tf.AutoModelForSequenceClassification
    if task == "cls":
        return tf.AutoModelForSequenceClassification
    if family in ENCODER_DECODER:
        return tf.AutoModelForSeq2SeqLM
    return tf.AutoModelForCausalLM


def make_model(family: str, task: str = "lm", seed: int = 0, dtype=torch.float32):
    """A tiny random model of `family` in train mode. task "lm": CausalLM (decoders), ForConditionalGeneration
    (T5), ForSequenceClassification with 2 labels (BERT/RoBERTa); task "cls": ForSequenceClassification."""
    config = make_config(family)
    with torch.random.fork_rng(devices=[]):  # deterministic without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_class(family, task).from_config(config)
    model.to(dtype)
    model.train()
    return model


# ----------------------------------------------------------------------------------------------------- data
def _token_rows(texts: list[str], length: int) -> list[list[int]]:
    """Each text's token ids, repeated as needed to fill `length` tokens exactly."""
    tok = make_tokenizer()
    rows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        while len(ids) < length:
            ids = ids + ids
        rows.append(ids[:length])
    return rows


def _padded(rows: list[list[int]], length: int, real_last: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (len(rows), length); the last row keeps `real_last` real tokens (right padding)."""
    pad = make_tokenizer().pad_token_id
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.ones_like(ids)
    if real_last is not None:
        ids[-1, real_last:] = pad
        mask[-1, real_last:] = 0
    return ids, mask


def _end_with_eos(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T5 convention (and T5ForSequenceClassification's requirement): each row's last real token is </s>."""
    ids = ids.clone()
    ids[torch.arange(ids.shape[0]), mask.sum(dim=1) - 1] = make_tokenizer().eos_token_id
    return ids


def make_batch(family: str, batch_size: int = 2, seq_len: int = 8, padding: bool = True, seed: int = 0,
               task: str = "lm") -> dict:
    """Model inputs for `family`: input_ids and attention_mask (batch_size, seq_len); with padding=True the last
    row has only seq_len // 2 real tokens, then right padding. labels: input_ids with -100 on padding (decoders),
    decoder targets of length max(2, seq_len // 2) with -100 padding in the last row (T5), class ids (BERT/RoBERTa,
    and every family with task="cls"). T5 rows end with </s>."""
    rng = random.Random(seed)
    texts = make_texts(64)
    picks = [rng.choice(texts) for _ in range(batch_size)]
    ids, mask = _padded(_token_rows(picks, seq_len), seq_len, max(1, seq_len // 2) if padding else None)
    if family in ENCODER_DECODER:
        ids = _end_with_eos(ids, mask)
    batch = {"input_ids": ids, "attention_mask": mask}
    if family in ENCODER_ONLY or task == "cls":
        batch["labels"] = torch.tensor([rng.randint(0, 1) for _ in range(batch_size)], dtype=torch.long)
    elif family in ENCODER_DECODER:
        target_len = max(2, seq_len // 2)
        targets = [rng.choice(texts) for _ in range(batch_size)]
        labels, target_mask = _padded(_token_rows(targets, target_len), target_len,
                                      max(1, target_len // 2) if padding else None)
        labels = _end_with_eos(labels, target_mask)
        batch["labels"] = labels.masked_fill(target_mask == 0, -100)
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def make_train_dataset(family: str, n: int = 32, seq_len: int = 16):
    """A tokenized datasets.Dataset with labels for transformers.Trainer / Seq2SeqTrainer (use make_collator).
    Decoders: causal LM on the texts. T5: copy the first words of the text. BERT/RoBERTa: sentiment label."""
    import datasets

    tok = make_tokenizer()
    if family in ENCODER_ONLY:
        texts, labels = make_labelled_texts(n)
        enc = tok(texts, truncation=True, max_length=seq_len)
        return datasets.Dataset.from_dict({**enc, "labels": labels})
    texts = make_texts(n)
    if family in ENCODER_DECODER:  # T5 convention: sources and targets end with </s>
        eos = tok.eos_token_id
        sources = [ids[: seq_len - 1] + [eos] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        targets = [ids[: max(2, seq_len // 2) - 1] + [eos] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        return datasets.Dataset.from_dict(
            {"input_ids": sources, "attention_mask": [[1] * len(x) for x in sources], "labels": targets}
        )
    enc = tok(texts, truncation=True, max_length=seq_len)
    return datasets.Dataset.from_dict({**enc, "labels": [list(ids) for ids in enc["input_ids"]]})


def make_collator(family: str):
    """A collator that pads a make_train_dataset batch: inputs with <pad>, mask with 0, token labels with -100."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if family in ENCODER_ONLY:
        return DataCollatorWithPadding(make_tokenizer())
    return DataCollatorForSeq2Seq(make_tokenizer(), padding=True, label_pad_token_id=-100)


# ---------------------------------------------------------------------------------------------------- files
def save_model_dir(family: str, path, task: str = "lm", seed: int = 0) -> pathlib.Path:
    """save_pretrained the fixture model and tokenizer of `family` into `path` (for from_pretrained, axolotl, CLI)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_model(family, task=task, seed=seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _write_jsonl(path, records) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_text_jsonl(path, n: int = 64) -> pathlib.Path:
    """{"text": ...} per line."""
    return _write_jsonl(path, ({"text": t} for t in make_texts(n)))


def write_alpaca_jsonl(path, n: int = 64) -> pathlib.Path:
    """{"instruction", "input", "output"} per line (input empty for every second record)."""
    return _write_jsonl(path, make_alpaca_records(n))


def write_labelled_jsonl(path, n: int = 64) -> pathlib.Path:
    """{"text", "label"} per line; label 1 when the text holds a positive word, 0 for a negative one."""
    texts, labels = make_labelled_texts(n)
    return _write_jsonl(path, ({"text": t, "label": y} for t, y in zip(texts, labels)))
