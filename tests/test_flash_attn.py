"""The FlashAttention-3 chains of kernel_fallback.integrations.flash_attn, on a machine without them.

sgl_kernel and flash_attn are absent here, so the chains fall back to the torch reference
through the real failures. The FA2 adapter and the hub loader are exercised against small
stand-in packages written to a temporary directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs
from test_torch_attention import _assert_close, _cu, _randn, _ref_sequence

from kernel_fallback import PolicyConfigError, ProviderUnavailableError, UnsupportedKwargError, reload_config
from kernel_fallback.integrations.flash_attn import _chains as fa
from kernel_fallback.integrations.flash_attn import _reference as ref
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from kernel_fallback.testing import capture_fallbacks

ROOT = Path(__file__).resolve().parent.parent
# `kernels` may be installed (transformers brings it): conftest keeps it offline, so the hub
# provider is unavailable here as on a machine without it.
NATIVE = [name for name in ("sgl_kernel", "flash_attn") if importlib.util.find_spec(name)]
needs_no_native = pytest.mark.skipif(bool(NATIVE), reason=f"installed here: {NATIVE}")


@pytest.fixture(autouse=True)
def fresh_chains() -> Iterator[None]:
    """Each test starts from chains that have loaded nothing and chosen nothing."""
    for chain in (flash_attn_varlen_func, flash_attn_with_kvcache):
        chain.use(None)
        chain.reset()
    yield
    for chain in (flash_attn_varlen_func, flash_attn_with_kvcache):
        chain.use(None)
        chain.reset()


def varlen_inputs(
    lens_q: list[int], lens_k: list[int], hq: int = 8, hkv: int = 2, d: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, sum(lens_q), hq, d)
    k = _randn(gen, sum(lens_k), hkv, d)
    v = _randn(gen, sum(lens_k), hkv, d)
    return q, k, v, _cu(lens_q), _cu(lens_k)


def varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens_q: list[int], lens_k: list[int], **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference, sequence by sequence, with the test module's independent loops."""
    outs, lses = [], []
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        o, s = _ref_sequence(q[q0 : q0 + lq], k[k0 : k0 + lk], v[k0 : k0 + lk], **options)
        outs.append(o)
        lses.append(s)
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs), torch.cat(lses, dim=1)


# -- choosing and falling back ---------------------------------------------------------


@needs_no_native
def test_falls_back_to_torch_through_the_real_import_failure() -> None:
    q, k, v, cu_q, cu_k = varlen_inputs([3, 4], [3, 4])
    with capture_logs() as logs, capture_fallbacks() as events:
        for _ in range(3):
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True)
    assert flash_attn_varlen_func.chain.active == "torch"
    (event,) = events
    assert (event.kind, event.kernel, event.subject) == ("provider", "flash_attn_varlen_func", "torch")
    (log,) = logs
    assert (log["event"], log["wanted"], log["chosen"]) == (
        "kernel_fallback.provider_fallback",
        "sgl_kernel",
        "torch",
    )
    assert log["source"] == "SGLANG_USE_SGL_FA3_KERNEL unset (default true)"
    assert log["skipped"]["flash_attn"] == "ModuleNotFoundError: No module named 'flash_attn'"
    if not torch.cuda.is_available():
        assert log["reason"].startswith("gate 'compute capability 8.x or 9.x' is closed: torch ")


