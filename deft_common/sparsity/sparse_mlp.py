"""Sparse execution of thresholded MLP blocks: the multiply-adds and weight bytes behind the zeros are skipped.

`apply_thresholds(model, th, kernel="sparse")` calls `install_sparse_mlp` once per thresholded block. The outputs
equal the `kernel="mask"` path (every |a| <= τ set to 0) within float rounding.

- Gated MLPs (Llama, Mistral, Qwen2/3, Gemma, Phi-3's fused gate_up_proj, gated T5), capture="act": the gate is
  computed densely, thresholded after its activation, then the up- and down-projection run only over the active
  neurons (the CATS scheme). A step reads 1 + 2d of the 3 weight matrices (bound on the speedup: 3 / (1 + 2d)).
- Gated MLPs, capture="down_in": gate and up are computed densely, h = act(gate) * up is thresholded at the
  down-projection's input, then the down-projection runs only over the active rows (TEAL's scheme for that
  matrix). A step reads 2 + d of the 3 weight matrices (bound: 3 / (2 + d)); these thresholds hold a causal LM's
  perplexity better than gate-side ones at the same sparsity, the gate-side ones skip more bytes.
- Non-gated MLPs (GPT-2, OPT, BERT/RoBERTa, T5 v1.0), either capture point: the up-projection is dense (its
  output decides what is active), the down-projection runs only over the active rows (bound: 2 / (1 + d)).

`speedup_limit(gated, capture, d)` gives these bounds.

Where it is used (the fallback rule): the sparse path is taken when the block sees at most `MAX_SPARSE_ROWS`
token rows at once and the union of their active neurons is at most `MAX_ACTIVE_FRACTION` of the width; otherwise
the block computes densely (the mask path, reusing the gate already computed), so prefill, training-size batches
and high densities cost what dense costs. The sparse path also needs no autograd: with gradients enabled it computes
densely (masked) as well. A block whose calibrated density (apply_thresholds passes it) is already above the limit
is only masked, decided once at install: no forward override, no per-token check and no weight copy, since nearly
every token would fall back anyway (a non-gated BERT-base block at density 0.5 ran 0.89-0.92x dense with the
per-token check, 1.01x masked only).

Kernels: sparsity.kernels (C++ where a compiler is found, else plain torch ops, which are correct but slower and
have a lower crossover).

Memory: the down-projection's weight is kept a second time, transposed (intermediate x hidden, contiguous), so the
selected neurons' weights are contiguous rows: +1/3 of a gated MLP's weights, +1/2 of a non-gated one's (GPT-2's
Conv1D already stores it that way: no copy). The copy is refreshed when the weight changes in place.

LoRA: PEFT adapters on a projection the sparse path runs are refused (their low-rank branch would have to be made
sparse too): merge them first with `model = model.merge_and_unload()`, then calibrate and apply. Quantized weights
(bitsandbytes) are refused too. Those projections are gate, up and down for a gated MLP at capture="act", the
down-projection alone otherwise (the rest runs through the block's own modules).

`handle.remove()` restores the block exactly: the instance-level forward override and the hooks are deleted and
the copies dropped; modules and parameters are never replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import MlpSite, base_model_of, gated_mlp
from ..errors import SparseMlpError
from .kernels import backend_for, gather_rows_matvec, scatter_rows_matvec
from .zeroing import mask_stage

# The fallback rule, per backend and scheme: "gated_act" (a gated MLP thresholded at the gate, CATS), "gated_down_in"
# (a gated MLP thresholded at the down-projection's input, TEAL's down-projection) and "non_gated" (either capture
# point). Measured with dense and sparse interleaved, batch 1, one token, medians over rounds, the sparse path forced
# at each density. Each limit sits below the density where sparse was still faster.
# - gated_act, non_gated: 2 idle CPU cores (AMD EPYC, AVX2), fp32, medians of 7 rounds (`python
#   benchmarks/crossover.py`): with the C++ kernels the gated Llama-2-7B block ran 1.05x dense at d 0.9, 1.22x at
#   0.7 and 1.45x at 0.5; the non-gated BERT-base block 0.88x at d 0.5, 1.02x at 0.3 and 1.07x at 0.2 (its 2 ms step
#   is dominated by the dense up-projection and per-call overhead). The plain torch kernels (index_select + mv) ran
#   0.62x at d 0.3 and 1.3x at d 0.1 on the gated block (2 cores under load).
# - gated_down_in: 2 CPU cores shared with other jobs (Intel Xeon, AVX-512), 1 torch thread, fp32, medians of 15
#   rounds, each a few calls (/tmp script: the same dense_and_sparse timing as benchmarks/crossover.py, τ the (1 - d)
#   quantile of |h| at the down-projection's input). C++ kernels: the Llama-2-7B block (4096 -> 11008) ran 1.19-1.28x
#   dense at d 0.2, 1.13-1.24x at 0.3, 1.10-1.14x at 0.4, 1.02-1.07x at 0.5 and 0.86-1.03x at 0.6 (4 runs); the
#   SmolLM2-135M block (576 -> 1536) 1.00-1.04x at d 0.2, 0.96-0.99x at 0.3 and 0.88x at 0.5 (2 runs; there the
#   ~25 us per call of hook, active set and gather outweigh the few down-projection rows skipped). 0.3 keeps most of
#   the big block's gain and costs the small one a few percent at most. Plain torch kernels: the 7B block 1.20-1.22x
#   at d 0.2, 1.04-1.07x at 0.4 and 0.96-1.0x at 0.5; the SmolLM2 block 0.92-0.94x at d 0.2 (never clearly faster).
# More than MAX_SPARSE_ROWS rows at once: the union of active neurons grows towards dense while the dense GEMM gets
# cheaper per row, so the sparse path stops paying.
MAX_ACTIVE_FRACTION = {
    ("cpp", "gated_act"): 0.7, ("cpp", "gated_down_in"): 0.3, ("cpp", "non_gated"): 0.25,
    ("torch", "gated_act"): 0.15, ("torch", "gated_down_in"): 0.2, ("torch", "non_gated"): 0.15,
}
MAX_SPARSE_ROWS = 4
CAPTURES = ("act", "down_in")


def scheme_of(gated: bool, capture: str) -> str:
    """The sparse scheme of a block (the key of MAX_ACTIVE_FRACTION with the backend): "gated_act",
    "gated_down_in" or "non_gated"."""
    if capture not in CAPTURES:
        raise SparseMlpError(f"capture={capture!r} is unknown; thresholds are calibrated at 'act' or 'down_in'")
    return f"gated_{capture}" if gated else "non_gated"


def speedup_limit(gated: bool, capture: str, density: float) -> float:
    """The bound the weight bytes a sparse step still reads put on its speedup over dense, at `density` (the
    active fraction of the neurons): gated "act" 3 / (1 + 2d) (gate dense, up and down over the active neurons),
    gated "down_in" 3 / (2 + d) (gate and up dense, down over the active rows), non-gated 2 / (1 + d) (up dense,
    down over the active rows). Biases, norms and per-call overhead are left out."""
    if not 0.0 <= density <= 1.0:
        raise SparseMlpError(f"density={density!r}; expected a fraction in [0, 1]")
    scheme = scheme_of(gated, capture)
    if scheme == "gated_act":
        return 3.0 / (1.0 + 2.0 * density)
    if scheme == "gated_down_in":
        return 3.0 / (2.0 + density)
    return 2.0 / (1.0 + density)


# ---------------------------------------------------------------------------------------------- structures
@dataclass
class _Projection:
    """One projection as (weight rows = output features, bias), seen through nn.Linear or GPT-2's Conv1D."""

    module: nn.Module
    rows: slice | None = None  # a slice of the output features (Phi-3's fused gate_up_proj)

    def weight_out_by_in(self) -> torch.Tensor:
        w = self.module.weight
        w = w if isinstance(self.module, nn.Linear) else w.t()  # Conv1D stores (in, out)
        return w[self.rows] if self.rows is not None else w

    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        return b[self.rows] if (b is not None and self.rows is not None) else b

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.module(x)
        return F.linear(x, self.weight_out_by_in(), self.bias())


