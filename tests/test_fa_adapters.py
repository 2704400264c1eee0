"""The FA4 adapters (``_adapters``) against a stand-in of the published flash-attn-4 package.

The stand-in (tests/fa4_stubs.py) has flash-attn-4 4.0.0b36's real signature: ``qv``
fourth, ``return_lse`` instead of ``return_softmax_lse``, None for an unbounded window.
With no sgl-kernel FA4 build installed, ``ver=4`` must reach it with FA3's arguments
mapped by name, and give the torch provider's result.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fa4_stubs
import pytest
import torch

from kernel_fallback import ProviderUnavailableError
from kernel_fallback.integrations.flash_attn import _adapters
from kernel_fallback.integrations.flash_attn import _chains as fa
from kernel_fallback.integrations.flash_attn import _fast as fast


@pytest.fixture
def fa4_installed(tmp_path: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        fa4_stubs.install(tmp_path)
        yield
        fa4_stubs.uninstall()


def chains() -> tuple[Any, Any]:
    """Ungated copies of the module's chains: this machine has no Hopper GPU to open the gate."""
    tag = uuid.uuid4().hex[:6]
    return (
        fa._varlen_chain(name=f"fa4_varlen_{tag}", gates=(), fa4_gates=()),
        fa._kvcache_chain(name=f"fa4_kvcache_{tag}", gates=(), fa4_gates=()),
    )


def _seqs(lens: list[int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sum(lens), 8, 16, generator=gen)
    k, v = (torch.randn(sum(lens), 2, 16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.usefixtures("fa4_installed")
def test_varlen_ver_4_reaches_flash_attn_cute_with_fa3_arguments_mapped() -> None:
    varlen, _ = chains()
    q, k, v, cu = _seqs([5, 3])
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3))
    got, lse = varlen(
        q, k, v, cu, cu, 5, 5, causal=True, window_size=(2, -1), sinks=sinks,
        num_splits=0, return_softmax_lse=True, ver=4,
    )  # fmt: skip
    (received,) = fa4_stubs.CALLS
    assert received["return_lse"] is True
    assert received["learnable_sink"] is sinks
    assert received["window_size"] == (2, None)
    assert received["cu_seqlens_q"] is cu
    assert received["cu_seqlens_k"] is cu
    assert received["num_splits"] == 0  # a CPU tensor: no split-KV limit to apply
    want, want_lse = fast.flash_attn_varlen_func(
        q, k, v, cu, cu, causal=True, window_size=(2, -1), sinks=sinks, return_softmax_lse=True
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.usefixtures("fa4_installed")
def test_varlen_ver_4_without_lse_returns_the_output_alone() -> None:
    varlen, _ = chains()
    q, k, v, cu = _seqs([4, 6])
    got = varlen(q, k, v, cu, cu, causal=True, ver=4)
    assert isinstance(got, torch.Tensor)
    assert fa4_stubs.CALLS[0]["return_lse"] is False
    torch.testing.assert_close(got, fast.flash_attn_varlen_func(q, k, v, cu, cu, causal=True))


@pytest.mark.usefixtures("fa4_installed")
def test_kvcache_ver_4_passes_cache_lengths_as_seqused_k() -> None:
    _, kvcache = chains()
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(3, 1, 8, 16, generator=gen)
    k_cache, v_cache = (torch.randn(12, 4, 2, 16, generator=gen) for _ in range(2))
    page_table = torch.randperm(12, generator=gen).to(torch.int32).view(3, 4)
    seqlens = torch.tensor([5, 16, 1], dtype=torch.int32)
    got = kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, page_table=page_table, causal=True,
                  num_splits=0, ver=4)  # fmt: skip
    (received,) = fa4_stubs.CALLS
    assert received["seqused_k"] is seqlens
    assert received["page_table"] is page_table
    assert received["cu_seqlens_k"] is None
    want = fast.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, page_table=page_table, causal=True
    )
    torch.testing.assert_close(got, want)


def test_no_fa4_anywhere_names_every_place_it_looked() -> None:
    varlen, _ = chains()
    q, k, v, cu = _seqs([3])
    with pytest.raises(ProviderUnavailableError) as info:
        varlen(q, k, v, cu, cu, ver=4)
    for target in _adapters.FA4_TARGETS:
        assert target in str(info.value)


def test_split_kv_is_capped_only_on_sm_9x() -> None:
    cpu = torch.device("cpu")
    assert _adapters._fa4_splits(0, cpu) == 0
    assert _adapters._fa4_splits(3, cpu) == 3
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        assert _adapters._fa4_splits(0, torch.device("cuda")) == (1 if major == 9 else 0)
