"""The FA3 argument checks (``_checks``): one message per malformed call, from both providers.

The exact reference and the fast ``torch`` provider share these checks, so a malformed
call gets the same ValueError, naming the argument, its value and what is allowed,
whichever provider serves the chain.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernel_fallback.integrations.flash_attn import _checks
from kernel_fallback.integrations.flash_attn import _fast as fast
from kernel_fallback.integrations.flash_attn import _reference as ref

B, HQ, HKV, D, CAP = 2, 4, 2, 16, 32


def cache_call() -> dict[str, Any]:
    return {
        "q": torch.randn(B, 1, HQ, D),
        "k_cache": torch.randn(B, CAP, HKV, D),
        "v_cache": torch.randn(B, CAP, HKV, D),
        "cache_seqlens": torch.tensor([3, CAP], dtype=torch.int32),
        "causal": True,
    }


def varlen_call() -> dict[str, Any]:
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    return {
        "q": torch.randn(7, HQ, D),
        "k": torch.randn(7, HKV, D),
        "v": torch.randn(7, HKV, D),
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu.clone(),
        "max_seqlen_q": 4,
        "max_seqlen_k": 4,
    }


def _with(**changes: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
    def change(call: dict[str, Any]) -> None:
        for name, make in changes.items():
            call[name] = make(call)

    return change


BAD_CACHE_CALLS = [
    pytest.param(_with(q=lambda c: c["q"][0]), "q must be (B, Sq, Hq, D)", id="q-rank"),
    pytest.param(_with(k_cache=lambda c: c["k_cache"][0]), "k_cache must be 4-D", id="cache-rank"),
    pytest.param(
        _with(v_cache=lambda c: torch.randn(B, CAP + 1, HKV, D)),
        "must match k_cache shape",
        id="v-cache-shape",
    ),
    pytest.param(_with(q=lambda c: c["q"].int()), "q must be a floating-point tensor", id="q-int"),
    pytest.param(
        _with(k_cache=lambda c: c["k_cache"].half()), "must have q's dtype torch.float32", id="dtype-mismatch"
    ),
    pytest.param(_with(q=lambda c: torch.randn(B, 1, 3, D)), "multiple of the number", id="heads"),
    pytest.param(
        _with(q=lambda c: torch.randn(B, 1, HQ, D + 1)), "head dim (16) must equal q head dim (17)", id="d"
    ),
    pytest.param(
        _with(softcap=lambda c: -1.0), "softcap must be >= 0 (0 disables it), got -1.0", id="softcap"
    ),
    pytest.param(_with(sinks=lambda c: torch.zeros(3)), "sinks must have shape (4,)", id="sinks"),
    pytest.param(
        _with(cache_seqlens=lambda c: c["cache_seqlens"].long()),
        "cache_seqlens must have dtype torch.int32, got torch.int64",
        id="lens-dtype",
    ),
    pytest.param(
        _with(cache_seqlens=lambda c: torch.zeros(3, dtype=torch.int32)),
        "cache_seqlens must have shape (2,), got (3,)",
        id="lens-shape",
    ),
    pytest.param(
        _with(page_table=lambda c: torch.zeros(B, 2, dtype=torch.int64)),
        "page_table must be an int32 tensor of shape (2, max_blocks_per_seq), got dtype torch.int64",
        id="page-table",
    ),
    pytest.param(
        _with(k=lambda c: torch.randn(B, 1, HKV, D)), "k and v must be given together", id="k-alone"
    ),
    pytest.param(
        _with(k=lambda c: torch.randn(B, 1, HKV + 1, D), v=lambda c: torch.randn(B, 1, HKV + 1, D)),
        "k must have shape (2, Sk_new, 2, 16), got (2, 1, 3, 16)",
        id="k-shape",
    ),
    pytest.param(
        _with(window_size=lambda c: (-2, 0)), "window_size must be a pair of ints >= -1", id="window"
    ),
    pytest.param(_with(window_size=lambda c: (1.5, 0)), "got (1.5, 0)", id="window-float"),
    pytest.param(_with(attention_chunk=lambda c: -4), "attention_chunk must be an int >= 0", id="chunk"),
]


def _refused_alike(
    providers: tuple[Callable[..., Any], ...], make: Callable[[], dict[str, Any]], change: Any, message: str
) -> None:
    refusals = []
    for provider in providers:
        call = make()
        change(call)
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            provider(**call)
        refusals.append(str(info.value))
    assert refusals[0] == refusals[1]


@pytest.mark.parametrize(("change", "message"), BAD_CACHE_CALLS)
def test_both_providers_refuse_a_malformed_cache_call_alike(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    _refused_alike((ref.flash_attn_with_kvcache, fast.flash_attn_with_kvcache), cache_call, change, message)


BAD_VARLEN_CALLS = [
    pytest.param(_with(k=lambda c: c["k"][None]), "k must be 3-D (total, heads, head_dim)", id="k-rank"),
    pytest.param(
        _with(v=lambda c: c["v"][:5]), "k and v must have the same number of rows, got 7 and 5", id="rows"
    ),
    pytest.param(
        _with(cu_seqlens_q=lambda c: torch.tensor([0], dtype=torch.int32)),
        "cu_seqlens_q must have batch_size + 1 >= 2 entries, got 1",
        id="cu-short",
    ),
    pytest.param(
        _with(cu_seqlens_k=lambda c: c["cu_seqlens_k"].long()),
        "cu_seqlens_k must have dtype torch.int32",
        id="cu-dtype",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_VARLEN_CALLS)
def test_both_providers_refuse_a_malformed_varlen_call_alike(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    _refused_alike((ref.flash_attn_varlen_func, fast.flash_attn_varlen_func), varlen_call, change, message)


@pytest.mark.parametrize(
    ("window", "causal", "want"),
    [
        pytest.param((-1, -1), False, (-1, -1), id="unbounded"),
        pytest.param((8, 3), True, (8, 0), id="causal-folds-right"),
        pytest.param((torch.tensor(5), torch.tensor(2)), False, (5, 2), id="0d-tensors"),
        pytest.param(torch.tensor([7, -1]), False, (7, -1), id="vector"),
        pytest.param([4, 4], False, (4, 4), id="list"),
    ],
)
def test_window_forms_upstream_passes(window: Any, causal: bool, want: tuple[int, int]) -> None:
    assert _checks.check_window(window, causal) == want


@pytest.mark.parametrize(
    "window",
    [(True, 0), (torch.tensor(1.0), 0), torch.tensor([1, 2, 3]), 5, (0, -3)],
    ids=["bool", "float-tensor", "three", "scalar", "below-minus-one"],
)
def test_window_refusals_quote_the_value(window: Any) -> None:
    with pytest.raises(ValueError, match="window_size must be a pair of ints >= -1") as info:
        _checks.check_window(window, False)
    assert repr(window)[:20] in str(info.value)


def test_cu_seqlens_values_are_checked_against_the_rows() -> None:
    assert _checks.check_cu_seqlens("cu", torch.tensor([0, 2, 2, 5], dtype=torch.int32), 5) == [0, 2, 2, 5]
    for bad in ([0, 3, 2], [1, 6], [-1, 2]):
        with pytest.raises(ValueError, match=r"cu must be non-decreasing within \[0, 5\]"):
            _checks.check_cu_seqlens("cu", torch.tensor(bad, dtype=torch.int32), 5)
