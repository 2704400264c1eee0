"""Which calls of the ``torch`` attention provider the exact reference serves (``_exact``).

float64 calls and calls autograd records off CUDA go to the reference; everything else
(grad mode off, no tensor requiring grad) stays on the fast path. CUDA behaviour (flex
backward, float64 under capture) is in tests/test_gpu.py.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn import _exact
from kernel_fallback.integrations.flash_attn import _fast as fast
from kernel_fallback.integrations.flash_attn import _reference as ref


def _cu(lens: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _varlen_inputs(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(9, 4, 16, generator=gen, dtype=dtype)
    k, v = (
        torch.randn(12, 2, 16, generator=gen, dtype=dtype),
        torch.randn(12, 2, 8, generator=gen, dtype=dtype),
    )
    return q, k, v, _cu([4, 5]), _cu([5, 7])


@pytest.mark.parametrize("entry", ["flash_attn_varlen_func", "flash_attn_with_kvcache"])
def test_the_reference_takes_every_argument_of_the_torch_provider(entry: str) -> None:
    # Routed calls forward the provider's arguments unchanged: the signatures must agree.
    assert inspect.signature(getattr(fast, entry)) == inspect.signature(getattr(ref, entry))


@pytest.mark.parametrize(
    "which", ["q", "k", "v", "sinks"], ids=["q-requires-grad", "k-only", "v-only", "sinks-only"]
)
def test_any_tensor_requiring_grad_on_cpu_takes_the_differentiable_reference(which: str) -> None:
    q, k, v, cu_q, cu_k = _varlen_inputs()
    tensors = {"q": q, "k": k, "v": v, "sinks": torch.randn(4)}
    tensors[which].requires_grad_()
    out = fast.flash_attn_varlen_func(
        tensors["q"], tensors["k"], tensors["v"], cu_q, cu_k, causal=True, sinks=tensors["sinks"]
    )
    assert fast.last_backend("flash_attn_varlen_func") == fast.REFERENCE_AUTOGRAD
    assert isinstance(out, Tensor)
    (grad,) = torch.autograd.grad(out.sum(), tensors[which])
    assert grad.shape == tensors[which].shape
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_grad_mode_off_keeps_the_fast_path_with_the_same_values() -> None:
    q, k, v, cu_q, cu_k = _varlen_inputs()
    q.requires_grad_()
    routed = fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True)
    assert fast.last_backend("flash_attn_varlen_func") == fast.REFERENCE_AUTOGRAD
    with torch.no_grad():
        plain = fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True)
    assert fast.last_backend("flash_attn_varlen_func") == "flex_attention (eager, cpu)"
    assert isinstance(routed, Tensor)
    assert isinstance(plain, Tensor)
    torch.testing.assert_close(routed.detach(), plain, atol=2e-6, rtol=1e-5)


def test_float64_takes_the_reference_on_both_entry_points() -> None:
    q, k, v, cu_q, cu_k = _varlen_inputs(torch.float64)
    out = fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, sinks=torch.randn(4, dtype=torch.float64))
    assert fast.last_backend("flash_attn_varlen_func") == fast.REFERENCE_FLOAT64
    assert isinstance(out, Tensor)
    assert out.dtype == torch.float64
    cache = torch.randn(2, 6, 2, 16, dtype=torch.float64)
    fast.flash_attn_with_kvcache(q[:2].unsqueeze(1), cache, cache, cache_seqlens=3)
    assert fast.last_backend("flash_attn_with_kvcache") == fast.REFERENCE_FLOAT64


def test_bad_float64_input_gets_the_reference_error() -> None:
    q, k, v, cu_q, cu_k = _varlen_inputs(torch.float64)
    with pytest.raises(ValueError, match=r"k and v must have q's dtype torch\.float64"):
        fast.flash_attn_varlen_func(q, k.float(), v.float(), cu_q, cu_k)


def test_attached_zeros_pass_zero_gradients_whatever_the_inputs_hold() -> None:
    q = torch.tensor([[1.0, math.inf], [math.nan, 2.0]], requires_grad=True)
    out = _exact.attached(torch.zeros(3), q, None)
    assert torch.equal(out, torch.zeros(3))  # an inf or NaN input does not leak into the zeros
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(grad, torch.zeros_like(q))


def test_attached_leaves_results_alone_without_grad() -> None:
    zeros = torch.zeros(3)
    assert _exact.attached(zeros, torch.ones(2)) is zeros
    with torch.no_grad():
        assert _exact.attached(zeros, torch.ones(2, requires_grad=True)) is zeros


def test_without_keys_gives_the_sink_to_rows_of_a_sequence_only() -> None:
    rows = torch.zeros(3, 2, 4)
    used = torch.tensor([True, False, True])
    out, lse = _exact.without_keys(rows, 5, torch.tensor([0.5, -1.0]), used)
    assert torch.equal(out, torch.zeros(3, 2, 5))
    assert lse.tolist() == [[0.5, -math.inf, 0.5], [-1.0, -math.inf, -1.0]]
    _, no_sink = _exact.without_keys(rows, 5, None, used)
    assert torch.isneginf(no_sink).all()


def test_grad_mode_off_appends_land_in_a_cache_that_requires_grad() -> None:
    gen = torch.Generator().manual_seed(4)
    k_cache = torch.zeros(2, 6, 2, 16).requires_grad_()
    v_cache = torch.zeros(2, 6, 2, 16).requires_grad_()
    q, k_new = torch.randn(2, 1, 4, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen)
    with torch.no_grad():
        fast.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, k_new, cache_seqlens=torch.tensor([0, 3]).int()
        )
    assert fast.last_backend("flash_attn_with_kvcache") == "sdpa (decode, gqa folded into rows)"
    assert torch.equal(k_cache[0, 0].detach(), k_new[0, 0])
    assert torch.equal(v_cache[1, 3].detach(), k_new[1, 0])
