"""kernel_fallback.testing without pytest's help: no_fallbacks, expect_fallback, capture_fallbacks."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernel_fallback import _events, tolerant_kwargs
from kernel_fallback.testing import (
    FallbackAssertionError,
    capture_fallbacks,
    expect_fallback,
    no_fallbacks,
)


@tolerant_kwargs(drop=["out"], on_drop="copy", name="tt_add")
def tt_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.add(x, y)


@tolerant_kwargs(drop={"num_splits": 1}, name="tt_attn")
def tt_attn(q: torch.Tensor) -> torch.Tensor:
    return q * 2


def drop_out() -> None:
    tt_add(torch.ones(2), torch.ones(2), out=torch.empty(2))


def drop_splits() -> None:
    tt_attn(torch.ones(2), num_splits=3)


def drop_out_three_times() -> None:
    for _ in range(3):
        tt_add(torch.ones(2), torch.ones(2), out=torch.empty(2))


def guarded(*steps: Callable[[], object], **kwargs: Any) -> None:
    """Run ``steps`` inside ``no_fallbacks(**kwargs)``."""
    with no_fallbacks(**kwargs):
        for step in steps:
            step()


def test_no_fallbacks_passes_a_clean_block() -> None:
    with no_fallbacks() as guard:
        tt_add(torch.ones(2), torch.ones(2))
        tt_add(torch.ones(2), torch.ones(2), out=None)  # the neutral value is no fallback
    assert guard.events == []


def test_no_fallbacks_fails_listing_each_fallback_with_count_and_caller() -> None:
    with pytest.raises(FallbackAssertionError) as info:
        guarded(drop_out_three_times, drop_splits)
    line = drop_out_three_times.__code__.co_firstlineno + 2
    message = str(info.value)
    assert message.startswith("2 fallback(s) not allowed:\n")
    assert f"tt_add: keyword 'out' dropped (policy copy) x3, first at {__file__}:{line}" in message
    assert "tt_attn: keyword 'num_splits' dropped (policy warn) x1" in message
    assert "no_fallbacks(allow=['tt_add:out', 'tt_attn:num_splits'])" in message
    assert isinstance(info.value, AssertionError)


@pytest.mark.parametrize(
    "allow",
    [["tt_add:out", "tt_attn:num_splits"], "tt_add:out, tt_attn:*", ["tt_*:*"], ["*:out,*:num_splits"]],
    ids=["list", "comma-string", "glob", "kernel-glob"],
)
def test_no_fallbacks_allow_patterns(allow: str | list[str]) -> None:
    with no_fallbacks(allow=allow) as guard:
        drop_out()
        drop_splits()
    assert [e.kernel for e in guard.events] == ["tt_add", "tt_attn"]


def test_no_fallbacks_reads_the_allow_variable_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_ALLOW", "tt_add:out")
    with no_fallbacks():
        drop_out()
    with pytest.raises(FallbackAssertionError, match="tt_add"):
        guarded(drop_out, env=False)


@pytest.mark.parametrize(
    ("allow", "message"),
    [
        (["tt_add"], r"'tt_add' is not a 'kernel:kwarg' pattern.*'tt_add:out'.*'tt_add:\*'"),
        ([":out"], r"':out' is not a 'kernel:kwarg' pattern"),
        (["tt_add:"], r"'tt_add:' is not a 'kernel:kwarg' pattern"),
        ([3], r"3 is not a 'kernel:kwarg' pattern"),
    ],
    ids=["no-colon", "no-kernel", "no-kwarg", "not-a-string"],
)
def test_bad_allow_patterns_are_rejected(allow: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        no_fallbacks(allow=allow)  # type: ignore[arg-type]


def test_kernel_names_with_colons_split_at_the_last_one() -> None:
    with no_fallbacks(allow=["ns::op:out"]):
        _events.record(("kwarg", "ns::op", "out", "warn"))


def test_no_fallbacks_lets_the_blocks_own_exception_through() -> None:
    def fail() -> None:
        raise KeyError("own")

    with pytest.raises(KeyError, match="own"):
        guarded(drop_out, fail)


def test_no_fallbacks_as_a_decorator_guards_each_call_afresh() -> None:
    calls = iter([True, False])

    @no_fallbacks()
    def step() -> None:
        if next(calls):
            drop_out()

    with pytest.raises(FallbackAssertionError):
        step()
    step()  # the second call starts clean


def test_no_fallbacks_sees_other_threads() -> None:
    def in_a_thread() -> None:
        thread = threading.Thread(target=drop_out)
        thread.start()
        thread.join()

    with pytest.raises(FallbackAssertionError, match="tt_add"):
        guarded(in_a_thread)


def test_expect_fallback_yields_matching_events() -> None:
    with expect_fallback(kernel="tt_add", kwarg="out") as seen:
        drop_out()
        drop_splits()
        drop_out()
    assert [(e.kernel, e.kwarg, e.count) for e in seen] == [("tt_add", "out", 1), ("tt_add", "out", 2)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel": "tt_add"}, "expected a fallback with kernel='tt_add', got 0; no fallback was recorded."),
        ({"kwarg": "out", "count": 2}, "expected exactly 2 x a fallback with kwarg='out', got 0"),
        ({"provider": "torch"}, "expected a fallback with provider='torch', got 0"),
    ],
    ids=["kernel", "count", "provider"],
)
def test_expect_fallback_fails_when_it_does_not_happen(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(FallbackAssertionError, match=re.escape(message)), expect_fallback(**kwargs):  # type: ignore[arg-type]
        pass


def test_expect_fallback_says_what_happened_instead() -> None:
    with pytest.raises(FallbackAssertionError) as info, expect_fallback(kernel="tt_attn", count=1):
        drop_out()
    assert str(info.value) == (
        "expected exactly 1 x a fallback with kernel='tt_attn', got 0; recorded instead: "
        "tt_add: keyword 'out' dropped (policy copy)."
    )


def test_expect_fallback_matches_providers_and_globs() -> None:
    with expect_fallback(kernel="attn*", provider="tor?h", count=1):
        _events.record(("provider", "attn_varlen", "torch", "auto"))
    with pytest.raises(FallbackAssertionError), expect_fallback(kwarg="torch"):
        _events.record(("provider", "attn_varlen", "torch", "auto"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, r"count=0\): use a positive integer"),
        ({"count": True}, r"count=True\)"),
        ({"kwarg": "out", "provider": "torch"}, r"not both"),
    ],
    ids=["zero-count", "bool-count", "kwarg-and-provider"],
)
def test_expect_fallback_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message), expect_fallback(**kwargs):  # type: ignore[arg-type]
        pass


def test_expected_fallbacks_are_allowed_inside_no_fallbacks() -> None:
    with no_fallbacks() as guard:
        with expect_fallback(kernel="tt_add", kwarg="out"):
            drop_out()
        assert guard.unexpected == []

    def expect_one_get_two() -> None:
        with expect_fallback(kernel="tt_add"):
            drop_out()
            drop_splits()

    with pytest.raises(FallbackAssertionError, match="tt_attn"):
        guarded(expect_one_get_two)


def test_capture_fallbacks_sees_every_occurrence() -> None:
    with capture_fallbacks() as events:
        drop_out()
        drop_out()
    assert [e.count for e in events] == [1, 2]
