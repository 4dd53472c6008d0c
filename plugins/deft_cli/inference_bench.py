"""`deft bench --inference`: what calibrated sparsity buys at inference with kernel="sparse".

1. mlp: one MLP block at Llama-2-7B's shape (4096 -> 11008, gated SiLU) and at BERT-base's (768 -> 3072, GELU),
   batch 1, one token, at densities 0.5 ... 0.05 (τ = the (1 - density) quantile of |a| over 256 random tokens):
   dense forward vs the same block with install_sparse_mlp, given that density as its calibrated density (as
   apply_thresholds gives it: above the fallback limit the block is only masked). `limit` is the bound the weight
   bytes a sparse step still reads put on the speedup: gated 3 / (1 + 2d), non-gated 2 / (1 + d).
2. decode: generate() of a random-weight Llama-shaped model (hidden 2048, intermediate 5632, 16 layers, vocab
   32000), thresholds calibrated to each density with calibrate_thresholds, greedy, 32 new tokens after an
   8-token prompt. `limit` = bytes read per token dense / sparse (attention, norms, LM head, and the MLP bytes
   still read; the KV cache is left out).
3. encoder: the demo model (all-MiniLM-L6-v2) forward at batch 32 (128 tokens) with thresholds calibrated at
   sparsity 0.99: many rows at once, so the fallback rule computes densely.

Dense and sparse are measured in one process, interleaved (each round runs both, back to back, in alternating
order), and reported as medians over rounds; `speedup` = median dense time / median sparse time. Writes
DIR/inference.json.
"""

from __future__ import annotations

import contextlib
import json
import pathlib

import torch
from torch import nn

from deft_common import (DeftConfig, apply_thresholds, calibrate_thresholds, find_mlp_sites, install_sparse_mlp,
                         measure_histograms)
from deft_common.architectures import gated_mlp
from deft_common.sparsity import speedup_limit

from .measure import cpu_name, interleaved, median, timed

DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05)
MLP_SHAPES = {False: {"gated": (4096, 11008), "plain": (768, 3072)}, True: {"gated": (256, 688), "plain": (64, 256)}}
DECODE_SHAPE = {False: dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, vocab_size=32000),
                True: dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, vocab_size=512,
                           num_attention_heads=4, num_key_value_heads=4)}
DECODE_NEW_TOKENS = {False: 32, True: 8}
PROMPT_TOKENS = 8
ENCODER_SPARSITY = 0.99
ENCODER_BATCH = {False: (32, 128), True: (4, 16)}
MLP_TIMED_SECONDS = 0.05  # each mlp timing calls the block this long at least (a 2 ms block: 25 calls)


# ------------------------------------------------------------------------------------------------ timing
def dense_and_sparse(run, sparse_on, rounds: int, calls: int = 1, warm: bool = False) -> tuple[float, float]:
    """(median dense seconds, median sparse seconds): each round times `run` as it is and inside the context
    `sparse_on()`, interleaved (deft_cli.measure: the order alternating, round 0 a warm-up). warm=True: one
    untimed call inside the context first (one-off work such as the transposed down-projection copy stays outside
    the timing)."""
    def sparse():
        with sparse_on():
            if warm:
                run()
            return timed(run, calls=calls)

    times = interleaved({"dense": lambda: timed(run, calls=calls), "sparse": sparse}, rounds)
    return median(times["dense"]), median(times["sparse"])