def _check_projection(module: nn.Module, where: str) -> None:
    from transformers.pytorch_utils import Conv1D

    if hasattr(module, "base_layer"):
        raise SparseMlpError(
            f"{where} is a PEFT adapter layer ({type(module).__name__}); the sparse kernel runs on plain weights: "
            "merge the adapter first (model = model.merge_and_unload()), then calibrate and apply the thresholds "
            "(or use kernel='mask')"
        )
    if not isinstance(module, (nn.Linear, Conv1D)) or not module.weight.is_floating_point() \
            or type(module).__name__ not in ("Linear", "Conv1D"):
        raise SparseMlpError(
            f"{where} is a {type(module).__name__} with {getattr(module, 'weight', torch.empty(0)).dtype} weights; "
            "the sparse kernel needs a plain nn.Linear or Conv1D in fp32/bf16/fp16 (dequantize the model, or use "
            "kernel='mask')"
        )


class _TransposedDown:
    """The down-projection as (intermediate, hidden) contiguous rows, kept in step with the weight."""

    def __init__(self, down: nn.Module):
        self.down = down
        self.is_linear = isinstance(down, nn.Linear)
        self._version = None
        self._rows = None

    def rows(self) -> torch.Tensor:
        w = self.down.weight
        if not self.is_linear:
            return w  # Conv1D's weight already is (in, out)
        if self._rows is None or self._version != w._version or self._rows.device != w.device \
                or self._rows.dtype != w.dtype:
            self._rows = w.detach().t().contiguous()
            self._version = w._version
        return self._rows


