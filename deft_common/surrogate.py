"""The density loss kernel: s(a) = a² / (a² + ε), summed over real token rows, in one fused autograd op.

A chain of eager ops (a*a, +ε, /, *mask, mean) would make autograd keep several activation-sized copies per
layer. The fused op keeps only the activation itself (which autograd holds anyway for the next matmul) and
recomputes s'(a) in backward. Everything is computed in fp32 (a² underflows in bf16/fp16) in row chunks, with
in-place ops, so at most two small fp32 temporaries exist at a time. The same pass counts the active entries for the density metric.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 20  # fp32 temporaries of at most 4 MiB each, two at a time


def _row_chunks(rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


@torch.no_grad()
def surrogate_stats(
    a: torch.Tensor, row_weight: torch.Tensor | None, eps: float, thresholds: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a 2-D activation `a` (rows, hidden): Σ over real rows of Σ_j s(a_ij) (fp32 scalar), and for each
    threshold τ the number of entries with |a| > τ in real rows (int64 vector). `row_weight` is 1 for real
    rows, 0 for padding (None = all rows real)."""
    ssum = torch.zeros((), dtype=torch.float32, device=a.device)
    active = torch.zeros(len(thresholds), dtype=torch.int64, device=a.device)
    for rows in _row_chunks(a.shape[0], a.shape[1]):
        x = a[rows]
        w = None if row_weight is None else row_weight[rows]
        x2 = x.float().square()
        for k, tau in enumerate(thresholds):
            per_row = torch.count_nonzero(x if tau == 0.0 else x.abs() > tau, dim=1)  # |a| > τ, on a itself
            active[k] += per_row.sum() if w is None else (per_row * w.to(torch.int64)).sum()
        per_row = x2.div_(x2 + eps).sum(dim=1)  # s(a) = a² / (a² + ε), in place in the a² buffer
        ssum += per_row.sum() if w is None else (per_row * w).sum()
    return ssum, active


class _FusedDensitySurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, row_weight, eps, thresholds):
        # Only `a` goes through save_for_backward. The row weights sit on ctx, so a gradient-checkpoint
        # recompute (which runs without them) saves exactly the same tensors as the original forward.
        ctx.save_for_backward(a)
        ctx.row_weight, ctx.eps = row_weight, eps
        ssum, active = surrogate_stats(a, row_weight, eps, thresholds)
        ctx.mark_non_differentiable(active)
        return ssum, active

    @staticmethod
    def backward(ctx, grad_sum, _grad_active):
        (a,) = ctx.saved_tensors
        eps, row_weight = ctx.eps, ctx.row_weight
        grad = torch.empty_like(a)
        scale = 2.0 * eps * grad_sum.float()  # d/da of a²/(a²+ε) = 2εa / (a²+ε)²
        for rows in _row_chunks(a.shape[0], a.shape[1]):
            x = a[rows].float()
            d = x.square().add_(eps)  # a² + ε
            g = grad[rows] if grad.dtype == torch.float32 else None  # fp32: computed in place in the result
            g = torch.div(x, d, out=g).div_(d)
            g.mul_(scale if row_weight is None else row_weight[rows, None] * scale)
            if grad.dtype != torch.float32:
                grad[rows] = g
        return grad, None, None, None


def density_surrogate(
    a: torch.Tensor, row_weight: torch.Tensor | None, eps: float, thresholds: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable when `a` needs a gradient, plain statistics otherwise. See `surrogate_stats`."""
    if torch.is_grad_enabled() and a.requires_grad:
        return _FusedDensitySurrogate.apply(a, row_weight, eps, thresholds)
    return surrogate_stats(a, row_weight, eps, thresholds)