@needs_no_native
def test_describe_lists_every_provider_with_its_reason() -> None:
    data = flash_attn_with_kvcache.describe()
    assert (data["kernel"], data["active"], data["order"]) == (
        "flash_attn_with_kvcache",
        "torch",
        ["sgl_kernel", "flash_attn", "torch"],
    )
    rows = {row["name"]: row for row in data["providers"]}
    assert [row["name"] for row in data["providers"]] == [
        "sgl_kernel",
        "flash_attn",
        "torch",
        "hub",
        "reference",
        "fa4",
    ]
    assert rows["flash_attn"]["reason"] == "ModuleNotFoundError: No module named 'flash_attn'"
    assert rows["hub"]["status"] == rows["reference"]["status"] == rows["fa4"]["status"] == "not selected"
    assert rows["torch"]["source"] == "kernel_fallback.integrations.flash_attn._fast:flash_attn_with_kvcache"
    assert {"out", "score_mod", "aux_tensors"} <= set(rows["torch"]["lacks"])
    # Everything else FA3 takes is the torch provider's own (issue 14): its signature lists it.
    extras = {"page_table", "rotary_cos", "rotary_sin", "rotary_seqlens", "rotary_interleaved"}
    extras |= {"cache_batch_idx", "cache_leftpad", "cu_seqlens_k_new", "qv", "q_descale", "k_descale"}
    assert not extras & set(rows["torch"]["lacks"])
    # Hints are not lacks: no policy applies, they are removed silently.
    assert rows["torch"]["ignores"] == ["num_splits", "pack_gqa", "scheduler_metadata", "sm_margin"]
    policies = rows["torch"]["on_drop"]
    assert (policies["out"], policies["score_mod"]) == ("copy", "raise")
    assert "qv" not in policies
    assert "num_splits" not in policies
    assert "  3  torch       active" in flash_attn_with_kvcache.describe_table()


@needs_no_native
def test_explicit_request_raises_and_strict_refuses_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, cu_q, cu_k = varlen_inputs([2], [2])
    flash_attn_varlen_func.use("flash_attn")
    with pytest.raises(ProviderUnavailableError) as info:
        flash_attn_varlen_func(q, k, v, cu_q, cu_k)
    assert info.value.reasons == {"flash_attn": "ModuleNotFoundError: No module named 'flash_attn'"}
    flash_attn_varlen_func.use(None)
    monkeypatch.setenv("KERNEL_FALLBACK_STRICT", "yes")
    reload_config()
    with pytest.raises(ProviderUnavailableError, match="KERNEL_FALLBACK_STRICT is set"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k)
    monkeypatch.setenv("KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC", "torch")
    reload_config()
    flash_attn_varlen_func(q, k, v, cu_q, cu_k)  # chosen explicitly: no fallback, strict is satisfied


# -- numerics through the chain --------------------------------------------------------

VARLEN_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"causal": True, "window_size": (3, 0)}, id="causal-window"),
    pytest.param({"softcap": 4.0, "softmax_scale": 0.3}, id="softcap-scale"),
    pytest.param({"causal": True, "sinks": True}, id="sinks"),
]


@pytest.mark.parametrize("options", VARLEN_CASES)
def test_varlen_chain_matches_a_float64_reference(options: dict[str, Any]) -> None:
    lens_q, lens_k = [5, 1, 7], [9, 4, 7]
    q, k, v, cu_q, cu_k = varlen_inputs(lens_q, lens_k, seed=3)
    call = dict(options)
    if call.pop("sinks", False):
        call["sinks"] = _randn(torch.Generator().manual_seed(9), 8)
    out, lse = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_softmax_lse=True, **call
    )
    ref_out, ref_lse = varlen_reference(
        q,
        k,
        v,
        lens_q,
        lens_k,
        scale=call.get("softmax_scale", 16**-0.5),
        causal=call.get("causal", False),
        window=call.get("window_size", (-1, -1)),
        softcap=call.get("softcap", 0.0),
        sinks=call.get("sinks"),
    )
    _assert_close(out, ref_out, "out")
    _assert_close(lse, ref_lse, "lse")


def test_out_buffer_is_filled_through_the_chain() -> None:
    lens = [4, 6]
    q, k, v, cu_q, cu_k = varlen_inputs(lens, lens, seed=5)
    buf = torch.full((10, 8, 16), float("nan"))
    with capture_fallbacks() as events:
        result, lse = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, causal=True, out=buf, return_softmax_lse=True
        )
    assert result is buf
    ref_out, ref_lse = varlen_reference(q, k, v, lens, lens, scale=16**-0.5, causal=True)
    _assert_close(buf, ref_out, "out buffer")
    _assert_close(lse, ref_lse, "lse")
    kwarg_events = [(e.kernel, e.subject, e.policy) for e in events if e.kind == "kwarg"]
    assert kwarg_events == [("flash_attn_varlen_func.torch", "out", "copy")]


