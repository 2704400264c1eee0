"""The decode path's call memo (``_decode.decode_key``): what a remembered call is keyed by.

A plain decode call the Triton kernel served is remembered by a key of everything the
provider's checks and routing read; a later call with the same key skips them. The key
must therefore change whenever any of those inputs change, and stay the same when only
values change (the provider never reads values on the host). The memo itself runs on
CUDA only (tests/test_gpu.py); the key is computed the same way for CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernel_fallback.integrations.flash_attn import _decode

B, HQ, HKV, D, PAGE, PAGES = 2, 8, 2, 64, 16, 4


def decode_call(dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The arguments of ``decode_key`` for a paged bf16 GQA decode, fresh random tensors."""
    pool = B * PAGES
    return {
        "q": torch.randn(B, 1, HQ, D).to(dtype),
        "k_cache": torch.randn(pool, PAGE, HKV, D).to(dtype),
        "v_cache": torch.randn(pool, PAGE, HKV, D).to(dtype),
        "cache_seqlens": torch.randint(1, PAGE * PAGES, (B,), dtype=torch.int32),
        "page_table": torch.randperm(pool, dtype=torch.int32).view(B, PAGES),
        "softmax_scale": None,
        "causal": True,
        "window_size": (-1, -1),
        "attention_chunk": 0,
        "softcap": 0.0,
        "sinks": None,
        "want_lse": False,
        "qv": None,
        "descales": (None, None, None),
    }


def _strided_q(c: dict[str, Any]) -> None:
    c["q"] = torch.randn(B, 1, 2 * HQ, D).to(c["q"].dtype)[:, :, :HQ]  # same shape, other strides


def _misaligned_q(c: dict[str, Any]) -> None:
    flat = torch.randn(B * HQ * D + 1).to(c["q"].dtype)
    c["q"] = flat[1:].view(B, 1, HQ, D)  # 2 bytes past a 16-byte boundary


def _joint_caches(c: dict[str, Any]) -> None:
    joint = torch.randn(B * PAGES, PAGE, HKV, 2 * D).to(c["k_cache"].dtype)
    c["k_cache"], c["v_cache"] = joint[..., :D], joint[..., D:]  # MLA-style views of one buffer


def _descale(index: int) -> Callable[[dict[str, Any]], None]:
    def set_one(c: dict[str, Any]) -> None:
        scales = list(c["descales"])
        scales[index] = torch.tensor(0.5).expand(B, HKV)
        c["descales"] = tuple(scales)

    return set_one