class SparseMlpHandle:
    """What install_sparse_mlp returns: `remove()` restores the block exactly (idempotent)."""

    def __init__(self, site: MlpSite, backend: str, overridden: nn.Module | None, hooks: list):
        self.site, self.backend = site, backend
        self.calls = {"sparse": 0, "dense": 0}  # forwards taken by each path (what the fallback rule chose)
        self.masked_only = overridden is None  # the calibrated density was above the limit: mask, never sparse
        self._overridden, self._hooks = overridden, hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._overridden is not None:
            self._overridden.__dict__.pop("forward", None)
            self._overridden.__dict__.pop(_INSTALLED, None)
            self._overridden = None


_INSTALLED = "_deft_sparse_mlp"


def _sparse_allowed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def install_sparse_mlp(model: nn.Module, site: MlpSite, threshold: float, capture: str, *, backend: str = "auto",
                       max_active_fraction: float | None = None, max_rows: int | None = None,
                       calibrated_density: float | None = None) -> SparseMlpHandle:
    """Execute the MLP block `site` of `model` sparsely with threshold τ = `threshold` at `capture`.

    site:      from find_mlp_sites(model, DeftConfig(capture=capture)).
    capture:   where τ was calibrated, "act" or "down_in" (with the block's kind it picks the scheme: scheme_of).
    backend:   "auto" (C++ kernels on CPU when they build, else plain torch; DEFT_SPARSE_KERNEL=torch|cpp forces
               one), "cpp" or "torch".
    max_active_fraction, max_rows: override the measured fallback rule (MAX_ACTIVE_FRACTION, MAX_SPARSE_ROWS);
               for measurements: 1.0 and a large max_rows force the sparse path, 0.0 forces dense.
    calibrated_density: the density τ gave on calibration data (1 - SparsityThresholds.calibrated); above the
               active-fraction limit the block is only masked (handle.masked_only), as the fallback would do for
               nearly every token. None: decide per forward only.
    Returns a handle; handle.remove() restores the block, handle.calls counts the forwards per path.
    """
    if not threshold >= 0:
        raise SparseMlpError(f"threshold of {site.name} is {threshold!r}; expected a number >= 0")
    block = base_model_of(model).get_submodule(site.name)
    gated = gated_mlp(block)
    scheme = scheme_of(gated is not None, capture)
    if scheme == "gated_act":
        gate, up = _Projection(gated.gate, gated.gate_rows), _Projection(gated.up, gated.up_rows)
        down, between = gated.down, gated.between
        for name, proj in (("gate", gate.module), ("up", up.module), ("down", down)):
            _check_projection(proj, f"{site.name} ({name}-projection)")
        if site.act is None:
            raise SparseMlpError(f"{site.name} has no activation module to threshold; use kernel='mask'")
        overridden = block
    else:  # only the down-projection is replaced; the block's own forward computes the rest, densely
        down = site.down
        _check_projection(down, f"{site.name} (down-projection)")
        overridden = down
    if _INSTALLED in overridden.__dict__ or "forward" in overridden.__dict__:
        raise SparseMlpError(f"{site.name} already has its forward replaced (a sparse kernel installed twice?); "
                             "remove the earlier handle first")
    device = down.weight.device
    backend = backend_for(device, backend)
    rows_limit = MAX_SPARSE_ROWS if max_rows is None else max_rows
    fraction_limit = MAX_ACTIVE_FRACTION[(backend, scheme)] if max_active_fraction is None else max_active_fraction
    # The zeros are made at the capture point by the same stage as the mask path; the sparse forward reads them.
    mask = mask_stage(model, {site.name: threshold}, [site], capture)
    if calibrated_density is not None and calibrated_density > fraction_limit:
        return SparseMlpHandle(site, backend, None, [mask])
    down_rows = _TransposedDown(down)
    down_rows.rows()  # the copy is made now, not in the first token's forward
    handle = SparseMlpHandle(site, backend, overridden, [mask])

    def active_columns(a: torch.Tensor) -> torch.Tensor | None:
        """Indices of the neurons active (non-zero) in any row of `a` (rows x width), or None when the dense path is
        cheaper (the fallback rule)."""
        if a.shape[0] > rows_limit:
            return None  # decided before reading `a`: many rows cost nothing extra
        limit = fraction_limit * a.shape[1]
        if a.shape[0] > 1 and int(torch.count_nonzero(a)) > limit * a.shape[0]:
            return None  # some row alone is above the limit (one cheap reduction decides most dense cases)
        active = a.any(0).nonzero().squeeze(1)  # one row: this alone decides (one op fewer per token)
        return active if active.numel() <= limit else None

    if scheme == "gated_act":
        act = site.act
        original = type(block).forward

        def gated_forward(x: torch.Tensor, *args, **kwargs):
            if args or kwargs or x.numel() // x.shape[-1] > rows_limit:
                handle.calls["dense"] += 1
                return original(block, x, *args, **kwargs)  # prefill and batches: the mask path, unchanged
            flat = x.reshape(-1, x.shape[-1])
            a = act(gate.dense(flat))  # thresholded by the hook
            active = active_columns(a) if _sparse_allowed(flat, gate.module.weight) else None
            if active is None:
                handle.calls["dense"] += 1
                h = a * up.dense(flat)
                if between is not None:
                    h = between(h)
                out = down(h.to(down.weight.dtype) if h.dtype != down.weight.dtype else h)
            else:
                handle.calls["sparse"] += 1
                w_up = up.weight_out_by_in()
                u = gather_rows_matvec(w_up, active, flat.contiguous(), backend)
                if up.bias() is not None:
                    u = u + up.bias()[active]
                out = scatter_rows_matvec(down_rows.rows(), active, a.index_select(1, active) * u, backend)
                if down.bias is not None:
                    out = out + down.bias
            return out.reshape(*x.shape[:-1], out.shape[-1])

        block.forward = gated_forward
    else:  # "gated_down_in" and "non_gated": the down-projection over the active rows (TEAL's scheme for it)
        original = type(down).forward

        def down_forward(h: torch.Tensor):  # h was zeroed by the mask stage (a pre-hook at down_in)
            flat = h.reshape(-1, h.shape[-1])
            active = active_columns(flat) if _sparse_allowed(flat, down.weight) else None
            if active is None:
                handle.calls["dense"] += 1
                return original(down, h)
            handle.calls["sparse"] += 1
            out = scatter_rows_matvec(down_rows.rows(), active, flat.index_select(1, active), backend)
            if down.bias is not None:
                out = out + down.bias
            return out.reshape(*h.shape[:-1], out.shape[-1])

        down.forward = down_forward
    overridden.__dict__[_INSTALLED] = handle
    return handle
