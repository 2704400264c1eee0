"""``ver=4`` through the real chains on a GPU with FlashAttention-4 (flash-attn-4) installed.

Skipped without CUDA or without ``flash_attn.cute``. On Hopper (SM 9.x) FA4's forward has
no split-KV: sglang's ``num_splits=0`` must still run. The oracle is the torch provider
(itself tested against the float64 reference), within upstream's bf16 rule.

Run on a CUDA machine: ``python -m pytest -m gpu tests/test_gpu_fa4.py``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from kernel_fallback.integrations.flash_attn import _fast as fast
from kernel_fallback.integrations.flash_attn import _reference as ref
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache


def _has_fa4() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _has_fa4(), reason="needs flash-attn-4 (flash_attn.cute)"),
]


def _within_bf16_rule(got: torch.Tensor, oracle64: torch.Tensor, plain_bf16: torch.Tensor) -> None:
    """Upstream's rule: error vs float64 at most 2x a plain bf16 computation's, plus a floor."""
    err = (got.double() - oracle64).abs().max().item()
    base = (plain_bf16.double() - oracle64).abs().max().item()
    assert err <= 2 * base + 1e-5, (err, base)


@pytest.mark.parametrize(
    "options",
    [{}, {"window_size": (64, 0)}, {"softcap": 30.0}, {"return_softmax_lse": True}],
    ids=["causal", "window", "softcap", "lse"],
)
def test_varlen_ver_4_agrees_with_the_reference(options: dict[str, Any]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    lens = [300, 77, 512]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens), 16, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(sum(lens), 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv")
    got: Any = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True, ver=4, **options)
    want64: Any = ref.flash_attn_varlen_func(
        q.double(), k.double(), v.double(), cu, cu, causal=True, **options
    )
    plain: Any = fast.flash_attn_varlen_func(q, k, v, cu, cu, causal=True, **options)
    if options.get("return_softmax_lse"):
        torch.testing.assert_close(got[1].float(), want64[1].float(), atol=2e-2, rtol=0)
        got, want64, plain = got[0], want64[0], plain[0]
    _within_bf16_rule(got, want64, plain)


@pytest.mark.parametrize("page", [1, 16, 64], ids=["page1", "page16", "page64"])
def test_kvcache_ver_4_with_sglangs_num_splits_0_runs_on_this_device(page: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(page)
    batch, per_seq = 4, 1024
    pages = batch * per_seq // page
    q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    kp, vp = (
        torch.randn(pages, page, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv"
    )
    table = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32).view(batch, -1)
    seqlens = torch.tensor([1024, 1, 513, 77], dtype=torch.int32, device="cuda")
    got = flash_attn_with_kvcache(
        q, kp, vp, cache_seqlens=seqlens, page_table=table, causal=True, num_splits=0, ver=4
    )
    want64: Any = ref.flash_attn_with_kvcache(
        q.double(), kp.double(), vp.double(), cache_seqlens=seqlens, page_table=table, causal=True
    )
    plain: Any = fast.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, page_table=table, causal=True)
    _within_bf16_rule(got, want64, plain)