def test_kvcache_chain_paged_append_matches_a_float64_reference() -> None:
    gen = torch.Generator().manual_seed(21)
    bsz, page, blocks_per_seq, hq, hkv, d, s_new = 2, 4, 3, 8, 2, 16, 2
    num_blocks = bsz * blocks_per_seq + 1
    page_table = torch.randperm(num_blocks, generator=gen)[: bsz * blocks_per_seq].reshape(bsz, -1).int()
    k_cache, v_cache = _randn(gen, num_blocks, page, hkv, d), _randn(gen, num_blocks, page, hkv, d)
    logical_k = [torch.cat([k_cache[int(b)] for b in page_table[i]]) for i in range(bsz)]
    logical_v = [torch.cat([v_cache[int(b)] for b in page_table[i]]) for i in range(bsz)]
    q, k_new, v_new = (
        _randn(gen, bsz, 3, hq, d),
        _randn(gen, bsz, s_new, hkv, d),
        _randn(gen, bsz, s_new, hkv, d),
    )
    seqlens = [5, 9]
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        page_table=page_table,
        causal=True,
        num_splits=0,
        scheduler_metadata=None,
        return_softmax_lse=True,
    )
    for b, n in enumerate(seqlens):
        keys = torch.cat([logical_k[b][:n], k_new[b]])
        values = torch.cat([logical_v[b][:n], v_new[b]])
        ref_out, ref_lse = _ref_sequence(q[b], keys, values, scale=d**-0.5, causal=True)
        _assert_close(out[b], ref_out, f"out[{b}]")
        _assert_close(lse[b], ref_lse, f"lse[{b}]")


def test_keyword_no_provider_here_takes_is_refused_not_dropped() -> None:
    q, k, v, cu_q, cu_k = varlen_inputs([2], [2])
    with pytest.raises(UnsupportedKwargError, match="'score_mod'"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, score_mod=lambda score, *_: score)


@needs_no_native
def test_qv_and_descales_are_served_by_torch_not_refused() -> None:
    """MLA's qv and fp8 descales reach the torch provider and give the reference's result."""
    q, k, v, cu_q, cu_k = varlen_inputs([2, 3], [2, 3], hkv=1)
    qv = torch.randn(5, 8, 16, generator=torch.Generator().manual_seed(3))
    with capture_fallbacks() as events:
        out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, qv=qv, return_softmax_lse=True)
    assert [e.kind for e in events] == ["provider"]
    want, want_lse = ref.flash_attn_varlen_func(
        q.double(), k.double(), v.double(), cu_q, cu_k, causal=True, qv=qv.double(), return_softmax_lse=True
    )
    _assert_close(out, want, "out")
    _assert_close(lse, want_lse, "lse")
    f8 = torch.float8_e4m3fn
    scale = torch.tensor(0.5).expand(2, 1)  # sglang's stride-0 descale
    buf = torch.empty(5, 8, 16, dtype=torch.bfloat16)
    got = flash_attn_varlen_func(
        q.to(f8), k.to(f8), v.to(f8), cu_q, cu_k, k_descale=scale, v_descale=scale, out=buf
    )
    assert got is buf
    want = ref.flash_attn_varlen_func(
        q.to(f8), k.to(f8), v.to(f8), cu_q, cu_k, k_descale=scale, v_descale=scale
    )
    torch.testing.assert_close(buf, want, atol=2e-2, rtol=2e-2)


# -- sglang's call shapes: positional order, neutral values, hints, ver -------------------


def kvcache_inputs(seed: int = 4) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": _randn(gen, 2, 1, 8, 16),
        "k_cache": _randn(gen, 2, 6, 2, 16),
        "v_cache": _randn(gen, 2, 6, 2, 16),
        "cache_seqlens": torch.tensor([3, 6], dtype=torch.int32),
    }


def fa3_positional(**given: Any) -> tuple[Any, ...]:
    """The 28 leading arguments in FA3's order, as sglang 0.5.23's wrapper passes them."""
    names = list(inspect.signature(flash_attn_with_kvcache).parameters)[:28]
    defaults = inspect.signature(flash_attn_with_kvcache).parameters
    return tuple(given.get(n, defaults[n].default) for n in names)


