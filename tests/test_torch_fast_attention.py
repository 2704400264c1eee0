"""The fast ``torch`` provider (``_torch_fast_attention``) against the exact reference.

Random cases over causal, window, softcap, attention_chunk, GQA, sinks, lse, seqused,
empty sequences, paged caches (page sizes 1 to 256) with appends and packed queries, and
FA3's kvcache extras (rotary, cache_batch_idx, cache_leftpad, packed appends; the cases
of ``kvcache_cases``).
On CPU flex_attention runs eagerly; tests/test_gpu.py covers the compiled CUDA path.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from kvcache_cases import clone_call, random_case
from test_kvcache_features_oracle import oracle as kv_oracle
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask

from kernel_fallback.integrations.flash_attn import _decode, _flex, _mla_fp8
from kernel_fallback.integrations.flash_attn import _fast as fast
from kernel_fallback.integrations.flash_attn import _masks as _attention_masks
from kernel_fallback.integrations.flash_attn import _reference as ref
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func as chain_varlen


def _cu(lens: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _close(got: Any, want: Any, atol: float = 2e-5) -> None:
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert g.dtype == w.dtype
        assert torch.equal(torch.isneginf(g), torch.isneginf(w)), "-inf rows differ"
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], atol=atol, rtol=1e-4)


VARLEN = [
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"causal": True, "return_softmax_lse": True, "hkv": 1}, id="causal-mqa-lse"),
    pytest.param({"window_size": (5, 3), "return_softmax_lse": True}, id="window-lse"),
    pytest.param({"window_size": (torch.tensor(9), torch.tensor(0))}, id="window-0d-tensors"),
    pytest.param({"causal": True, "attention_chunk": 16}, id="chunk-causal"),
    pytest.param({"attention_chunk": 8, "return_softmax_lse": True}, id="chunk-noncausal-lse"),
    pytest.param({"softcap": 30.0, "causal": True}, id="softcap"),
    pytest.param({"sinks": True, "return_softmax_lse": True}, id="sinks-lse"),
    pytest.param(
        {"sinks": True, "causal": True, "window_size": (20, -1), "softcap": 5.0}, id="sinks-window-softcap"
    ),
    pytest.param({"seqused": True, "causal": True, "return_softmax_lse": True}, id="seqused-lse"),
    pytest.param({"softmax_scale": 0.3, "causal": True}, id="scale"),
]


@pytest.mark.parametrize("options", VARLEN)
@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
def test_varlen_matches_reference(options: dict[str, Any], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opts = dict(options)
    hkv = opts.pop("hkv", 2)
    # Random lengths with an empty sequence, Lq > Lk and Lq < Lk, across 128-row blocks.
    lens_q = [int(x) for x in torch.randint(1, 150, (4,), generator=gen)] + [0]
    lens_k = [int(x) for x in torch.randint(1, 260, (4,), generator=gen)] + [7]
    q = torch.randn(sum(lens_q), 4, 32, generator=gen)
    k = torch.randn(sum(lens_k), hkv, 32, generator=gen)
    v = torch.randn(sum(lens_k), hkv, 16, generator=gen)
    if opts.pop("sinks", False):
        opts["sinks"] = torch.randn(4, generator=gen)
    if opts.pop("seqused", False):
        opts["seqused_q"] = torch.tensor([n // 2 for n in lens_q], dtype=torch.int32)
        opts["seqused_k"] = torch.tensor([n - 3 if n > 3 else n for n in lens_k], dtype=torch.int32)
    want = ref.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), **opts)
    got = fast.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), **opts)
    _close(got, want)
    assert fast.last_backend("flash_attn_varlen_func") == "flex_attention (eager, cpu)"


def test_bfloat16_within_upstreams_rule_on_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    lens = [70, 5, 140]
    q, k, v = (torch.randn(sum(lens), h, 32, generator=gen).bfloat16() for h in (4, 2, 2))
    oracle = ref.flash_attn_varlen_func(q.double(), k.double(), v.double(), _cu(lens), _cu(lens), causal=True)
    plain = ref.flash_attn_varlen_func(q, k, v, _cu(lens), _cu(lens), causal=True)  # fp32 math, bf16 out
    got = fast.flash_attn_varlen_func(q, k, v, _cu(lens), _cu(lens), causal=True)
    assert isinstance(got, Tensor)
    assert isinstance(oracle, Tensor)
    assert isinstance(plain, Tensor)
    assert got.dtype == torch.bfloat16
    atol = 2 * (oracle + 0.3 - 0.3 - oracle).abs().max()
    assert (got.double() - oracle).abs().max() <= 2 * (plain.double() - oracle).abs().max() + atol


CACHE = [
    pytest.param({"page": 1}, id="page1-decode"),
    pytest.param({"page": 16, "return_softmax_lse": True}, id="page16-decode-lse"),
    pytest.param({"page": 256, "sq": 3}, id="page256-sq3"),
    pytest.param({"page": 4, "sq": 2, "append": 2}, id="page4-append"),
    pytest.param(
        {"page": 8, "sq": 40, "append": 3, "return_softmax_lse": True}, id="page8-extend-append-lse"
    ),
    pytest.param({"sq": 1, "append": 1}, id="contiguous-append"),
    pytest.param({"sq": 2, "softcap": 20.0, "sinks": True}, id="contiguous-softcap-sinks"),
    pytest.param({"page": 4, "window_size": (6, 0), "append": 1}, id="window-decode"),
    pytest.param({"page": 4, "attention_chunk": 8, "sq": 5, "causal": False}, id="chunk-noncausal"),
    pytest.param({"page": 4, "packed": True, "append": 0, "return_softmax_lse": True}, id="packed-q-lse"),
    pytest.param({"sq": 2, "cache_seqlens": 9}, id="int-seqlens"),
    pytest.param({"sq": 2, "cache_seqlens": None}, id="full-cache"),
]


@pytest.mark.parametrize("options", CACHE)
def test_kvcache_matches_reference(options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(11)
    opts = {"causal": True, **options}
    page, sq, s_new = opts.pop("page", None), opts.pop("sq", 1), opts.pop("append", 0)
    batch, capacity, hkv = 3, max(48, page or 0), 2
    seqlens = torch.tensor([0, 13, capacity - s_new], dtype=torch.int32)
    cache_seqlens = opts.pop("cache_seqlens", seqlens)
    if page is not None:
        blocks = batch * (capacity // page)
        k_cache, v_cache = (torch.randn(blocks + 2, page, hkv, 16, generator=gen) for _ in range(2))
        opts["page_table"] = torch.randperm(blocks + 2, generator=gen)[:blocks].view(batch, -1).int()
    else:
        k_cache, v_cache = (torch.randn(batch, capacity, hkv, 16, generator=gen) for _ in range(2))
    if opts.pop("packed", False):
        q = torch.randn(7, 4, 16, generator=gen)
        opts["cu_seqlens_q"] = _cu([3, 0, 4])
    else:
        q = torch.randn(batch, sq, 4, 16, generator=gen)
    if s_new:
        opts["k"], opts["v"] = (torch.randn(batch, s_new, hkv, 16, generator=gen) for _ in range(2))
    if opts.pop("sinks", False):
        opts["sinks"] = torch.randn(4, generator=gen)
    caches = k_cache.clone(), v_cache.clone()
    want = ref.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, **opts)
    got = fast.flash_attn_with_kvcache(q, *caches, cache_seqlens=cache_seqlens, **opts)
    _close(got, want)
    assert torch.equal(caches[0], k_cache)  # appended the same keys in place
    assert torch.equal(caches[1], v_cache)


@pytest.mark.parametrize("page", [None, 1, 16, 64], ids=["contiguous", "page1", "page16", "page64"])
@pytest.mark.parametrize("seed", range(6), ids=[f"seed{s}" for s in range(6)])
def test_kvcache_extras_match_reference(page: int | None, seed: int) -> None:
    # Rotary, cache_batch_idx, cache_leftpad, packed appends, empty caches (kvcache_cases).
    call = random_case(200 + seed, page, dtype=torch.float32)
    if seed % 2:
        call["return_softmax_lse"] = True
    mine, theirs = clone_call(call), clone_call(call)
    _close(fast.flash_attn_with_kvcache(**mine), ref.flash_attn_with_kvcache(**theirs))
    assert torch.equal(mine["k_cache"], theirs["k_cache"])  # the same appends, in place
    assert torch.equal(mine["v_cache"], theirs["v_cache"])


EXTRAS = [
    pytest.param({"new_kv": "packed", "empty": True, "leftpad": True, "batch_idx": True}, id="empty-packed"),
    pytest.param({"new_kv": "packed", "extra_rows": 2, "varlen_q": True}, id="packed-extra-rows"),
    pytest.param({"new_kv": "none", "leftpad": True, "mask": "causal", "sq": 1}, id="leftpad-decode-sdpa"),
    pytest.param({"new_kv": "plain", "rotary_dim": 32, "mask": "chunk", "varlen_q": True}, id="rotary-chunk"),
]


@pytest.mark.parametrize("page", [None, 16], ids=["contiguous", "page16"])
@pytest.mark.parametrize("force", EXTRAS)
def test_kvcache_extras_edge_cases_match_reference(force: dict[str, Any], page: int | None) -> None:
    call = random_case(5, page, dtype=torch.float32, **force)
    mine, theirs = clone_call(call), clone_call(call)
    _close(fast.flash_attn_with_kvcache(**mine), ref.flash_attn_with_kvcache(**theirs))
    assert torch.equal(mine["k_cache"], theirs["k_cache"])
    assert torch.equal(mine["v_cache"], theirs["v_cache"])


@pytest.mark.parametrize("page", [None, 1, 16, 64], ids=["contiguous", "page1", "page16", "page64"])
@pytest.mark.parametrize("seed", range(3), ids=[f"seed{s}" for s in range(3)])
def test_kvcache_extras_bfloat16_within_upstreams_rule(seed: int, page: int | None) -> None:
    # Seed 0 forces every extra at once; the others draw them at random.
    force: dict[str, Any] = {"new_kv": "packed", "rotary_dim": 32, "leftpad": True, "batch_idx": True}
    call = random_case(300 + seed, page, dtype=torch.bfloat16, **(force if seed == 0 else {}))
    as64 = {k: v.double() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in call.items()}
    truth = ref.flash_attn_with_kvcache(**clone_call(as64))
    plain, _, _ = kv_oracle(call, dtype=torch.bfloat16)  # upstream's upcast=False computation
    got = fast.flash_attn_with_kvcache(**clone_call(call))
    assert isinstance(got, Tensor)
    assert isinstance(truth, Tensor)
    assert got.dtype == torch.bfloat16
    atol = 2 * (truth + 0.3 - 0.3 - truth).abs().max()
    assert (got.double() - truth).abs().max() <= 2 * (plain.double() - truth).abs().max() + atol


def test_kvcache_batch_idx_is_a_page_table_for_the_decode_paths() -> None:
    # A contiguous cache row picked by cache_batch_idx reads like a one-page table.
    gen = torch.Generator().manual_seed(4)
    q, k_cache = torch.randn(2, 1, 4, 16, generator=gen), torch.randn(5, 12, 2, 16, generator=gen)
    seqlens, idx = torch.tensor([3, 12], dtype=torch.int32), torch.tensor([4, 1], dtype=torch.int32)
    got = fast.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, cache_batch_idx=idx)
    assert fast.last_backend("flash_attn_with_kvcache") == "sdpa (decode, gqa folded into rows)"
    table = idx.view(2, 1)
    _close(got, fast.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, page_table=table))
    _close(got, ref.flash_attn_with_kvcache(q, k_cache[[4, 1]], k_cache[[4, 1]], cache_seqlens=seqlens))


def test_decode_without_lse_takes_sdpa_and_the_rest_flex() -> None:
    q, cache = torch.randn(2, 1, 4, 16), torch.randn(2, 8, 2, 16)
    fast.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3)
    assert fast.last_backend("flash_attn_with_kvcache") == "sdpa (decode, gqa folded into rows)"
    fast.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3, return_softmax_lse=True)
    assert fast.last_backend("flash_attn_with_kvcache") == "flex_attention (eager, cpu)"


def test_block_mask_is_built_once_per_layout_and_rebuilt_when_it_changes() -> None:
    _attention_masks.cache_clear()
    cu = _cu([40, 200])
    q, k = torch.randn(240, 4, 16), torch.randn(240, 2, 16)
    for _ in range(3):  # layers of one forward pass
        fast.flash_attn_varlen_func(q, k, k, cu, cu, causal=True)
    assert len(_attention_masks._cache) == 1
    first = next(iter(_attention_masks._cache.values())).mask
    cu.copy_(_cu([200, 40]))  # same tensor, new values: its version changes
    out = fast.flash_attn_varlen_func(q, k, k, cu, cu, causal=True)
    assert next(reversed(_attention_masks._cache.values())).mask is not first
    _close(out, ref.flash_attn_varlen_func(q, k, k, cu, cu, causal=True))


def test_block_mask_full_and_partial_blocks_are_exact() -> None:
    # One 300-row causal sequence: blocks below the diagonal are full, on it partial.
    lo = torch.zeros(1, 300, dtype=torch.long)
    hi = torch.arange(1, 301).view(1, -1)
    mask = _attention_masks._build(lo, hi, 300, 128)
    assert mask.kv_num_blocks.flatten().tolist() == [1, 1, 1]
    assert mask.full_kv_num_blocks is not None
    assert mask.full_kv_num_blocks.flatten().tolist() == [0, 1, 2]
    dense = mask.to_dense()[0, 0]  # partial or full, per (q block, kv block)
    assert dense.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_describe_table_names_the_backend_of_the_last_call() -> None:
    cu = _cu([3, 4])
    chain_varlen(torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16), cu, cu, causal=True)
    table = chain_varlen.chain.describe_table()
    assert "last call: flex_attention (eager, cpu)" in table
    row = {r["name"]: r for r in chain_varlen.chain.describe()["providers"]}["torch"]
    assert row["backend"] == "flex_attention (eager, cpu)"
    assert row["source"] == "kernel_fallback.integrations.flash_attn._fast:flash_attn_varlen_func"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        pytest.param(
            {"cu_seqlens_q": torch.tensor([0, 3, 7])},
            r"cu_seqlens_q must have dtype torch\.int32",
            id="cu-dtype",
        ),
        pytest.param(
            {"cu_seqlens_k": _cu([7])}, r"cu_seqlens_k has 2 entries but cu_seqlens_q has 3", id="batch"
        ),
        pytest.param({"window_size": (-3, 0)}, r"window_size must be a pair of ints >= -1", id="window"),
        pytest.param({"attention_chunk": -1}, r"attention_chunk must be an int >= 0", id="chunk"),
        pytest.param(
            {"seqused_k": torch.tensor([1, 2])}, r"seqused_k must have dtype torch\.int32", id="seqused"
        ),
        pytest.param({"softcap": -1.0}, r"softcap must be >= 0", id="softcap"),
        pytest.param(
            {"qv": torch.ones(7, 4, 16)},
            r"qv must have shape \(7, 4, 8\) \(q's shape with the value head dim 8\)",
            id="qv-shape",
        ),
        pytest.param(
            {"k_descale": torch.ones(2)},
            r"k_descale must be a float32 tensor of shape \(2, 2\) \(batch, kv heads\)",
            id="descale-shape",
        ),
    ],
)
def test_varlen_bad_input_is_refused(override: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "q": torch.ones(7, 4, 8),
        "k": torch.ones(7, 2, 8),
        "v": torch.ones(7, 2, 8),
        "cu_seqlens_q": _cu([3, 4]),
        "cu_seqlens_k": _cu([3, 4]),
    }
    with pytest.raises(ValueError, match=match):
        fast.flash_attn_varlen_func(**(args | override))


def test_fully_masked_rows_are_zero_with_neg_inf_lse() -> None:
    q, k = torch.randn(6, 2, 8), torch.randn(2, 2, 8)
    out, lse = fast.flash_attn_varlen_func(q, k, k, _cu([6]), _cu([2]), causal=True, return_softmax_lse=True)
    assert torch.equal(out[:4], torch.zeros(4, 2, 8))
    assert lse[:, :4].tolist() == [[-math.inf] * 4] * 2


def test_block_mask_is_rebuilt_and_not_cached_when_reuse_is_off() -> None:
    # What the provider does while a CUDA graph is captured: replays must rebuild it.
    _attention_masks.cache_clear()
    builds: list[int] = []
    lo, hi = torch.zeros(1, 10, dtype=torch.long), torch.arange(1, 11).view(1, -1)

    def build() -> tuple[Tensor, Tensor]:
        builds.append(1)
        return lo, hi

    layout = (torch.tensor([0, 10], dtype=torch.int32),)
    for _ in range(2):
        _attention_masks.block_mask_for(layout, "p", build, 10, reuse=False)
    assert len(builds) == 2
    assert not _attention_masks._cache
    for _ in range(2):
        _attention_masks.block_mask_for(layout, "p", build, 10)
    assert len(builds) == 3


@pytest.mark.parametrize(
    ("raw", "enabled"),
    [(None, True), ("  ", True), ("1", True), ("on", True), ("0", False), ("False", False), ("off", False)],
    ids=["unset", "blank", "1", "on", "0", "False", "off"],
)
def test_triton_decode_variable_is_a_boolean(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, enabled: bool
) -> None:
    from kernel_fallback import _config

    if raw is None:
        monkeypatch.delenv(fast.TRITON_DECODE_ENV, raising=False)
    else:
        monkeypatch.setenv(fast.TRITON_DECODE_ENV, raw)
        _config.check_known_variables({fast.TRITON_DECODE_ENV: raw})  # a variable the library reads
    assert fast.triton_decode_enabled() is enabled


def test_triton_decode_variable_refuses_a_non_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel_fallback.exceptions import PolicyConfigError

    monkeypatch.setenv(fast.TRITON_DECODE_ENV, "maybe")
    with pytest.raises(PolicyConfigError, match="KERNEL_FALLBACK_TRITON='maybe' is not a boolean"):
        fast.triton_decode_enabled()


@pytest.mark.parametrize("cap", [0.5, 30.0], ids=["cap0.5", "cap30"])
def test_softcap_through_sigmoid_is_tanh_to_float32_rounding(cap: float) -> None:
    scores = torch.cat([torch.randn(4096) * 3 * cap, torch.linspace(-1e-3, 1e-3, 101)])
    args = (torch.zeros(()), torch.zeros(()), torch.zeros(()), torch.zeros(()))
    exact = _flex.softcap_mod(cap, scores.device, via_sigmoid=False)(scores.double(), *args)
    fused = _flex.softcap_mod(cap, scores.device, via_sigmoid=True)(scores, *args)
    assert torch.equal(exact, cap * torch.tanh(scores.double() / cap))
    assert (fused.double() - exact).abs().max().item() <= 4e-7 * cap


DEGENERATE_VARLEN = [
    pytest.param([3, 2], [0, 0], {"sinks": True}, id="no-keys-at-all"),
    pytest.param([0, 0], [3, 2], {"past_the_end": 0}, id="no-queries-at-all"),
    pytest.param([0, 0], [3, 2], {}, id="only-rows-past-the-last-sequence"),
    pytest.param([3, 1], [1, 1], {"causal": True}, id="single-key"),
    pytest.param([9, 6], [4, 2], {"causal": True, "sinks": True}, id="q-longer-than-k"),
    pytest.param([2, 1, 2], [1, 1, 1], {"causal": True}, id="2x1-causal"),
    pytest.param([2, 2, 1], [0, 1, 0], {"causal": True, "sinks": True}, id="2x1-causal-zero-keys"),
    pytest.param([0, 4, 3, 2], [5, 0, 3, 2], {"sinks": True, "seqused": True}, id="empty-seqused-sinks"),
]


@pytest.mark.parametrize(("lens_q", "lens_k", "options"), DEGENERATE_VARLEN)
def test_degenerate_varlen_shapes_match_the_reference(
    lens_q: list[int], lens_k: list[int], options: dict[str, Any]
) -> None:
    gen = torch.Generator().manual_seed(sum(lens_q) + 3 * sum(lens_k))
    q = torch.randn(sum(lens_q) + options.get("past_the_end", 2), 4, 16, generator=gen)
    k, v = torch.randn(sum(lens_k), 2, 16, generator=gen), torch.randn(sum(lens_k), 2, 8, generator=gen)
    opts: dict[str, Any] = {"causal": options.get("causal", False), "return_softmax_lse": True}
    if options.get("sinks"):
        opts["sinks"] = torch.randn(4, generator=gen)
    if options.get("seqused"):
        opts["seqused_q"] = torch.tensor([max(n - 1, 0) for n in lens_q], dtype=torch.int32)
        opts["seqused_k"] = torch.tensor([max(n - 1, 0) for n in lens_k], dtype=torch.int32)
    want = ref.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), **opts)
    got = fast.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), **opts)
    _close(got, want)
    nothing = not k.shape[0] or not q.shape[0]
    assert fast.last_backend("flash_attn_varlen_func") == (
        fast.NO_KEYS if nothing else "flex_attention (eager, cpu)"
    )


DEGENERATE_CACHE = [
    pytest.param({"sq": 0}, id="no-query-rows"),
    pytest.param({"capacity": 0, "sinks": True}, id="empty-cache"),
    pytest.param({"seqlens": [0, 1], "sq": 3, "sinks": True}, id="q-longer-than-cache"),
    pytest.param({"packed": [2, 0], "sinks": True}, id="packed-rows-past-the-last-sequence"),
    pytest.param({"packed": [0, 0], "sinks": True}, id="packed-no-sequence-rows"),
]


@pytest.mark.parametrize("options", DEGENERATE_CACHE)
def test_degenerate_cache_shapes_match_the_reference(options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(5)
    capacity = options.get("capacity", 6)
    k_cache, v_cache = (
        torch.randn(2, capacity, 2, 16, generator=gen),
        torch.randn(2, capacity, 2, 8, generator=gen),
    )
    seqlens = torch.tensor(options.get("seqlens", [0, capacity]), dtype=torch.int32)
    opts: dict[str, Any] = {"causal": True, "return_softmax_lse": True, "cache_seqlens": seqlens}
    if options.get("sinks"):
        opts["sinks"] = torch.randn(4, generator=gen)
    if "packed" in options:
        q = torch.randn(sum(options["packed"]) + 2, 4, 16, generator=gen)  # 2 rows past the last sequence
        opts["cu_seqlens_q"] = _cu(options["packed"])
    else:
        q = torch.randn(2, options.get("sq", 2), 4, 16, generator=gen)
    want = ref.flash_attn_with_kvcache(q, k_cache, v_cache, **opts)
    _close(fast.flash_attn_with_kvcache(q, k_cache, v_cache, **opts), want)


def test_backward_block_masks_carry_q_blocks_as_torchs_own_builder() -> None:
    _attention_masks.cache_clear()
    # Two causal documents of 200 and 100 rows packed: blocks straddle the boundary.
    cu = _cu([200, 100])
    doc = torch.searchsorted(cu[1:].long(), torch.arange(300), right=True)
    lo = cu[doc].long().view(1, -1)
    hi = torch.arange(1, 301).view(1, -1)
    layout = (cu,)
    forward = _attention_masks.block_mask_for(layout, "p", lambda: (lo, hi), 300)
    backward = _attention_masks.block_mask_for(layout, "p", lambda: (lo, hi), 300, q_blocks=True)
    assert forward.q_indices is None
    assert backward.q_indices is not None
    assert len(_attention_masks._cache) == 2  # a forward-only mask never serves a backward
    own = create_block_mask(
        lambda b, h, q_idx, kv_idx: (kv_idx >= lo[0, q_idx]) & (kv_idx < hi[0, q_idx]),
        1,
        None,
        300,
        300,
        device="cpu",
        BLOCK_SIZE=_attention_masks.BLOCK,
    )
    for name in ("q_num_blocks", "full_q_num_blocks", "kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(backward, name), getattr(own, name)), name
    for num, idx in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        for row, count in enumerate(getattr(own, num).flatten().tolist()):
            got, want = getattr(backward, idx)[0, 0, row, :count], getattr(own, idx)[0, 0, row, :count]
            assert sorted(got.tolist()) == sorted(want.tolist()), (idx, row)


# -- MLA (qv) and fp8 descales (issue 14) -----------------------------------------------------

ROPE, LATENT = 64, 512


def _pages(gen: torch.Generator, lens: list[int], page: int) -> tuple[Tensor, Tensor]:
    """A page table giving each request its own shuffled pages (page 0 unused); (table, owner)."""
    counts = [max(1, -(-n // page)) for n in lens]
    order = torch.randperm(sum(counts), generator=gen) + 1
    table = torch.zeros(len(lens), max(counts), dtype=torch.int32)
    owner = torch.full((sum(counts) + 1,), -1)
    start = 0
    for b, c in enumerate(counts):
        table[b, :c] = order[start : start + c]
        owner[order[start : start + c]] = b
        start += c
    return table, owner


MLA_FAST = [
    pytest.param({"page": 1, "packed": False}, id="decode-page1-sdpa"),
    pytest.param({"page": 16, "packed": False, "heads": 128}, id="decode-page16-h128"),
    pytest.param({"page": 16, "lse": True}, id="decode-page16-packed-lse"),
    pytest.param({"page": 64, "sq": [3, 1, 5], "lse": True}, id="extend-page64-lse"),
    pytest.param({"page": 1, "sq": [2, 1, 2], "softcap": 20.0}, id="extend-softcap"),
    pytest.param({"page": 16, "sq": [2, 3, 1], "causal": False, "lse": True}, id="cascade-empty-prefix"),
    pytest.param({"page": 16, "sq": [3, 1, 2], "window_size": (4, 0)}, id="window"),
    pytest.param({"page": 64, "scale": None}, id="default-scale"),
    pytest.param({"page": 16, "lse": True, "separate": True}, id="separate-buffers"),
]


@pytest.mark.parametrize("case", MLA_FAST)
def test_mla_kvcache_matches_reference(case: dict[str, Any]) -> None:
    """sglang's MLA call: k_rope and c_kv are strided views of one (pages, page, 1, 576) buffer."""
    gen = torch.Generator().manual_seed(31)
    page, heads, sq = case["page"], case.get("heads", 16), case.get("sq", [1, 1, 1])
    causal = case.get("causal", True)
    lens = [0 if not causal else sq[0] + 4, 37, 70]
    table, owner = _pages(gen, lens, page)
    buf = torch.randn(owner.shape[0], page, 1, LATENT + ROPE, generator=gen)
    c_kv, k_rope = buf[..., :LATENT], buf[..., LATENT:]
    if case.get("separate"):
        c_kv, k_rope = c_kv.clone(), k_rope.clone()
    assert (_mla_fp8.joint_view(k_rope, c_kv) is None) == bool(case.get("separate"))
    opts: dict[str, Any] = {
        "cache_seqlens": torch.tensor(lens, dtype=torch.int32),
        "page_table": table,
        "causal": causal,
        "softmax_scale": case.get("scale", 192**-0.5 * 1.1),
        "softcap": case.get("softcap", 0.0),
        "window_size": case.get("window_size", (-1, -1)),
        "return_softmax_lse": case.get("lse", False),
    }
    if case.get("packed", True):
        q_rope = torch.randn(sum(sq), heads, ROPE, generator=gen)
        q_nope = torch.randn(sum(sq), heads, LATENT, generator=gen)
        opts |= {"cu_seqlens_q": _cu(sq), "max_seqlen_q": max(sq)}
    else:
        q_rope = torch.randn(3, sq[0], heads, ROPE, generator=gen)
        q_nope = torch.randn(3, sq[0], heads, LATENT, generator=gen)
    want = ref.flash_attn_with_kvcache(q_rope, k_rope, c_kv, qv=q_nope, **opts)
    got = fast.flash_attn_with_kvcache(q_rope, k_rope, c_kv, qv=q_nope, **opts)
    _close(got, want, atol=5e-5)
    # One packed query per sequence (max_seqlen_q 1) is served as the (B, 1) decode it is.
    decode = not case.get("packed", True) or max(sq) == 1
    small = decode and heads * sq[0] <= 64 and not opts["return_softmax_lse"] and opts["softcap"] == 0
    backend = "sdpa (decode, gqa folded into rows)" if small else "flex_attention (eager, cpu)"
    assert fast.last_backend("flash_attn_with_kvcache") == backend


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mla_varlen_with_qv_matches_reference(causal: bool) -> None:
    gen = torch.Generator().manual_seed(32)
    lens_q, lens_k = [5, 0, 130], [9, 3, 140]
    q, qv = torch.randn(135, 16, ROPE, generator=gen), torch.randn(135, 16, LATENT, generator=gen)
    k, v = torch.randn(152, 1, ROPE, generator=gen), torch.randn(152, 1, LATENT, generator=gen)
    opts: dict[str, Any] = {"qv": qv, "causal": causal, "return_softmax_lse": True}
    want = ref.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), **opts)
    got = fast.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), **opts)
    _close(got, want, atol=5e-5)


