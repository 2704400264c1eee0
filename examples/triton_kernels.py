"""A small Triton kernel in two builds: one that takes ``out``, one that allocates.

Used by ``examples/gpu_bench.py`` and the GPU tests to show ``tolerant_kwargs`` on a
real Triton kernel: the allocating build is what an older kernel package ships, the
``out`` build what a newer one ships. Importing this module needs Triton and CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit  # type: ignore[untyped-decorator]
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def,unused-ignore]
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + alpha * y, mask=mask)


def scaled_add_out(
    x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, *, out: torch.Tensor
) -> torch.Tensor:
    """``out = x + alpha * y`` written into the caller's buffer (the newer build)."""
    n = x.numel()
    _scaled_add_kernel[(triton.cdiv(n, BLOCK),)](x, y, out, alpha, n, BLOCK=BLOCK)
    return out


def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``x + alpha * y`` into a new tensor (the older build: no ``out``)."""
    return scaled_add_out(x, y, alpha, out=torch.empty_like(x))