def test_positional_order_is_fa3s_through_pack_gqa() -> None:
    kv = list(inspect.signature(flash_attn_with_kvcache).parameters)
    assert kv[:28] == [
        "q", "k_cache", "v_cache", "k", "v", "qv", "rotary_cos", "rotary_sin", "cache_seqlens",
        "cache_batch_idx", "cache_leftpad", "page_table", "cu_seqlens_q", "cu_seqlens_k_new",
        "max_seqlen_q", "rotary_seqlens", "q_descale", "k_descale", "v_descale", "softmax_scale",
        "causal", "window_size", "attention_chunk", "softcap", "rotary_interleaved",
        "scheduler_metadata", "num_splits", "pack_gqa",
    ]  # fmt: skip
    kinds = {p.kind for p in list(inspect.signature(flash_attn_with_kvcache).parameters.values())[28:]}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}
    varlen = list(inspect.signature(flash_attn_varlen_func).parameters)
    assert varlen[:21] == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "seqused_q",
        "seqused_k", "page_table", "softmax_scale", "causal", "qv", "q_descale", "k_descale",
        "v_descale", "window_size", "attention_chunk", "softcap", "num_splits", "pack_gqa",
    ]  # fmt: skip


@needs_no_native
def test_sglangs_28_positional_kvcache_call_equals_the_keyword_call() -> None:
    inputs = kvcache_inputs()
    args = fa3_positional(**inputs, causal=True, softcap=3.0, num_splits=0, scheduler_metadata=None)
    with capture_logs() as logs, capture_fallbacks() as events:
        flash_attn_with_kvcache.chain.active  # noqa: B018 - the provider event, before the calls
        out, lse, *rest = flash_attn_with_kvcache(
            *args, sm_margin=0, only_qv=False, return_softmax_lse=True, sinks=None, out=None
        )
        by_keyword = flash_attn_with_kvcache(**inputs, causal=True, softcap=3.0, return_softmax_lse=True)
    assert rest == []
    torch.testing.assert_close(out, by_keyword[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, by_keyword[1], rtol=0, atol=0)
    for b, n in enumerate([3, 6]):
        ref_out, ref_lse = _ref_sequence(
            inputs["q"][b],
            inputs["k_cache"][b, :n],
            inputs["v_cache"][b, :n],
            scale=0.25,
            causal=True,
            softcap=3.0,
        )
        _assert_close(out[b], ref_out, "out")
        _assert_close(lse[b], ref_lse, "lse")
    # Hints and neutral values are not fallbacks: nothing but the provider choice is recorded.
    assert [e.kind for e in events] == ["provider"]
    assert [log["event"] for log in logs] == ["kernel_fallback.provider_fallback"]


def test_rotary_leftpad_and_batch_idx_by_position_are_served_like_by_keyword() -> None:
    # FA3's positions 6, 7, 9, 10, 15 and 24: sglang's wrapper passes all 28 by position.
    inputs = kvcache_inputs(seed=5)
    gen = torch.Generator().manual_seed(2)
    extras = {
        "k": _randn(gen, 2, 1, 2, 16),
        "v": _randn(gen, 2, 1, 2, 16),
        "rotary_cos": _randn(gen, 12, 8),
        "rotary_sin": _randn(gen, 12, 8),
        "cache_seqlens": torch.tensor([2, 4], dtype=torch.int32),
        "cache_batch_idx": torch.tensor([1, 0], dtype=torch.int32),
        "cache_leftpad": torch.tensor([1, 0], dtype=torch.int32),
        "rotary_seqlens": torch.tensor([3, 0], dtype=torch.int32),
        "rotary_interleaved": False,
    }
    calls = [dict(inputs, **extras) for _ in range(3)]
    for call in calls:
        call["k_cache"], call["v_cache"] = call["k_cache"].clone(), call["v_cache"].clone()
    with capture_fallbacks() as events:
        by_keyword = flash_attn_with_kvcache(**calls[0], causal=True)
        by_position = flash_attn_with_kvcache(*fa3_positional(**calls[1], causal=True))
    assert [e.kind for e in events if e.kind != "provider"] == []  # served by the active torch provider
    want = ref.flash_attn_with_kvcache(**calls[2], causal=True)
    torch.testing.assert_close(by_position, by_keyword, rtol=0, atol=0)
    torch.testing.assert_close(by_keyword, want, rtol=1e-5, atol=1e-5)
    for call in calls[:2]:  # the rotated new keys appended in place, in cache row 1 at 2
        torch.testing.assert_close(call["k_cache"], calls[2]["k_cache"], rtol=0, atol=0)


@needs_no_native
def test_qv_and_descales_given_by_position_are_served_like_by_keyword() -> None:
    inputs = kvcache_inputs()
    inputs["k_cache"], inputs["v_cache"] = inputs["k_cache"][:, :, :1], inputs["v_cache"][:, :, :1]
    qv = torch.randn(2, 1, 8, 16, generator=torch.Generator().manual_seed(5))
    by_keyword = flash_attn_with_kvcache(**inputs, qv=qv, causal=True)
    by_position = flash_attn_with_kvcache(*fa3_positional(**inputs, qv=qv, causal=True))
    torch.testing.assert_close(by_position, by_keyword, rtol=0, atol=0)
    want = ref.flash_attn_with_kvcache(**inputs, qv=qv, causal=True)
    assert isinstance(want, torch.Tensor)
    _assert_close(by_keyword, want, "out")
    f8, scale = torch.float8_e4m3fn, torch.tensor(2.0).expand(2, 2)
    fp8 = {"q": inputs["q"].to(f8), "k_cache": kvcache_inputs()["k_cache"].to(f8)}
    fp8 |= {"v_cache": kvcache_inputs()["v_cache"].to(f8), "cache_seqlens": inputs["cache_seqlens"]}
    by_keyword = flash_attn_with_kvcache(**fp8, k_descale=scale, v_descale=scale / 4)
    by_position = flash_attn_with_kvcache(*fa3_positional(**fp8, k_descale=scale, v_descale=scale / 4))
    assert by_keyword.dtype == torch.bfloat16
    torch.testing.assert_close(by_position, by_keyword, rtol=0, atol=0)


def test_positional_mistakes_raise_type_error_naming_them() -> None:
    q, k, v, cu_q, cu_k = varlen_inputs([2], [2])
    with pytest.raises(TypeError, match="got multiple values for argument 'causal'"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2, 2, None, None, None, None, True, causal=True)
    with pytest.raises(
        TypeError, match=r"takes at most 21 positional arguments \(q, k, .*, pack_gqa\) but 22"
    ):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, *([None] * 17))