def _set(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def set_value(c: dict[str, Any]) -> None:
        c[name] = value(c) if callable(value) else value

    return set_value


#: Each changes one thing the provider's checks or the kernel's plan read.
CHANGES = [
    pytest.param(_set("q", lambda c: c["q"].half()), id="q-dtype"),
    pytest.param(_set("q", lambda c: torch.randn(B, 2, HQ, D).bfloat16()), id="q-length"),
    pytest.param(_set("q", lambda c: torch.randn(B, 1, 2 * HQ, D).bfloat16()), id="q-heads"),
    pytest.param(_strided_q, id="q-strides"),
    pytest.param(_misaligned_q, id="q-alignment"),
    pytest.param(_set("q", lambda c: c["q"].to("meta")), id="q-device"),
    pytest.param(_set("k_cache", lambda c: torch.randn(B * PAGES, PAGE, HKV, D).half()), id="k-dtype"),
    pytest.param(_set("v_cache", lambda c: torch.randn(B * PAGES, PAGE, HKV, 2 * D).bfloat16()), id="v-dim"),
    pytest.param(_joint_caches, id="cache-strides"),
    pytest.param(_set("cache_seqlens", lambda c: c["cache_seqlens"].long()), id="lens-int64"),
    pytest.param(_set("cache_seqlens", 7), id="lens-int"),
    pytest.param(_set("cache_seqlens", None), id="lens-none"),
    pytest.param(_set("page_table", None), id="no-page-table"),
    pytest.param(_set("page_table", lambda c: c["page_table"][:, :2]), id="page-table-shape"),
    pytest.param(_set("softmax_scale", 0.1), id="scale"),
    pytest.param(_set("causal", False), id="not-causal"),
    pytest.param(_set("window_size", (8, 0)), id="window"),
    pytest.param(_set("attention_chunk", 64), id="chunk"),
    pytest.param(_set("attention_chunk", None), id="chunk-none"),
    pytest.param(_set("softcap", 30.0), id="softcap"),
    pytest.param(_set("sinks", lambda c: torch.zeros(HQ)), id="sinks"),
    pytest.param(_set("sinks", lambda c: torch.zeros(HQ, dtype=torch.bfloat16)), id="sinks-dtype"),
    pytest.param(_set("want_lse", True), id="lse"),
    pytest.param(_set("qv", lambda c: torch.randn(B, 1, HQ, D).bfloat16()), id="qv"),
    pytest.param(_descale(0), id="q-descale"),
    pytest.param(_descale(1), id="k-descale"),
    pytest.param(_descale(2), id="v-descale"),
]


def test_values_do_not_change_the_key() -> None:
    first, second = decode_call(), decode_call()
    assert not torch.equal(first["q"], second["q"])
    key = _decode.decode_key(**first)
    assert key is not None
    assert _decode.decode_key(**second) == key
    assert hash(_decode.decode_key(**second)) == hash(key)


@pytest.mark.parametrize("change", CHANGES)
def test_every_input_the_checks_read_changes_the_key(change: Callable[[dict[str, Any]], None]) -> None:
    changed = decode_call()
    change(changed)
    key = _decode.decode_key(**changed)
    assert key is not None
    assert key != _decode.decode_key(**decode_call())


def test_the_changes_give_distinct_keys() -> None:
    keys = set()
    for param in CHANGES:
        call = decode_call()
        change: Callable[[dict[str, Any]], None] = param.values[0]  # type: ignore[assignment]
        change(call)
        keys.add(_decode.decode_key(**call))
    assert len(keys) == len(CHANGES)


@pytest.mark.parametrize("value", ["0", "1", "off"], ids=["off-0", "on-1", "off-word"])
def test_the_triton_variable_is_part_of_the_key(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    unset = _decode.decode_key(**decode_call())
    monkeypatch.setenv(_decode.TRITON_DECODE_ENV, value)
    assert _decode.decode_key(**decode_call()) != unset


NEVER = [
    pytest.param(_set("window_size", [-1, -1]), id="window-list"),
    pytest.param(_set("window_size", (torch.tensor(4), 0)), id="window-tensor"),
    pytest.param(_set("window_size", (1, 2, 3)), id="window-three"),
    pytest.param(_set("softmax_scale", torch.tensor(0.1)), id="scale-tensor"),
    pytest.param(_set("causal", 1), id="causal-int"),
    pytest.param(_set("cache_seqlens", 7.0), id="lens-float"),
    pytest.param(_set("sinks", [0.0] * HQ), id="sinks-list"),
    pytest.param(
        _set("q", lambda c: c["q"].transpose(-1, -2).contiguous().transpose(-1, -2)), id="q-no-unit-stride"
    ),
    pytest.param(
        _set(
            "qv",
            lambda c: torch.randn(B, 1, HQ, D).bfloat16().transpose(-1, -2).contiguous().transpose(-1, -2),
        ),
        id="qv-no-unit-stride",
    ),
]


@pytest.mark.parametrize("change", NEVER)
def test_calls_the_key_does_not_cover_are_not_remembered(change: Callable[[dict[str, Any]], None]) -> None:
    call = decode_call()
    change(call)
    assert _decode.decode_key(**call) is None


@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache", "sinks", "qv"])
def test_calls_autograd_records_are_not_remembered(name: str) -> None:
    call = decode_call()
    call.setdefault("sinks", None)
    if call[name] is None:
        call[name] = torch.zeros(HQ) if name == "sinks" else torch.randn(B, 1, HQ, D).bfloat16()
    call[name].requires_grad_(True)
    assert _decode.decode_key(**call) is None
    with torch.no_grad():
        assert _decode.decode_key(**call) is not None  # nothing is recorded: the kernel serves it
