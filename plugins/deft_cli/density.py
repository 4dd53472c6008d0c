"""Per-layer activation density of a model on a set of texts, and `deft density`.

Density of an MLP layer = active entries / real entries of its activation, over every real (non-padding) token
of every text. Two counts per layer, always named: "exact-zero" density (|a| > 0, the paper's metric) and
"thresholded" density (|a| > τ).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass

import torch

from deft_common import DeftConfig, DensityTracker

from .checks import number, whole
from .data import DeftDataError, check_model_dir, read_jsonl, reports_errors


@dataclass
class LayerDensity:
    layer: str  # MLP block name, e.g. "bert.encoder.layer.0"
    exact: float  # fraction of entries with a != 0
    thresholded: float  # fraction of entries with |a| > threshold
    entries: int  # real entries counted (real tokens x intermediate size)


def mean(layers: list[LayerDensity], field: str = "exact") -> float:
    return sum(getattr(layer, field) for layer in layers) / len(layers)


@torch.no_grad()
def measure_density(model, batches, threshold: float, on_outputs=None, body=None, capture: str = "act"
                    ) -> list[LayerDensity]:
    """Run `model` (eval mode, no gradient) on each batch and count the MLP activations of `body` (default: the
    model itself; pass the transformer inside a wrapper to get its own layer names) at `capture`: measure thresholds
    at the capture point they were calibrated at (SparsityThresholds.capture). `on_outputs(batch, outputs)` is
    called per batch, e.g. to score accuracy in the same pass."""
    config = DeftConfig(coef=0.0, threshold=threshold, capture=capture)
    tracker = DensityTracker(body if body is not None else model, config)
    totals: dict[str, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with tracker.record(**tracker.masks_for(inputs)):
                outputs = model(**inputs)
            exact, above = tracker.layer_counts(0.0), tracker.layer_counts(threshold)
            for name, (active, entries) in exact.items():
                count = totals.setdefault(name, [0, 0, 0])
                count[0] += active
                count[1] += above[name][0]
                count[2] += entries
            if on_outputs is not None:
                on_outputs(batch, outputs)
    finally:
        tracker.remove()
        model.train(was_training)
    if not totals:
        raise DeftDataError("no token reached the MLP layers: the texts are empty after tokenization")
    names = [site.name for site in tracker.sites]
    return [LayerDensity(n, totals[n][0] / totals[n][2], totals[n][1] / totals[n][2], totals[n][2]) for n in names if n in totals]


def relative_reduction(before: float, after: float) -> float:
    """How much lower `after` is than `before`, as a fraction of `before` (0.4 = 40% lower)."""
    return (before - after) / before if before > 0 else 0.0


def signed_percent(value: float, digits: int = 1) -> str:
    """A relative change with its sign, "+12.3%" or "-0.4%"; one that rounds to zero is "0.0%" (no "-0.0%")."""
    text = f"{value:+.{digits}%}"
    return f"{0:.{digits}%}" if float(text[:-1]) == 0 else text


def format_table(runs: dict[str, list[LayerDensity]], threshold: float) -> str:
    """A per-layer table. One run: its two densities. Two runs (baseline first): both, side by side, with the
    relative change of the second against the first (negative: sparser), and a mean row."""
    names = list(runs)
    rows_by_layer = list(zip(*runs.values()))
    thr = f"|a|>{threshold:g}"
    if len(names) == 1:
        header = ["layer", "exact-zero density", f"thresholded density ({thr})"]
        body = [[r[0].layer, f"{r[0].exact:.4f}", f"{r[0].thresholded:.4f}"] for r in rows_by_layer]
        layers = runs[names[0]]
        body.append(["mean", f"{mean(layers):.4f}", f"{mean(layers, 'thresholded'):.4f}"])
    else:
        a, b = names
        header = ["layer", f"{a} exact-zero", f"{b} exact-zero", "change",
                  f"{a} {thr}", f"{b} {thr}", "change"]

        def row(label, ea, eb, ta, tb):
            return [label, f"{ea:.4f}", f"{eb:.4f}", signed_percent(-relative_reduction(ea, eb)),
                    f"{ta:.4f}", f"{tb:.4f}", signed_percent(-relative_reduction(ta, tb))]

        body = [row(la.layer, la.exact, lb.exact, la.thresholded, lb.thresholded) for la, lb in rows_by_layer]
        ra, rb = runs[a], runs[b]
        body.append(row("mean", mean(ra), mean(rb), mean(ra, "thresholded"), mean(rb, "thresholded")))
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    fmt = lambda line: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


# ------------------------------------------------------------------------------------------------- loading
def load_model(model_dir, adapter_dir=None):
    """A saved model folder, optionally with a saved PEFT adapter on top, in eval mode, plus its tokenizer.
    The head is chosen from the adapter's task type or the model's architecture; density only needs the body."""
    import transformers

    model_dir = check_model_dir(model_dir)
    auto = transformers.AutoModel
    adapter = read_adapter_config(adapter_dir) if adapter_dir is not None else {}
    task_type = adapter.get("task_type")
    heads = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
             "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification"}
    config = transformers.AutoConfig.from_pretrained(model_dir)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if task_type in heads:
        auto = getattr(transformers, heads[task_type])
    elif architecture and hasattr(transformers, architecture):
        auto = getattr(transformers, architecture)
    try:
        model = auto.from_pretrained(model_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise DeftDataError(f"could not load the model or tokenizer in {str(model_dir)!r}: {err}") from err
    if adapter_dir is not None:
        model = _with_adapter(model, model_dir, pathlib.Path(adapter_dir), adapter)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval()
    return model, tokenizer


def read_adapter_config(adapter_dir) -> dict:
    """The adapter folder's adapter_config.json, or a message that says what is wrong with the folder."""
    path = pathlib.Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise DeftDataError(
            f"{str(adapter_dir)!r} holds no adapter_config.json; pass a folder saved with "
            "PeftModel.save_pretrained(DIR) as --adapter"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DeftDataError(f"{path} is not valid JSON ({err}); save the adapter again with "
                            "PeftModel.save_pretrained(DIR)") from err
    if not isinstance(config, dict):
        raise DeftDataError(f"{path} holds no adapter settings (a JSON object); save the adapter again")
    return config


def _with_adapter(model, model_dir, adapter_dir: pathlib.Path, adapter: dict):
    """`model` with the PEFT adapter of adapter_dir on it; an adapter made for another base model is a message
    that names the base model it was made for, not a traceback."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except (ValueError, RuntimeError, KeyError, AttributeError) as err:
        made_for = adapter.get("base_model_name_or_path")
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DeftDataError(
            f"the adapter in {str(adapter_dir)!r} does not fit the model in {str(model_dir)!r}"
            + (f"; it was made for {made_for!r}" if made_for else "")
            + f" ({type(err).__name__}: {first_line[:300]}); pass as MODEL the base model the adapter was trained on"
        ) from err


def text_batches(model, tokenizer, texts: list[str], batch_size: int, max_length: int, labels=None):
    """Padded model-input batches of `texts` (truncated to max_length). Encoder-decoder models get the text
    itself as the teacher-forced decoder input, so their decoder density is measured too."""
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    for start in range(0, len(texts), batch_size):
        batch = dict(tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                               padding=True, return_tensors="pt"))
        batch.pop("token_type_ids", None)  # all zeros for single texts: the model's default
        if is_encoder_decoder:
            batch["decoder_input_ids"] = _shift_right(batch["input_ids"], model.config)
            batch["decoder_attention_mask"] = batch["attention_mask"]
        if labels is not None:
            batch["labels"] = torch.tensor(labels[start:start + batch_size])
        yield {k: v.to(model.device) for k, v in batch.items()}


def _shift_right(input_ids: torch.Tensor, config) -> torch.Tensor:
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    shifted = input_ids.new_full(input_ids.shape, start)
    shifted[:, 1:] = input_ids[:, :-1]
    return shifted


# ----------------------------------------------------------------------------------------------------- CLI
def add_density_command(subparsers) -> None:
    p = subparsers.add_parser(
        "density",
        help="per-layer MLP activation density of a saved model or adapter on your text",
        description="Measure the per-layer MLP activation density of a saved model (optionally with a PEFT adapter) "
        "on the texts of a JSONL file (one {\"text\": ...} object per line).",
    )
    p.add_argument("model", metavar="MODEL", help="local Hugging Face model folder (the base model when --adapter is given)")
    p.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT adapter folder to apply on MODEL")
    p.add_argument("--data", metavar="FILE.jsonl", required=True, help='texts, one {"text": ...} per line')
    p.add_argument("--threshold", type=float, default=1e-3, help="τ of the thresholded density |a| > τ (default 1e-3)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use only the first N texts")
    p.add_argument("--thresholds", metavar="DIR", help="measure with the sparsity thresholds of DIR/deft_thresholds.json "
                   "applied (written by `deft sparsify` or at the end of training)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=density_command)


def check_args(args) -> None:
    """Every argument of `deft density` and `deft sparsify` they share, before anything loads: a message that
    names the flag and the fix."""
    number("--threshold", getattr(args, "threshold", 0.0), minimum=0.0, fix="0 counts exact non-zeros; e.g. 1e-3")
    whole("--max-length", args.max_length, 1)
    whole("--batch-size", args.batch_size, 1)
    if args.limit is not None:
        whole("--limit", args.limit, 1, fix="leave it out to use every text")
    check_model_dir(args.model)
    if args.adapter is not None:
        read_adapter_config(args.adapter)


@reports_errors
def density_command(args) -> int:
    check_args(args)
    thresholds = None
    if args.thresholds:
        from deft_common import SparsityThresholds

        thresholds = SparsityThresholds.load(args.thresholds)  # a missing or bad file fails before the model loads
    records = read_jsonl(args.data, need_labels=False)[: args.limit]
    model, tokenizer = load_model(args.model, args.adapter)
    texts = [r["text"] for r in records]
    batches = text_batches(model, tokenizer, texts, args.batch_size, args.max_length)
    if thresholds is not None:
        from deft_common import apply_thresholds

        with apply_thresholds(model, thresholds):  # measured where the thresholds zero
            layers = measure_density(model, batches, args.threshold, capture=thresholds.capture)
    else:
        layers = measure_density(model, batches, args.threshold)
    if args.json:
        print(json.dumps({
            "model": str(args.model), "adapter": args.adapter, "data": str(args.data), "texts": len(texts),
            "threshold": args.threshold, "density": mean(layers), "density_thresholded": mean(layers, "thresholded"),
            "layers": [asdict(layer) for layer in layers],
        }, indent=2))
    else:
        print(f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {len(texts)} texts of {args.data}")
        print(format_table({"model": layers}, args.threshold))
    return 0