CALL_NEUTRAL = [
    pytest.param(
        {"cu_seqlens_k_new": torch.tensor([0, 1, 2], dtype=torch.int32)}, id="cu_seqlens_k_new-without-k"
    ),
    pytest.param({"attention_chunk": 0}, id="attention_chunk-0"),
    pytest.param({"attention_chunk": None}, id="attention_chunk-None"),
    pytest.param({"rotary_interleaved": False}, id="rotary_interleaved-without-rotary"),
    pytest.param({"only_qv": False}, id="only_qv-False"),
    pytest.param({"num_splits": 0, "pack_gqa": True, "sm_margin": 8}, id="hints"),
    pytest.param({"scheduler_metadata": torch.zeros(4, dtype=torch.int32), "num_splits": 7}, id="scheduler"),
    pytest.param({"ver": 3}, id="ver-3"),
]


@pytest.mark.parametrize("extra", CALL_NEUTRAL)
def test_values_that_mean_nothing_in_fa3_are_neither_refused_nor_recorded(extra: dict[str, Any]) -> None:
    inputs = kvcache_inputs(seed=8)
    plain = flash_attn_with_kvcache(**inputs, causal=True)
    with capture_logs() as logs, capture_fallbacks() as events:
        got = flash_attn_with_kvcache(**inputs, causal=True, **extra)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert (events, logs) == ([], [])