def test_mla_bfloat16_decode_within_upstreams_rule_on_cpu() -> None:
    gen = torch.Generator().manual_seed(33)
    lens = [30, 200]
    table, owner = _pages(gen, lens, 16)
    buf = torch.randn(owner.shape[0], 16, 1, LATENT + ROPE, generator=gen).bfloat16()
    c_kv, k_rope = buf[..., :LATENT], buf[..., LATENT:]
    q = torch.randn(2, 1, 32, ROPE, generator=gen).bfloat16()
    qv = torch.randn(2, 1, 32, LATENT, generator=gen).bfloat16()
    opts: dict[str, Any] = {"cache_seqlens": torch.tensor(lens, dtype=torch.int32), "page_table": table}
    oracle = ref.flash_attn_with_kvcache(q.double(), k_rope.double(), c_kv.double(), qv=qv.double(), **opts)
    plain = ref.flash_attn_with_kvcache(q, k_rope, c_kv, qv=qv, **opts)  # fp32 math, bf16 out
    got = fast.flash_attn_with_kvcache(q, k_rope, c_kv, qv=qv, **opts)
    assert isinstance(got, Tensor)
    assert isinstance(oracle, Tensor)
    assert isinstance(plain, Tensor)
    assert got.dtype == torch.bfloat16
    atol = 2 * (oracle + 0.3 - 0.3 - oracle).abs().max()
    assert (got.double() - oracle).abs().max() <= 2 * (plain.double() - oracle).abs().max() + atol


