"""The cost of a kernel chain per call, against calling its provider directly, side by side.

sglang calls FlashAttention-3 once per layer in an eager decode step: the chain's own
cost is paid 61 times a step. Each row times one call shape through the FA3 chains of
:mod:`kernel_fallback.integrations.flash_attn` (their real options: routes, hints,
call-dependent neutral values, the ``ver`` selector), with one provider chosen, and the
same provider called directly with the arguments it takes:

- ``exact``: a no-op with the chain's own signature (sgl-kernel 0.4.10's), given sglang's
  kvcache call (28 positional arguments, then ``sm_margin, only_qv, return_softmax_lse,
  sinks, out`` by keyword), and the same with ``ver=3`` as sglang's wrapper adds;
- ``torch-like``: a no-op with the torch provider's signature (no hints, no ``qv``,
  rotary, descale, ``only_qv``, ``out``...), given the same kvcache call, and sglang's
  varlen call (every argument by keyword, ``attention_chunk=0``, ``num_splits=1``);
- ``torch``: the real torch provider on a small CPU decode (to show the chain's share).

Times are CPU time of this thread (``time.thread_time_ns``, torch kept to one thread),
the median over rounds in which every variant runs in turn, so that load from other
processes hits all alike.

Run: ``python examples/bench_chain.py [--rounds N] [--calls N]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn import _fast as torch_attention
from kernel_fallback.integrations.flash_attn._chains import _kvcache_chain, _varlen_chain


def exact_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    qv: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    max_seqlen_q: int | None = None,
    rotary_seqlens: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int | None = None,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: Tensor | None = None,
    num_splits: int = 0,
    pack_gqa: bool | None = None,
    *,
    only_qv: bool = False,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    sinks: Tensor | None = None,
    score_mod: Callable[..., Any] | None = None,
    aux_tensors: list[Tensor] | None = None,
    ver: int = 3,
    out: Tensor | None = None,
) -> Tensor:
    """No-op with sgl-kernel 0.4.10's parameters: the chain's own signature."""
    return q


def torchlike_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_softmax_lse: bool = False,
) -> Tensor:
    """No-op with the torch provider's kvcache parameters."""
    return q


def torchlike_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_q: Tensor | None = None,
    seqused_k: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_softmax_lse: bool = False,
) -> Tensor:
    """No-op with the torch provider's varlen parameters."""
    return q


def served_by(chain: Any, name: str, kernel: Callable[..., Any]) -> Any:
    """``chain`` with one more provider, chosen explicitly."""
    chain.provider(name, loader=lambda: kernel)
    chain.use(name)
    return chain


# Small CPU decode tensors: 2 sequences, 1 new token, 8 query / 2 KV heads, d=64.
q = torch.randn(2, 1, 8, 64)
k_cache = torch.randn(2, 128, 2, 64)
v_cache = torch.randn(2, 128, 2, 64)
seqlens = torch.tensor([100, 50], dtype=torch.int32)
cu = torch.tensor([0, 1, 2], dtype=torch.int32)
packed = q.reshape(2, 8, 64)
scale = 0.125


def kvcache_variants(
    label: str, kernel: Callable[..., Any], direct: Callable[[int], None]
) -> dict[str, Callable[[int], None]]:
    """sglang's kvcache call (28 positional + keywords) through a chain served by ``kernel``."""
    fa = served_by(_kvcache_chain(name=f"bench_kvcache_{label.replace('-', '_')}"), "bench", kernel)

    def chain(calls: int) -> None:
        for _ in range(calls):
            fa(q, k_cache, v_cache, None, None, None, None, None, seqlens, None, None, None, None, None, 1,
               None, None, None, None, scale, True, (-1, -1), 0, 0.0, True, None, 0, None,
               sm_margin=0, only_qv=False, return_softmax_lse=False, sinks=None, out=None)  # fmt: skip

    def chain_ver(calls: int) -> None:
        for _ in range(calls):
            fa(q, k_cache, v_cache, None, None, None, None, None, seqlens, None, None, None, None, None, 1,
               None, None, None, None, scale, True, (-1, -1), 0, 0.0, True, None, 0, None,
               sm_margin=0, only_qv=False, return_softmax_lse=False, sinks=None, out=None, ver=3)  # fmt: skip

    return {f"{label} direct": direct, f"{label} chain": chain, f"{label} chain ver=3": chain_ver}