def test_cu_seqlens_k_new_with_new_keys_packs_them() -> None:
    inputs = dict(kvcache_inputs(), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
    k_new = torch.randn(2, 1, 2, 16)
    plain_cache = inputs["k_cache"].clone()
    plain = flash_attn_with_kvcache(**dict(inputs, k_cache=plain_cache), k=k_new, v=k_new)
    packed = flash_attn_with_kvcache(
        **inputs, k=k_new[:, 0], v=k_new[:, 0], cu_seqlens_k_new=torch.tensor([0, 1, 2], dtype=torch.int32)
    )
    torch.testing.assert_close(packed, plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(inputs["k_cache"], plain_cache)
    with pytest.raises(UnsupportedKwargError, match="'only_qv'"):
        flash_attn_with_kvcache(**inputs, only_qv=True)


def test_ver_4_is_fa4_or_a_refusal_and_other_values_are_errors() -> None:
    inputs = kvcache_inputs()
    with pytest.raises(ProviderUnavailableError) as info:
        flash_attn_with_kvcache(**inputs, ver=4)
    message = str(info.value)
    assert message.startswith(
        "flash_attn_with_kvcache(ver=4) asks for provider 'fa4', which cannot be used here: "
    )
    assert (
        "Pass ver=3 to use the chain's providers (hub, sgl_kernel, flash_attn, torch, reference)." in message
    )
    assert list(info.value.reasons) == ["fa4"]
    q, k, v, cu_q, cu_k = varlen_inputs([2], [2])
    for bad in (5, "3", True):
        with pytest.raises(PolicyConfigError) as error:
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, ver=bad)
        assert str(error.value) == (
            f"flash_attn_varlen_func(ver={bad!r}): ver takes 3 (this chain), 4 (provider 'fa4')."
        )
        assert (error.value.name, error.value.value, error.value.allowed) == ("ver", bad, ("3", "4"))


@needs_no_native
def test_attention_chunk_zero_stays_on_fa2_and_a_chunk_is_routed(fake_fa2: Any) -> None:
    lens = [4, 4]
    q, k, v, cu_q, cu_k = varlen_inputs(lens, lens, seed=11)
    with capture_fallbacks() as events:
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4, attention_chunk=0, num_splits=1, pack_gqa=None)
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4, None, None, None, None, True, None, None, None, None,
                               (-1, -1), 2)  # fmt: skip
    assert len(fake_fa2.calls) == 1
    assert [(e.kind, e.subject, e.policy) for e in events if e.kind != "provider"] == [
        ("dispatch", "torch", "route:attention_chunk")
    ]


# -- the FA2 adapter and the hub loader, against stand-in packages ---------------------

FAKE_FA2 = '''
"""A stand-in for FlashAttention-2 2.5 (no softcap yet), computing with the torch reference."""
from kernel_fallback.integrations.flash_attn import _reference as ref

calls = []


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    calls.append(("varlen", max_seqlen_q, max_seqlen_k, causal, window_size, return_attn_probs))
    out, lse = ref.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                                          causal=causal, window_size=window_size, return_softmax_lse=True)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    calls.append(("kvcache", causal, softcap, num_splits, return_softmax_lse))
    return ref.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                       softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                       softcap=softcap, return_softmax_lse=return_softmax_lse)
'''


