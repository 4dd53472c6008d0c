"""`deft sparsify`: calibrate sparsity thresholds for a saved model on your texts and say what they cost.

The first part of the texts calibrates (deft_common.calibrate_thresholds); on the rest (held out) the command
measures each block's density with the thresholds applied and how far the sparsified model is from the dense
one: the relative error of each MLP block's output and, for a causal LM, the perplexity of both.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import torch

from deft_common import THRESHOLDS_FILE, DeftConfig, apply_thresholds, calibrate_thresholds, find_mlp_sites

from .checks import DeftArgumentError, check_output_dir
from .data import DeftDataError, read_jsonl, reports_errors
from .density import check_args as check_density_args
from .density import load_model, measure_density, signed_percent, text_batches


def held_out_difference(model, batches, thresholds) -> dict:
    """Dense vs thresholded on the same batches: per MLP block ||y_sparse - y_dense|| / ||y_dense|| of the block's
    output (the down-projection's, over real tokens; errors of earlier blocks carry forward, as in use), and
    for a causal LM the perplexity of both."""
    sites = [s for s in find_mlp_sites(model, DeftConfig(capture=thresholds.capture)) if s.name in thresholds.thresholds]
    outputs: dict[str, torch.Tensor] = {}
    handles = [site.down.register_forward_hook(lambda _m, _a, out, name=site.name: outputs.__setitem__(name, out))
               for site in sites]
    squared_error = {s.name: 0.0 for s in sites}
    squared_norm = {s.name: 0.0 for s in sites}
    causal = _is_causal_lm(model)
    nll = {"dense": 0.0, "sparse": 0.0}
    tokens = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                dense_out = model(**inputs)
                dense = dict(outputs)
                with apply_thresholds(model, thresholds):
                    sparse_out = model(**inputs)
                real = inputs["attention_mask"].reshape(-1).bool()
                for name in squared_error:
                    d, s = (t.reshape(-1, t.shape[-1])[real].float() for t in (dense[name], outputs[name]))
                    squared_error[name] += float(((s - d) ** 2).sum())
                    squared_norm[name] += float((d ** 2).sum())
                if causal:
                    for key, out in (("dense", dense_out), ("sparse", sparse_out)):
                        nll[key] += _token_nll(out.logits, inputs["input_ids"], inputs["attention_mask"])
                    tokens += int(inputs["attention_mask"][:, 1:].sum())
    finally:
        for handle in handles:
            handle.remove()
    result = {"relative_error": {n: math.sqrt(squared_error[n] / squared_norm[n]) if squared_norm[n] else 0.0
                                 for n in squared_error}}
    if causal and tokens:
        result["perplexity"] = {key: math.exp(value / tokens) for key, value in nll.items()}
    return result


def _is_causal_lm(model) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = getattr(model, "get_base_model", lambda: model)()
    return type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum of next-token negative log-likelihoods over the real positions."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:]
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return float(-(picked * mask[:, 1:]).sum())


# ----------------------------------------------------------------------------------------------------- CLI
def add_sparsify_command(subparsers) -> None:
    p = subparsers.add_parser(
        "sparsify",
        help="calibrate per-layer sparsity thresholds for a saved model and measure what they cost",
        description="Calibrate per-MLP-block thresholds (|a| at or below the block's SPARSITY-quantile is set to 0 "
        "at inference) on part of the texts of a JSONL file, write deft_thresholds.json, and report on the rest: "
        "per-layer density with the thresholds, each block's output error and, for a causal LM, perplexity.",
    )
    p.add_argument("model", metavar="MODEL", help="local Hugging Face model folder (the base model when --adapter is given)")
    p.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT adapter folder to apply on MODEL")
    p.add_argument("--data", metavar="FILE.jsonl", required=True, help='texts, one {"text": ...} per line')
    p.add_argument("--sparsity", type=float, required=True, help="fraction of activations to set to zero, in [0, 1)")
    p.add_argument("--out", metavar="DIR", help="where to write deft_thresholds.json (default: the adapter folder, "
                   "else the model folder)")
    p.add_argument("--capture", choices=("act", "down_in"), default="act",
                   help="where to threshold: the activation output (act) or the down-projection input (down_in)")
    p.add_argument("--calibration-share", type=float, default=0.5,
                   help="share of the texts used to calibrate; the rest is held out (default %(default)g)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use only the first N texts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=sparsify_command)


def check_args(args) -> pathlib.Path:
    """Every argument of `deft sparsify`, before anything loads: a message that names the flag and the fix. The
    folder deft_thresholds.json will go to (--out, else the adapter's or the model's folder)."""
    check_density_args(args)
    if not 0.0 <= args.sparsity < 1.0:  # NaN fails too
        raise DeftArgumentError(f"--sparsity {args.sparsity} must be in [0, 1): the fraction of the activations set "
                                "to 0, e.g. 0.9")
    if not 0.0 < args.calibration_share < 1.0:
        raise DeftArgumentError(f"--calibration-share {args.calibration_share} must be in (0, 1): part of the texts "
                                "calibrates, the rest is held out")
    flag = "--out" if args.out else ("--adapter (where the thresholds go without --out)" if args.adapter
                                     else "MODEL (where the thresholds go without --out)")
    return check_output_dir(args.out or args.adapter or args.model, flag=flag)


@reports_errors
def sparsify_command(args) -> int:
    out = check_args(args)
    texts = [r["text"] for r in read_jsonl(args.data, need_labels=False)[: args.limit]]
    split = int(round(len(texts) * args.calibration_share))
    if split < 1 or split >= len(texts):
        raise DeftDataError(f"{args.data} has {len(texts)} text(s): too few to calibrate on {args.calibration_share:g} "
                            "of them and hold out the rest; give at least 2 texts")
    model, tokenizer = load_model(args.model, args.adapter)
    config = DeftConfig(coef=0.0, capture=args.capture)
    batches = lambda part: text_batches(model, tokenizer, part, args.batch_size, args.max_length)
    thresholds = calibrate_thresholds(model, batches(texts[:split]), sparsity=args.sparsity, config=config)
    path = out / THRESHOLDS_FILE
    replaced = path.is_file()
    with apply_thresholds(model, thresholds):
        held_out = {d.layer: d.exact for d in measure_density(model, batches(texts[split:]), 0.0,
                                                                capture=thresholds.capture)}
    difference = held_out_difference(model, batches(texts[split:]), thresholds)
    layers = [{"layer": name, "threshold": tau, "calibrated_density": 1 - thresholds.calibrated[name],
               "held_out_density": held_out[name], "relative_error": difference["relative_error"][name]}
              for name, tau in thresholds.thresholds.items()]
    result = {"model": str(args.model), "adapter": args.adapter, "data": str(args.data), "sparsity": args.sparsity,
              "capture": args.capture, "calibration_texts": split, "held_out_texts": len(texts) - split,
              "calibration_tokens": thresholds.tokens, "thresholds_file": str(path), "layers": layers,
              **({"perplexity": difference["perplexity"]} if "perplexity" in difference else {})}
    # printed first, then written: a failed write loses nothing, and says where and why
    print(json.dumps(result, indent=2) if args.json else format_sparsify(result), flush=True)
    try:
        thresholds.save(out)
    except OSError as err:
        raise DeftArgumentError(f"could not write {path}: {err.strerror or err}") from err
    if replaced:  # e.g. the file training wrote beside the adapter
        print(f"deft sparsify: note: replaced the {THRESHOLDS_FILE} that was in {out}; give --out DIR to keep it",
              file=sys.stderr)
    if not args.json:
        print(f"wrote {path}")
    return 0


def format_sparsify(result: dict) -> str:
    header = ["layer", "τ", "calibrated density", "held-out density", "output rel. error"]
    rows = [[r["layer"], f"{r['threshold']:.4g}", f"{r['calibrated_density']:.4f}", f"{r['held_out_density']:.4f}",
             f"{r['relative_error']:.4f}"] for r in result["layers"]]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    lines = [f"{result['model']}{' + ' + result['adapter'] if result['adapter'] else ''}: sparsity "
             f"{result['sparsity']:g} at capture={result['capture']!r}, calibrated on {result['calibration_texts']} "
             f"texts ({result['calibration_tokens']} tokens), measured on {result['held_out_texts']} held-out texts",
             fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    if "perplexity" in result:
        ppl = result["perplexity"]
        lines.append(f"held-out perplexity: dense {ppl['dense']:.3f}, sparsified {ppl['sparse']:.3f} "
                     f"({signed_percent(ppl['sparse'] / ppl['dense'] - 1, 2)})")
    return "\n".join(lines)