def exact_direct(calls: int) -> None:
    for _ in range(calls):
        exact_kvcache(q, k_cache, v_cache, None, None, None, None, None, seqlens, None, None, None, None,
                      None, 1, None, None, None, None, scale, True, (-1, -1), 0, 0.0, True, None, 0, None,
                      sm_margin=0, only_qv=False, return_softmax_lse=False, sinks=None, out=None)  # fmt: skip


def torchlike_direct(calls: int) -> None:
    for _ in range(calls):
        torchlike_kvcache(q, k_cache, v_cache, None, None, seqlens, None, None, 1, scale, True, (-1, -1), 0,
                          0.0, sinks=None, return_softmax_lse=False)  # fmt: skip


def torch_direct(calls: int) -> None:
    kernel = torch_attention.flash_attn_with_kvcache
    for _ in range(calls):
        kernel(q, k_cache, v_cache, None, None, seqlens, None, None, 1, scale, True, (-1, -1), 0, 0.0,
               sinks=None, return_softmax_lse=False)  # fmt: skip


def varlen_variants() -> dict[str, Callable[[int], None]]:
    """sglang's varlen call (every argument by keyword) through a chain served by a torch-like no-op."""
    fa = served_by(_varlen_chain(name="bench_varlen_torchlike"), "bench", torchlike_varlen)

    def direct(calls: int) -> None:
        for _ in range(calls):
            torchlike_varlen(q=packed, k=packed, v=packed, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1,
                             max_seqlen_k=1, seqused_q=None, seqused_k=None, softmax_scale=scale, causal=True,
                             window_size=(-1, -1), attention_chunk=0, softcap=0.0, return_softmax_lse=False,
                             sinks=None)  # fmt: skip

    def chain(calls: int) -> None:
        for _ in range(calls):
            fa(q=packed, k=packed, v=packed, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1, max_seqlen_k=1,
               seqused_q=None, seqused_k=None, page_table=None, softmax_scale=scale, causal=True, qv=None,
               q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
               softcap=0.0, num_splits=1, pack_gqa=None, only_qv=False, sm_margin=0, return_softmax_lse=False,
               sinks=None, out=None, ver=3)  # fmt: skip

    return {"varlen torch-like direct": direct, "varlen torch-like chain": chain}


def ns_per_call(run: Callable[[int], None], calls: int) -> float:
    start = time.thread_time_ns()
    run(calls)
    return (time.thread_time_ns() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the chains' provider events are not what is timed
    torch.set_num_threads(1)  # thread time counts this thread only: keep torch's work in it
    variants: dict[str, Callable[[int], None]] = {
        **kvcache_variants("exact", exact_kvcache, exact_direct),
        **kvcache_variants("torch-like", torchlike_kvcache, torchlike_direct),
        **varlen_variants(),
        **kvcache_variants("torch", torch_attention.flash_attn_with_kvcache, torch_direct),
    }
    torch_calls = max(1, args.calls // 20)  # the real provider computes: fewer calls
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run(10)  # activate the chain, warm caches
    for _ in range(args.rounds):
        for name, run in variants.items():
            samples[name].append(ns_per_call(run, torch_calls if name.startswith("torch ") else args.calls))
    ns = {name: statistics.median(values) for name, values in samples.items()}
    print(f"median of {args.rounds} rounds, CPU ns per call (thread time), all variants interleaved")
    print(f"{'variant':<28}{'ns/call':>10}{'vs direct':>11}{'added ns':>10}")
    for name, value in ns.items():
        base = ns[name.partition(" chain")[0].removesuffix(" direct") + " direct"]
        print(f"{name:<28}{value:>10.0f}{value / base:>10.2f}x{value - base:>10.0f}")


if __name__ == "__main__":
    main()