# ---------------------------------------------------------------------------------------------- mlp rows
class GeluMlp(nn.Module):
    """BERT-base's MLP: BertIntermediate (dense + GELU) and BertOutput (dense, dropout, residual LayerNorm)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        config = BertConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="gelu")
        self.intermediate, self.output = BertIntermediate(config), BertOutput(config)

    def forward(self, x):
        return self.output(self.intermediate(x), x)


def _mlp_block(gated: bool, hidden: int, intermediate: int, dtype) -> nn.Module:
    if gated:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        block = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))
    else:
        block = GeluMlp(hidden, intermediate)
    return block.to(dtype).eval()


def _tau_for_density(block: nn.Module, site, density: float, dtype) -> float:
    """τ calibrated as a user would (calibrate_thresholds) at sparsity 1 - density, on 256 random tokens
    (x ~ N(0, 1)) through the block alone."""
    x = torch.randn(1, 256, _hidden_of(block), generator=torch.Generator().manual_seed(1)).to(dtype)
    return calibrate_thresholds(block, [{"x": x}], sparsity=1.0 - density).thresholds[site.name]


def _hidden_of(block: nn.Module) -> int:
    return block.gate_proj.in_features if hasattr(block, "gate_proj") else block.intermediate.dense.in_features


def mlp_limit(gated: bool, density: float, capture: str = "act") -> float:
    return speedup_limit(gated, capture, density)


def mlp_rows(tiny: bool, dtypes, densities, rounds: int, **rule) -> list[dict]:
    """The `mlp` section: per block shape, dtype and density, dense vs sparse. `rule`: install_sparse_mlp's
    fallback rule (e.g. max_active_fraction=1.0 forces the sparse path)."""
    rows = []
    torch.manual_seed(0)
    for kind, (hidden, intermediate) in MLP_SHAPES[tiny].items():
        gated = kind == "gated"
        for dtype in dtypes:
            block = _mlp_block(gated, hidden, intermediate, dtype)
            site = find_mlp_sites(block, DeftConfig(capture="act"))[0]
            x = torch.randn(1, 1, hidden, generator=torch.Generator().manual_seed(2)).to(dtype)
            run = _no_grad(lambda: block(x))
            calls = 20 if tiny else max(3, round(MLP_TIMED_SECONDS / timed(run, calls=3)))  # small blocks: more calls
            for density in densities:
                tau = _tau_for_density(block, site, density, dtype)
                sparse_on = lambda: _sparse_block(block, site, tau, {"calibrated_density": density, **rule})
                dense_s, sparse_s = dense_and_sparse(run, sparse_on, rounds, calls, warm=True)
                speedup = dense_s / sparse_s
                limit = mlp_limit(gated, density)
                rows.append({"shape": f"{hidden}->{intermediate}", "gated": gated, "dtype": str(dtype).split(".")[-1],
                             "density": density, "dense_ms": round(dense_s * 1e3, 4),
                             "sparse_ms": round(sparse_s * 1e3, 4), "speedup": round(speedup, 3),
                             "limit": round(limit, 3), "fraction_of_limit": round(speedup / limit, 3)})
            del block
    return rows


@contextlib.contextmanager
def _sparse_block(block, site, tau, rule):
    handle = install_sparse_mlp(block, site, tau, "act", **rule)
    try:
        yield
    finally:
        handle.remove()


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


# ------------------------------------------------------------------------------------------- decode rows
def _decode_model(tiny: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**DECODE_SHAPE[tiny], hidden_act="silu", max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.eval()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_limit(model, density: float, capture: str = "act") -> float:
    """Weight bytes read per generated token dense / with sparse MLPs at `density` (the active fraction at
    `capture`): everything but the input embedding (one row of it is read; the LM head reads it all when tied), the
    MLP blocks' bytes divided by their bound (sparsity.speedup_limit: gated "act" 3/(1+2d), gated "down_in"
    3/(2+d), non-gated 2/(1+d)). The KV cache is left out."""
    sites = find_mlp_sites(model, capture=capture)
    blocks = [model.get_submodule(site.name) for site in sites]
    mlp = sum(_bytes(block.parameters()) for block in blocks)
    gated = gated_mlp(blocks[0]) is not None
    embedding = _bytes(model.get_input_embeddings().parameters())
    total = _bytes(model.parameters()) - embedding
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        total += embedding
    return total / (total - mlp + mlp / speedup_limit(gated, capture, density))


def _decode_rows(tiny: bool, densities, rounds: int) -> list[dict]:
    model = _decode_model(tiny)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(3)
    calibration = [{"input_ids": torch.randint(vocab, (4, 64), generator=generator)} for _ in range(2)]
    histograms = measure_histograms(model, calibration, DeftConfig(capture="act"))
    prompt = torch.randint(vocab, (1, PROMPT_TOKENS), generator=generator)
    new = DECODE_NEW_TOKENS[tiny]
    kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                  do_sample=False, pad_token_id=0)

    def generate():
        with torch.no_grad():
            return model.generate(**kwargs)

    rows = []
    for density in densities:
        th = histograms.thresholds(1.0 - density)
        dense_s, sparse_s = dense_and_sparse(generate, lambda: apply_thresholds(model, th, kernel="sparse"), rounds)
        dense_tps, sparse_tps = new / dense_s, new / sparse_s
        rows.append({"density": density, "calibrated_density": round(th.mean_calibrated_density(), 4),
                     "dense_tokens_per_s": round(dense_tps, 3), "sparse_tokens_per_s": round(sparse_tps, 3),
                     "speedup": round(sparse_tps / dense_tps, 3), "limit": round(decode_limit(model, density), 3)})
    return rows


# ---------------------------------------------------------------------------------------------- encoder
def _encoder_row(tiny: bool, rounds: int) -> dict:
    from .data import default_model_dir
    from transformers import AutoModel

    folder = default_model_dir()
    model = AutoModel.from_pretrained(folder).eval()
    batch, length = ENCODER_BATCH[tiny]
    generator = torch.Generator().manual_seed(4)
    vocab = model.config.vocab_size

    def inputs(rows):
        ids = torch.randint(1000, vocab, (rows, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    th = measure_histograms(model, [inputs(batch) for _ in range(2)], DeftConfig(capture="act")) \
        .thresholds(ENCODER_SPARSITY)
    x = inputs(batch)
    forward = _no_grad(lambda: model(**x))
    dense_s, sparse_s = dense_and_sparse(forward, lambda: apply_thresholds(model, th, kernel="sparse"), rounds)
    dense_ms, sparse_ms = dense_s * 1e3, sparse_s * 1e3
    return {"model": folder.parent.name if folder.name == "model" else folder.name, "batch": batch,
            "tokens": length, "sparsity": ENCODER_SPARSITY, "dense_ms": round(dense_ms, 3),
            "sparse_ms": round(sparse_ms, 3), "speedup": round(dense_ms / sparse_ms, 3)}


# ------------------------------------------------------------------------------------------------ report
def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run_inference_bench(out_dir, tiny: bool = False, rounds: int | None = None, densities=DENSITIES,
                        dtypes=None, sections=("mlp", "decode", "encoder")) -> dict:
    """Measure the `mlp`, `decode` and `encoder` sections (module docstring), write OUT_DIR/inference.json and
    return the same dict. tiny=True: the same on tiny shapes, in seconds. dtypes default: fp32, and bf16 where
    the CPU has it natively (always in tiny runs)."""
    if dtypes is None:
        dtypes = [torch.float32] + ([torch.bfloat16] if (tiny or cpu_has_bf16()) else [])
    rounds = rounds or (3 if tiny else 9)
    results = {"threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__, "tiny": tiny}
    if "mlp" in sections:
        results["mlp"] = mlp_rows(tiny, dtypes, densities, rounds)
    if "decode" in sections:
        results["decode"] = _decode_rows(tiny, densities, max(1, rounds // 3))
    if "encoder" in sections:
        results["encoder"] = _encoder_row(tiny, rounds)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inference.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def format_inference_report(results: dict) -> str:
    lines = [f"threads {results['threads']}, cpu {results['cpu']}, torch {results['torch']}"]
    if results.get("mlp"):
        lines += ["", "mlp (batch 1, one token)",
                  f"{'shape':>12} {'gated':>5} {'dtype':>8} {'density':>7} {'dense ms':>9} {'sparse ms':>9} "
                  f"{'speedup':>7} {'limit':>6} {'of limit':>8}"]
        for r in results["mlp"]:
            lines.append(f"{r['shape']:>12} {str(r['gated']):>5} {r['dtype']:>8} {r['density']:>7} "
                         f"{r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} {r['speedup']:>7.2f} {r['limit']:>6.2f} "
                         f"{r['fraction_of_limit']:>8.2f}")
    if results.get("decode"):
        lines += ["", "decode (generate, greedy)",
                  f"{'density':>7} {'calibrated':>10} {'dense tok/s':>11} {'sparse tok/s':>12} {'speedup':>7} "
                  f"{'limit':>6}"]
        for r in results["decode"]:
            lines.append(f"{r['density']:>7} {r['calibrated_density']:>10.3f} {r['dense_tokens_per_s']:>11.2f} "
                         f"{r['sparse_tokens_per_s']:>12.2f} {r['speedup']:>7.2f} {r['limit']:>6.2f}")
    if results.get("encoder"):
        e = results["encoder"]
        lines += ["", f"encoder ({e['model']}, batch {e['batch']} x {e['tokens']} tokens, sparsity {e['sparsity']}): "
                      f"dense {e['dense_ms']:.1f} ms, sparse {e['sparse_ms']:.1f} ms, speedup {e['speedup']:.2f}"]
    return "\n".join(lines)

