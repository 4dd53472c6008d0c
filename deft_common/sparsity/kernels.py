"""The kernels of sparse MLP execution: a matrix times only some rows of a weight, reading only those rows.

A small C++ extension (two loops over the selected weight rows, parallel on torch's own thread pool), compiled on
first use with torch.utils.cpp_extension (needs a C++ compiler and ninja; cached afterwards). Without a compiler, or
with DEFT_SPARSE_KERNEL=torch, plain torch ops are used (index_select + matmul for the up-projection, embedding_bag
for the down-projection), which are correct but slower. On GPUs the plain torch ops are used.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from ..errors import SparseMlpError

BACKENDS = ("auto", "cpp", "torch")

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

// out[t, j] = dot(W[idx[j], :], X[t, :]): only the selected rows of the row-major W are read, each once.
template <typename T>
static void gather_rows_matvec_impl(const T* w, const int64_t* idx, const T* x, T* out,
                                    int64_t k, int64_t cols, int64_t n) {
  at::parallel_for(0, k, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* row = w + idx[j] * cols;
      for (int64_t t = 0; t < n; ++t) {
        const T* xt = x + t * cols;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t c = 0; c < cols; ++c) acc += static_cast<float>(row[c]) * static_cast<float>(xt[c]);
        out[t * k + j] = static_cast<T>(acc);
      }
    }
  });
}

// out[t, :] = sum_j coef[t, j] * WT[idx[j], :]. Threads split the columns, so each selected row of WT is read
// once, in contiguous pieces, and every output element is summed by one thread in float.
template <typename T>
static void scatter_rows_matvec_impl(const T* wt, const int64_t* idx, const T* coef, T* out,
                                     int64_t k, int64_t cols, int64_t n) {
  at::parallel_for(0, cols, 256, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<float> acc(width * n, 0.f);
    for (int64_t j = 0; j < k; ++j) {
      const T* row = wt + idx[j] * cols + begin;
      for (int64_t t = 0; t < n; ++t) {
        const float a = static_cast<float>(coef[t * k + j]);
        float* dst = acc.data() + t * width;
        #pragma omp simd
        for (int64_t c = 0; c < width; ++c) dst[c] += a * static_cast<float>(row[c]);
      }
    }
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < width; ++c) out[t * cols + begin + c] = static_cast<T>(acc[t * width + c]);
  });
}

torch::Tensor gather_rows_matvec(torch::Tensor w, torch::Tensor idx, torch::Tensor x) {
  const int64_t k = idx.numel(), cols = w.size(1), n = x.size(0);
  auto out = torch::empty({n, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "gather_rows_matvec", [&] {
    gather_rows_matvec_impl<scalar_t>(w.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), x.data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(), k, cols, n);
  });
  return out;
}

torch::Tensor scatter_rows_matvec(torch::Tensor wt, torch::Tensor idx, torch::Tensor coef) {
  const int64_t k = idx.numel(), cols = wt.size(1), n = coef.size(0);
  auto out = torch::empty({n, cols}, coef.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wt.scalar_type(), "scatter_rows_matvec", [&] {
    scatter_rows_matvec_impl<scalar_t>(wt.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), coef.data_ptr<scalar_t>(),
                                       out.data_ptr<scalar_t>(), k, cols, n);
  });
  return out;
}
"""

_EXTENSION_NAME = "deft_sparse_mlp_v2"
_compiled: dict[str, object] = {}  # extension name -> the loaded module, or None when it could not be built


def compile_kernels():
    """The C++ kernels (built on first use, then loaded from torch's extension cache), or None with a warning
    saying why when they cannot be built (no compiler, no ninja): the plain torch kernels are used then."""
    name = _EXTENSION_NAME
    if name in _compiled:
        return _compiled[name]
    try:
        from torch.utils.cpp_extension import load_inline

        # -fopenmp: at::parallel_for is OpenMP inside torch's headers; without it the kernels run on one thread.
        # The extension then shares the OpenMP runtime torch has loaded (same soname), so torch's thread count holds.
        module = load_inline(name, cpp_sources=_CPP_SOURCE, functions=["gather_rows_matvec", "scatter_rows_matvec"],
                             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                             verbose=False)
    except (RuntimeError, OSError, ImportError) as err:  # compiler or ninja missing, build failed
        warnings.warn(f"deft_common.sparsity: the C++ kernels could not be built ({str(err).splitlines()[0]}); "
                      "using the plain torch kernels (correct, slower). Install a C++ compiler and ninja "
                      "(pip install ninja) for the fast path, or set DEFT_SPARSE_KERNEL=torch to skip the build.",
                      stacklevel=3)
        module = None
    _compiled[name] = module
    return module


def backend_for(device: torch.device, backend: str) -> str:
    if backend not in BACKENDS:
        raise SparseMlpError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("DEFT_SPARSE_KERNEL", "auto")
        if backend not in BACKENDS:
            raise SparseMlpError(f"DEFT_SPARSE_KERNEL={backend!r} is unknown; use 'cpp', 'torch' or unset it")
    if device.type != "cpu":
        return "torch"
    if backend == "torch":
        return "torch"
    if compile_kernels() is None:
        if backend == "cpp":
            raise SparseMlpError("backend='cpp' was asked for but the C++ kernels could not be built (see the "
                                 "warning above); install a C++ compiler and ninja, or use backend='auto'")
        return "torch"
    return "cpp"


def gather_rows_matvec(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
    """(n, k): x (n, cols) times the rows `idx` of w (rows, cols), reading only those rows."""
    if backend == "cpp":
        return compile_kernels().gather_rows_matvec(w, idx, x)
    return x @ w.index_select(0, idx).t()


def scatter_rows_matvec(wt: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, backend: str) -> torch.Tensor:
    """(n, cols): coef (n, k) times the rows `idx` of wt (rows, cols), reading only those rows."""
    if backend == "cpp":
        return compile_kernels().scatter_rows_matvec(wt, idx, coef)
    if coef.shape[0] == 1 and coef.device.type == "cpu":
        # One bag per thread (embedding_bag parallelises over bags), summed: reads only the selected rows.
        bags = max(1, min(torch.get_num_threads(), idx.numel()))
        offsets = torch.linspace(0, idx.numel(), bags + 1)[:-1].long()
        return F.embedding_bag(idx, wt, offsets, mode="sum", per_sample_weights=coef[0]).sum(0, keepdim=True)
    return coef @ wt.index_select(0, idx)
