"""The density loss kernel: s(a) summed over real token rows, in one autograd op that sits on the activation's own
path. `surrogate` names s (DeftConfig.surrogate): "paper", a² / (a² + ε); "l1", |a|; "setpoint", min(|a|, τ) / τ
with τ the block's set-point threshold. `knee` is where s bends: ε for "paper", τ for "setpoint" (a float or a
0-dim tensor, so τ is never read back to the host), unused for "l1".

`density_tap(a, ...)` returns `a` unchanged (a view) together with Σ s(a) and the active-entry counts. The hook
puts that view in place of the activation, so the op's backward receives the gradient flowing into `a` from the
model and returns it with the surrogate's gradient added in one pass. A side branch (or an eager chain
a*a, +ε, /, mean) would instead make autograd allocate a second activation-sized gradient and add the two.

The op saves only `a`, which autograd keeps anyway for the next matmul, and recomputes s'(a) in backward. Everything
is computed in fp32 (a² underflows in bf16/fp16), in row chunks, into one reused chunk buffer. Padding rows are
handled apart (they are few): their share is subtracted from the sums, and their gradient is left untouched.
"""

from __future__ import annotations

import torch


def _chunk_elements(device: torch.device) -> int:
    # CPU: 4 MiB fp32 buffers stay in cache and add nothing noticeable to peak memory. GPU: bigger chunks, since
    # each op is one kernel launch and the activations are large.
    return 1 << 20 if device.type == "cpu" else 1 << 24