@pytest.fixture
def fake_fa2(tmp_path: Path) -> Iterator[Any]:
    """A ``flash_attn`` package on sys.path for this test only."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(FAKE_FA2)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        module = importlib.import_module("flash_attn")
        yield module
        sys.modules.pop("flash_attn", None)


@needs_no_native
def test_fa2_adapter_maps_names_and_routes_what_fa2_lacks(fake_fa2: Any) -> None:
    lens = [3, 5]
    q, k, v, cu_q, cu_k = varlen_inputs(lens, lens, seed=7)
    assert flash_attn_varlen_func.chain.active == "flash_attn"
    result = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, return_softmax_lse=True)
    assert isinstance(result, tuple)
    assert len(result) == 2  # FA2's (out, lse, S_dmask) trimmed to FA3's (out, lse)
    assert fake_fa2.calls == [("varlen", 5, 5, True, (-1, -1), True)]  # max_seqlen computed, name mapped
    ref_out, ref_lse = varlen_reference(q, k, v, lens, lens, scale=16**-0.5, causal=True)
    _assert_close(result[0], ref_out, "out")
    _assert_close(result[1], ref_lse, "lse")

    sinks = _randn(torch.Generator().manual_seed(1), 8)
    with capture_fallbacks() as events:
        routed = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, sinks=sinks, softcap=3.0)
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, sinks=sinks, softcap=3.0)
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, window_size=(2, 0))  # FA2 takes windows
    assert len(fake_fa2.calls) == 2
    dispatch = [(e.subject, e.policy) for e in events if e.kind == "dispatch"]
    assert dispatch == [("torch", "route:softcap+sinks")] * 2
    ref_routed, _ = varlen_reference(
        q, k, v, lens, lens, scale=16**-0.5, causal=True, softcap=3.0, sinks=sinks
    )
    _assert_close(routed, ref_routed, "routed out")
    with pytest.raises(UnsupportedKwargError, match="'page_table'"):  # neither FA2 nor torch: refused
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, page_table=torch.zeros(2, 1, dtype=torch.int32))
    lacks = {row["name"]: row["lacks"] for row in flash_attn_varlen_func.describe()["providers"]}
    assert {"softcap", "sinks", "page_table", "seqused_q", "qv", "q_descale"} <= set(lacks["flash_attn"])
    assert "window_size" not in lacks["flash_attn"]


@needs_no_native
def test_fa2_kvcache_adapter_passes_shared_keywords_and_routes_paging(fake_fa2: Any) -> None:
    gen = torch.Generator().manual_seed(2)
    q, k_cache, v_cache = _randn(gen, 2, 1, 4, 8), _randn(gen, 2, 6, 2, 8), _randn(gen, 2, 6, 2, 8)
    seqlens = torch.tensor([3, 6], dtype=torch.int32)
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=seqlens,
        causal=True,
        softcap=2.0,
        num_splits=4,
        return_softmax_lse=True,
    )
    assert flash_attn_with_kvcache.chain.active == "flash_attn"
    assert fake_fa2.calls == [("kvcache", True, 2.0, 4, True)]
    for b, n in enumerate([3, 6]):
        ref_out, ref_lse = _ref_sequence(
            q[b], k_cache[b, :n], v_cache[b, :n], scale=8**-0.5, causal=True, softcap=2.0
        )
        _assert_close(out[b], ref_out, "out")
        _assert_close(lse[b], ref_lse, "lse")
    with capture_fallbacks() as events:
        flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=seqlens, page_table=torch.tensor([[0], [1]], dtype=torch.int32)
        )
    assert [(e.kind, e.subject) for e in events] == [("dispatch", "torch")]
    assert len(fake_fa2.calls) == 1


def test_hub_loader_asks_the_kernels_hub_for_sglangs_build(tmp_path: Path) -> None:
    (tmp_path / "kernels.py").write_text(
        "import types\n"
        "asked = []\n"
        "def get_kernel(repo_id, revision=None):\n"
        "    asked.append((repo_id, revision))\n"
        "    if revision == 'missing':\n"
        "        raise ValueError('no such revision')\n"
        "    return types.SimpleNamespace(flash_attn_varlen_func=len)\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        try:
            kernels = importlib.import_module("kernels")
            assert fa._hub_loader("flash_attn_varlen_func")() is len
            assert kernels.asked == [("kernels-community/sgl-flash-attn3", "v1")]
            with pytest.raises(ImportError, match="has no 'flash_attn_with_kvcache'"):
                fa._hub_loader("flash_attn_with_kvcache")()
            patch.setattr(fa, "HUB_REVISION", "missing")
            with pytest.raises(ImportError, match=r"kernels hub cannot provide .*no such revision"):
                fa._hub_loader("flash_attn_varlen_func")()
        finally:
            sys.modules.pop("kernels", None)


# -- the environment, set before import, in fresh processes ----------------------------

PROBE = """
import json
from kernel_fallback.testing import capture_fallbacks
try:
    with capture_fallbacks() as events:
        from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func as chain
        active = chain.chain.active
    print(json.dumps({"active": active, "events": [dict(e.fields) for e in events]}, default=str))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""