def _close_lse(got: Tensor, want: Tensor) -> None:
    """The float32 lse of scores computed in bfloat16: -inf where the reference's is, else bf16-close."""
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf rows differ"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-2, rtol=2**-7)


def _descales(gen: torch.Generator, batch: int, hkv: int, kind: str) -> tuple[Tensor | None, Tensor, Tensor]:
    """(q, k, v) descales in [0.25, 8]: sglang's 0-d scale expanded, or per (b, h) different."""
    if kind == "expanded":
        scale = 2 ** torch.empty(()).uniform_(-2, 3, generator=gen)
        return None, scale.expand(batch, hkv), scale.expand(batch, hkv)
    q_d, k_d, v_d = (2 ** torch.empty(batch, hkv).uniform_(-2, 3, generator=gen) for _ in range(3))
    return q_d, k_d.T.contiguous().T, v_d


FP8_FAST = [
    pytest.param({"page": 1, "packed": False, "kind": "expanded"}, id="decode-page1-sdpa-expanded"),
    pytest.param({"page": 16, "kind": "expanded", "lse": True}, id="decode-page16-packed-lse"),
    pytest.param({"page": 64, "kind": "per-head", "sq": [3, 1, 4], "lse": True}, id="extend-page64"),
    pytest.param({"page": 16, "kind": "per-head", "softcap": 12.0, "packed": False}, id="softcap"),
]


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("case", FP8_FAST)
def test_fp8_kvcache_within_upstreams_rule_and_the_fp8_rounding(case: dict[str, Any], fp8: str) -> None:
    """fp8 KV: |fast - exact| <= 2 |plain bf16 - exact| + atol, and within what fp8 rounding costs.

    ``exact`` is the float64 attention of the dequantized fp8 values; ``plain`` the same
    attention of those values in bfloat16; ``ideal`` that of the unquantized inputs.
    """
    gen = torch.Generator().manual_seed(34)
    dtype, page, hq, hkv, d = getattr(torch, fp8), case["page"], 8, 2, 64
    sq, lens = case.get("sq", [1, 1, 1]), [0, 45, 150]
    lens[0] = sq[0]  # a request whose cache holds only its new tokens
    table, owner = _pages(gen, lens, page)
    q_d, k_d, v_d = _descales(gen, 3, hkv, case["kind"])
    q_scale = q_d if q_d is not None else torch.ones(3, hkv)

    def per_page(scale: Tensor) -> Tensor:  # each page's scale is its owner's, (pages, 1, hkv, 1)
        return scale[owner.clamp_min(0)].view(-1, 1, hkv, 1)

    k32, v32 = (torch.randn(owner.shape[0], page, hkv, d, generator=gen) * 2 for _ in range(2))
    k8, v8 = (k32 / per_page(k_d)).to(dtype), (v32 / per_page(v_d)).to(dtype)
    packed = case.get("packed", True)
    q32 = torch.randn(*((sum(sq),) if packed else (3, sq[0])), hq, d, generator=gen) * 2
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(sq)) if packed else torch.arange(3)[:, None]
    q_row_scale = q_scale[seq].repeat_interleave(hq // hkv, -1)[..., None]
    q8 = (q32 / q_row_scale).to(dtype)
    opts: dict[str, Any] = {
        "cache_seqlens": torch.tensor(lens, dtype=torch.int32),
        "page_table": table,
        "causal": True,
        "softcap": case.get("softcap", 0.0),
        "softmax_scale": d**-0.5,
    }
    if packed:
        opts |= {"cu_seqlens_q": _cu(sq), "max_seqlen_q": max(sq)}
    got = fast.flash_attn_with_kvcache(
        q8,
        k8,
        v8,
        q_descale=q_d,
        k_descale=k_d,
        v_descale=v_d,
        return_softmax_lse=case.get("lse", False),
        **opts,
    )
    want = ref.flash_attn_with_kvcache(
        q8,
        k8,
        v8,
        q_descale=q_d,
        k_descale=k_d,
        v_descale=v_d,
        return_softmax_lse=case.get("lse", False),
        **opts,
    )
    if case.get("lse", False):
        assert isinstance(got, tuple)
        assert isinstance(want, tuple)
        _close_lse(got[1], want[1])
        got, want = got[0], want[0]
    assert isinstance(got, Tensor)
    assert isinstance(want, Tensor)
    assert got.dtype == want.dtype == torch.bfloat16
    dequant = (q8.double() * q_row_scale, k8.double() * per_page(k_d), v8.double() * per_page(v_d))
    exact = ref.flash_attn_with_kvcache(*dequant, **opts)
    plain = ref.flash_attn_with_kvcache(
        dequant[0].bfloat16(), dequant[1].bfloat16(), dequant[2].bfloat16(), **opts
    )
    ideal = ref.flash_attn_with_kvcache(q32.double(), k32.double(), v32.double(), **opts)
    assert isinstance(exact, Tensor)
    assert isinstance(plain, Tensor)
    assert isinstance(ideal, Tensor)
    atol = 2 * (exact + 0.3 - 0.3 - exact).abs().max()
    err = (got.double() - exact).abs().max()
    assert err <= 2 * (plain.double() - exact).abs().max() + atol
    assert err <= (ideal - exact).abs().max()  # well inside what the fp8 rounding of the inputs costs


@pytest.mark.parametrize("descales", [False, True], ids=["no-descales", "per-head-descales"])
def test_fp8_mla_prefill_192_128_matches_reference(descales: bool) -> None:
    """MLA's MHA prefill: q/k head dim 192, v 128, fp8 (sometimes without descales), lse."""
    gen = torch.Generator().manual_seed(35)
    f8, lens = torch.float8_e4m3fn, [40, 0, 150]
    q, k = (torch.randn(190, 4, 192, generator=gen).to(f8) for _ in range(2))
    v = torch.randn(190, 4, 128, generator=gen).to(f8)
    opts: dict[str, Any] = {"causal": True, "softmax_scale": 192**-0.5, "return_softmax_lse": True}
    if descales:
        q_d, k_d, v_d = _descales(gen, 3, 4, "per-head")
        opts |= {"q_descale": q_d, "k_descale": k_d, "v_descale": v_d}
    want = ref.flash_attn_varlen_func(q, k, v, _cu(lens), _cu(lens), **opts)
    got = fast.flash_attn_varlen_func(q, k, v, _cu(lens), _cu(lens), **opts)
    assert got[0].dtype == torch.bfloat16
    scale = want[0].double().abs().max()
    assert (got[0].double() - want[0].double()).abs().max() <= 2**-6 * scale
    _close_lse(got[1], want[1])


@pytest.mark.parametrize(
    ("make", "joint"),
    [
        pytest.param(lambda b: (b[..., 512:], b[..., :512]), True, id="sglang-views"),
        pytest.param(lambda b: (b[..., :64], b[..., 64:]), False, id="k-before-v"),
        pytest.param(lambda b: (b[..., 512:].clone(), b[..., :512]), False, id="copied"),
        pytest.param(lambda b: (b[..., 510:574], b[..., :512]), False, id="overlapping"),
        pytest.param(lambda b: (b[1:, ..., 512:], b[:-1, ..., :512]), False, id="other-rows"),
    ],
)
def test_joint_view_only_for_adjacent_views_of_one_buffer(make: Any, joint: bool) -> None:
    buf = torch.randn(4, 8, 1, 576)
    k, v = make(buf)
    view = _mla_fp8.joint_view(k, v)
    assert (view is not None) == joint
    if view is not None:
        assert torch.equal(view, torch.cat([v, k], -1))


def test_one_packed_query_per_sequence_is_served_as_the_decode_it_is() -> None:
    """sglang's MLA decode: packed q, cu_seqlens_q = arange, max_seqlen_q = 1 (the (B, 1) path)."""
    gen = torch.Generator().manual_seed(9)
    q_rope, q_nope = torch.randn(3, 16, 64, generator=gen), torch.randn(3, 16, 512, generator=gen)
    pool = torch.randn(40, 4, 1, 576, generator=gen)
    c_kv, k_rope = pool[..., :512], pool[..., 512:]
    opts: dict[str, Any] = {
        "cache_seqlens": torch.tensor([30, 1, 47], dtype=torch.int32),
        "page_table": torch.randperm(40, generator=gen)[:36].view(3, 12).int(),
        "cu_seqlens_q": torch.arange(4, dtype=torch.int32),
        "cu_seqlens_k_new": torch.arange(4, dtype=torch.int32),
        "softmax_scale": 192**-0.5,
        "causal": True,
        "return_softmax_lse": True,
    }
    assert _decode.one_query_per_sequence(q_rope, None, opts["cu_seqlens_q"], 1, opts["cache_seqlens"])
    assert not _decode.one_query_per_sequence(q_rope, None, opts["cu_seqlens_q"], 2, opts["cache_seqlens"])
    got, lse = fast.flash_attn_with_kvcache(q_rope, k_rope, c_kv, qv=q_nope, max_seqlen_q=1, **opts)
    packed, packed_lse = fast.flash_attn_with_kvcache(q_rope, k_rope, c_kv, qv=q_nope, **opts)
    want, want_lse = ref.flash_attn_with_kvcache(
        q_rope.double(), k_rope.double(), c_kv.double(), qv=q_nope.double(), max_seqlen_q=1, **opts
    )
    assert got.shape == packed.shape == (3, 16, 512)
    assert lse.shape == packed_lse.shape == (16, 3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, packed, atol=1e-5, rtol=1e-5)