def _row_chunks(a: torch.Tensor):
    """(row slice, fp32 scratch of that chunk's shape) over the rows of the 2-D `a`; one buffer serves every chunk."""
    rows, width = a.shape
    step = max(1, _chunk_elements(a.device) // max(1, width))
    buf = torch.empty((min(step, rows), width), dtype=torch.float32, device=a.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield slice(start, stop), buf[: stop - start]


def _chunk_stats(x: torch.Tensor, buf: torch.Tensor, surrogate: str, knee, thresholds: tuple[float, ...]):
    """(Σ s(x) as an fp32 scalar, entries with |x| > τ for each τ) of a 2-D chunk; `buf` is fp32 scratch of x's
    shape."""
    xf = x.float()
    if surrogate == "l1":
        torch.abs(xf, out=buf)
    elif surrogate == "setpoint":
        torch.abs(xf, out=buf).clamp_(max=knee).div_(knee)  # min(|a|, τ) / τ
    else:
        torch.addcmul(buf.new_full((), knee), xf, xf, out=buf)  # a² + ε (never below ε: no denormals)
        torch.div(xf, buf, out=buf).mul_(xf)  # a · a/(a² + ε) = s(a)
    counts = [torch.count_nonzero(x if tau == 0.0 else x.abs() > tau) for tau in thresholds]
    return buf.sum(), torch.stack(counts)


@torch.no_grad()
def surrogate_stats(
    a: torch.Tensor, pad_rows: torch.Tensor | None, surrogate: str, knee, thresholds: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For an activation `a` (..., hidden) seen as rows of `hidden` entries: Σ over real rows of Σ_j s(a_ij) (fp32
    scalar), and for each threshold τ the number of entries with |a| > τ in real rows (int64 vector). `pad_rows`
    holds the indices of the padding rows (None = every row is real)."""
    a = a.reshape(-1, a.shape[-1])
    ssum = torch.zeros((), dtype=torch.float32, device=a.device)
    active = torch.zeros(len(thresholds), dtype=torch.int64, device=a.device)
    for rows, buf in _row_chunks(a):
        chunk_sum, chunk_active = _chunk_stats(a[rows], buf, surrogate, knee, thresholds)
        ssum += chunk_sum
        active += chunk_active
    if pad_rows is not None:
        x = a[pad_rows]
        pad_sum, pad_active = _chunk_stats(x, torch.empty(x.shape, dtype=torch.float32, device=a.device), surrogate,
                                           knee, thresholds)
        ssum -= pad_sum
        active -= pad_active
    return ssum, active


# Integer views of the float dtypes, for counting non-zeros on the bits (count_active).
BIT_VIEWS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@torch.no_grad()
def count_active(a: torch.Tensor, pad_rows: torch.Tensor | None, thresholds: tuple[float, ...],
                 positive_zeros: bool = False) -> torch.Tensor:
    """For each threshold τ the number of entries with |a| > τ in real rows (int64 vector), without the surrogate:
    one count per threshold (τ = 0 counts the non-zeros in place, without a temporary). positive_zeros: no zero of
    `a` is -0.0 (sparsity.zeroing.has_only_positive_zeros), so τ = 0 counts the non-zero bit patterns."""
    a = a.reshape(-1, a.shape[-1])
    bits = BIT_VIEWS.get(a.dtype) if positive_zeros and a.device.type == "cpu" else None

    def counts(x: torch.Tensor) -> torch.Tensor:
        # as integers, count_nonzero runs vectorised (0.33 ms against 0.90 ms on 1024 x 1536 fp32, one thread)
        nonzero = x.view(bits) if bits is not None else x
        return torch.stack([torch.count_nonzero(nonzero if tau == 0.0 else x.abs() > tau) for tau in thresholds])

    active = counts(a)
    if pad_rows is not None:
        active -= counts(a[pad_rows])
    return active


def add_surrogate_grad(
    grad: torch.Tensor, a: torch.Tensor, scale: torch.Tensor, pad_rows: torch.Tensor | None, surrogate: str, knee
) -> torch.Tensor:
    """grad + scale · s'(a) on the real rows (padding rows keep `grad`). "paper": s'(a) = 2εa / (a² + ε)², written
    as (2/ε) · a / (1 + a²/ε)² so that no intermediate is denormal even for tiny ε; "l1": sign(a); "setpoint":
    sign(a) / τ below τ, 0 above. Written into `grad` itself when nothing else holds it (see `owned`), else into a
    new tensor."""
    in_place = owned(grad)  # before any view of it exists
    shape = grad.shape
    a, grad = a.reshape(-1, a.shape[-1]), grad.reshape(-1, a.shape[-1])
    out = grad if in_place else torch.empty_like(grad)
    kept = grad[pad_rows] if pad_rows is not None else None  # a copy (advanced indexing)
    scale32 = scale.float()
    if surrogate == "paper":
        # Divide the denominator by the scale (a tensor: no host sync on GPU); scale 0 gives +inf, i.e. no change.
        inv_scale = (knee / 2.0) / scale32
        one = torch.ones((), dtype=torch.float32, device=a.device)
    elif surrogate == "setpoint":
        scale32 = scale32 / knee
    for rows, buf in _row_chunks(a):
        x = a[rows].float()
        if surrogate == "l1":
            torch.addcmul(grad[rows], torch.sign(x, out=buf), scale32, out=out[rows])
        elif surrogate == "setpoint":
            torch.sign(x, out=buf).mul_(x.abs() < knee)  # sign(a) where |a| < τ
            torch.addcmul(grad[rows], buf, scale32, out=out[rows])
        else:
            # (1 + a²/ε)² · ε / (2·scale)
            torch.addcmul(one, x, x, value=1.0 / knee, out=buf).square_().mul_(inv_scale)
            torch.addcdiv(grad[rows], x, buf, out=out[rows])
    if kept is not None:
        out[pad_rows] = kept
    return out.reshape(shape)


def owned(grad: torch.Tensor) -> bool:
    """Whether the incoming gradient may be updated in place: on CPU a new activation-sized tensor costs fresh
    pages (about as much as the whole surrogate), so we reuse the gradient when this backward holds the only
    reference to it and to its memory. Autograd hands the same tensor to several branches when an op passes its
    gradient through (e.g. an addition); then the count is higher and a new tensor is made."""
    if not (grad.is_contiguous() and grad._base is None and hasattr(grad, "_use_count")
            and hasattr(torch._C, "_storage_Use_Count")):  # private torch APIs: without them, never in place
        return False
    storage_refs = torch._C._storage_Use_Count(grad.untyped_storage()._cdata)  # 1 from `grad`, 1 from the query
    return grad._use_count() == 1 and storage_refs == 2


class _DensityTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, pad_rows, surrogate, knee, thresholds):
        # Only `a` goes through save_for_backward. The padding rows (and τ) sit on ctx, so a gradient-checkpoint
        # recompute (which runs without them) saves exactly the same tensors as the original forward.
        ctx.save_for_backward(a)
        ctx.pad_rows, ctx.surrogate, ctx.knee = pad_rows, surrogate, knee
        ctx.set_materialize_grads(False)  # an unused sum (a forward outside record()) costs nothing in backward
        ssum, active = surrogate_stats(a, pad_rows, surrogate, knee, thresholds)
        ctx.mark_non_differentiable(active)
        return a.view_as(a), ssum, active

    @staticmethod
    def backward(ctx, grad_a, grad_sum, _grad_active):
        if grad_sum is None:
            return grad_a, None, None, None, None
        (a,) = ctx.saved_tensors
        if grad_a is None:
            grad_a = torch.zeros_like(a)
        return add_surrogate_grad(grad_a, a, grad_sum, ctx.pad_rows, ctx.surrogate, ctx.knee), None, None, None, None


def density_tap(
    a: torch.Tensor, pad_rows: torch.Tensor | None, surrogate: str, knee, thresholds: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a view of `a` to use in its place, Σ s(a) over real rows, active counts; see `surrogate_stats`).
    Differentiable when `a` needs a gradient: the view carries the surrogate's gradient back into `a`."""
    if torch.is_grad_enabled() and a.requires_grad:
        return _DensityTap.apply(a, pad_rows, surrogate, knee, thresholds)
    ssum, active = surrogate_stats(a, pad_rows, surrogate, knee, thresholds)
    return a, ssum, active