SCENARIOS: dict[str, dict[str, str]] = {
    "default": {},
    "flag-false": {"SGLANG_USE_SGL_FA3_KERNEL": "false"},
    "flag-invalid": {"SGLANG_USE_SGL_FA3_KERNEL": "ture"},
    "provider-typo": {"KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC": "torhc"},
    "provider-unavailable": {"KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC": "sgl_kernel"},
}
# Explicit `torch` and strict mode are covered in-process (reload_config); each fresh
# interpreter costs a torch import.


@pytest.fixture(scope="module")
def fresh_processes() -> dict[str, Any]:
    """Run every scenario (and the example) at once, each in a new interpreter."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KERNEL_FALLBACK_", "SGLANG_"))}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", PROBE], env={**base, **extra}, cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for name, extra in SCENARIOS.items()
    }
    procs["example"] = subprocess.Popen(
        [sys.executable, "examples/flash_attn_chain.py"],
        env=base,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    results: dict[str, Any] = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, stdout)
        results[name] = stdout if name == "example" else json.loads(stdout.strip().splitlines()[-1])
    return results


@needs_no_native
@pytest.mark.parametrize(
    ("scenario", "wanted", "skipped"),
    [
        ("default", "sgl_kernel", ["sgl_kernel", "flash_attn"]),
        ("flag-false", "hub", ["hub", "sgl_kernel", "flash_attn"]),
    ],
    ids=["default", "flag-false"],
)
def test_fresh_process_falls_back_with_one_event(
    fresh_processes: dict[str, Any], scenario: str, wanted: str, skipped: list[str]
) -> None:
    result = fresh_processes[scenario]
    assert result["active"] == "torch"
    (event,) = result["events"]
    assert (event["event"], event["wanted"], event["chosen"]) == (
        "kernel_fallback.provider_fallback",
        wanted,
        "torch",
    )
    assert list(event["skipped"]) == skipped
    assert event["skipped"]["flash_attn"] == "ModuleNotFoundError: No module named 'flash_attn'"


@needs_no_native
@pytest.mark.parametrize(
    ("scenario", "error", "phrases"),
    [
        (
            "flag-invalid",
            "PolicyConfigError",
            [
                "SGLANG_USE_SGL_FA3_KERNEL='ture' is not a boolean",
                "true, false, 1, 0, yes, no",
                "Did you mean 'true'?",
            ],
        ),
        (
            "provider-typo",
            "PolicyConfigError",
            [
                "'torhc' is not a provider of this chain",
                "hub, sgl_kernel, flash_attn, torch, reference, fa4, auto",
                "'torch'?",
            ],
        ),
        (
            "provider-unavailable",
            "ProviderUnavailableError",
            [
                "provider 'sgl_kernel' was requested by KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC='sgl_kernel'"
            ],
        ),
    ],
    ids=["flag-invalid", "provider-typo", "provider-unavailable"],
)
def test_fresh_process_refuses_bad_or_impossible_settings(
    fresh_processes: dict[str, Any], scenario: str, error: str, phrases: list[str]
) -> None:
    result = fresh_processes[scenario]
    assert result["error"] == error
    for phrase in phrases:
        assert phrase in result["message"]


@needs_no_native
def test_example_shows_the_choice_the_event_and_the_refusals(fresh_processes: dict[str, Any]) -> None:
    out = fresh_processes["example"]
    for expected in [
        "flash_attn_varlen_func: active torch (automatic: SGLANG_USE_SGL_FA3_KERNEL unset (default true))",
        "  2  flash_attn  unavailable   ModuleNotFoundError: No module named 'flash_attn'",
        "event kernel_fallback.provider_fallback: {'kernel': 'flash_attn_varlen_func', 'wanted': 'sgl_kernel'",
        "returned the caller's buffer: True; same values: True",
        "UnsupportedKwargError: flash_attn_varlen_func.torch does not accept the keyword 'score_mod'",
        "ProviderUnavailableError: flash_attn_varlen_func: provider 'sgl_kernel' was requested",
        "flash_attn_varlen_func: active torch (automatic: SGLANG_USE_SGL_FA3_KERNEL='false')",
        "  1  hub         unavailable",
    ]:
        assert expected in out
