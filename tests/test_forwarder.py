"""Generated forwarders and clones: the kernel's own signature, exact counts, every event seen."""

from __future__ import annotations

import inspect
import sys
import threading
import traceback
import types
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from kernel_fallback import UnsupportedKwargError, _events, reload_config, reset_stats, stats, tolerant_kwargs
from kernel_fallback._events import Counter
from kernel_fallback._forwarder import UNSET
from kernel_fallback.testing import capture_fallbacks


def echo_posonly(a: Any, b: Any = 2, /, c: Any = 3) -> dict[str, Any]:
    return {"a": a, "b": b, "c": c}


def echo_varargs(a: Any, *rest: Any, k: Any, m: Any = 5) -> dict[str, Any]:
    return {"a": a, "rest": rest, "k": k, "m": m}


def _echo_inner(a: Any, b: Any = None, z: Any = None, w: Any = None) -> None:
    """What ``echo_varkw`` forwards its keywords to: it has no ``out``."""


def echo_varkw(a: Any, b: Any = None, **extra: Any) -> dict[str, Any]:
    return {"a": a, "b": b, "extra": extra}


echo_varkw.__wrapped__ = _echo_inner  # type: ignore[attr-defined]  # as functools.wraps would set


def echo_kwonly(*, x: Any, y: Any = "y") -> dict[str, Any]:
    return {"x": x, "y": y}


def hot(counter: Counter) -> bool:
    """Whether repeats only tick the counter (a call, so that mypy does not narrow it)."""
    return counter.hot


def fa3_like(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    return_softmax_lse: bool = False,
) -> torch.Tensor:
    """A no-op with FA3's parameter shape, lacking ``out``."""
    return q * 2


CALLS = [
    (echo_posonly, (1,), {}),
    (echo_posonly, (1, 7), {"c": 9}),
    (echo_posonly, (1, 7, 8), {}),
    (echo_varargs, (1, 2, 3), {"k": 4}),
    (echo_varargs, (1,), {"k": 4, "m": 6}),
    (echo_varkw, (1,), {"b": 2, "z": 3}),
    (echo_varkw, (), {"a": 1, "w": 0}),
    (echo_kwonly, (), {"x": 1}),
]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    CALLS,
    ids=[
        "posonly-default",
        "posonly-all",
        "posonly-positional",
        "varargs",
        "kwonly-default",
        "varkw",
        "varkw-a-by-name",
        "kwonly",
    ],
)
@pytest.mark.parametrize("passes_out", [False, True], ids=["no-out", "out"])
def test_forwarder_binds_every_parameter_kind_as_the_kernel_does(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], passes_out: bool
) -> None:
    wrapped: Any = tolerant_kwargs(["out"], "warn")(fn)
    assert isinstance(wrapped, types.FunctionType)
    assert wrapped.__code__ is not fn.__code__
    assert inspect.signature(wrapped) == inspect.signature(fn)
    extra = {"out": torch.zeros(1)} if passes_out else {}
    with capture_logs():
        assert wrapped(*args, **kwargs, **extra) == fn(*args, **kwargs)
    assert [r["count"] for r in stats()] == ([1] if passes_out else [])


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"), CALLS[:3], ids=["posonly-default", "posonly-all", "posonly-positional"]
)
def test_binding_errors_are_the_kernels_own(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    wrapped = tolerant_kwargs(["out"])(fn)
    for bad_args, bad_kwargs in [((), {}), ((1,), {"a": 1}), ((1, 2, 3, 4), {}), ((1,), {"nope": 1})]:
        with pytest.raises(TypeError) as direct:
            fn(*bad_args, **bad_kwargs)
        with pytest.raises(TypeError) as decorated:
            wrapped(*bad_args, **bad_kwargs)
        assert str(decorated.value) == str(direct.value)


def test_nothing_missing_gives_a_clone_that_binds_as_a_method() -> None:
    def forward(self: Any, x: torch.Tensor, *, out: torch.Tensor | None = None, scale: float = 2.0) -> Any:
        return (self, x * scale if out is None else out.copy_(x * scale))

    wrapped: Any = tolerant_kwargs(["out"])(forward)
    assert wrapped.tolerant.missing == ()
    assert type(wrapped) is types.FunctionType
    assert wrapped is not forward
    assert wrapped.__code__ is forward.__code__
    assert wrapped.__kwdefaults__ == forward.__kwdefaults__
    assert wrapped.__kwdefaults__ is not forward.__kwdefaults__
    assert inspect.signature(wrapped) == inspect.signature(forward)

    class Backend:
        run = wrapped

    backend, buf = Backend(), torch.zeros(2)
    owner, result = backend.run(torch.ones(2), out=buf)
    assert owner is backend
    assert result is buf
    torch.testing.assert_close(buf, torch.full((2,), 2.0))


def test_repeats_of_a_logged_key_only_tick_its_counter() -> None:
    wrapped = tolerant_kwargs(["out"], name="ticks")(fa3_like)
    counter = wrapped.tolerant._counters["out"]
    q, buf = torch.ones(2), torch.zeros(2)
    assert not hot(counter)
    with capture_logs() as logs:
        for _ in range(50):
            torch.testing.assert_close(wrapped(q, q, q, q, q, causal=True, out=buf), q * 2)
    assert hot(counter), "the first occurrence went through record() and turned the counter hot"
    assert len(logs) == 1
    assert logs[0]["where"].startswith(__file__)
    assert [r["count"] for r in stats()] == [50]
    assert torch.equal(buf, torch.zeros(2))


def test_a_listener_turns_the_fast_path_off_and_sees_every_occurrence() -> None:
    wrapped = tolerant_kwargs(["out"], name="heard")(fa3_like)
    counter = wrapped.tolerant._counters["out"]
    q, buf = torch.ones(2), torch.zeros(2)
    with capture_logs():
        for _ in range(3):
            wrapped(q, q, q, q, q, out=buf)
        assert hot(counter)
        with capture_fallbacks() as events:
            assert not hot(counter), "adding a listener sends every call through record()"
            for _ in range(4):
                wrapped(q, q, q, q, q, out=buf)
        assert [e.count for e in events] == [4, 5, 6, 7]
        wrapped(q, q, q, q, q, out=buf)
        assert hot(counter), "with the listener gone the next call re-arms the fast path"
        wrapped(q, q, q, q, q, out=buf)
    assert [r["count"] for r in stats()] == [9]


def test_reset_rearms_logging_and_a_tick_in_flight_counts_after_it() -> None:
    wrapped = tolerant_kwargs(["out"], name="inflight")(fa3_like)
    counter = wrapped.tolerant._counters["out"]
    q = torch.ones(2)
    with capture_logs() as logs:
        for _ in range(3):
            wrapped(q, q, q, q, q, out=q)
        reset_stats()
        assert not hot(counter)
        # A call that found the counter hot just before the reset ticks just after it.
        counter.tick()
        assert [r["count"] for r in stats()] == [1]
        wrapped(q, q, q, q, q, out=q)
    assert [r["count"] for r in stats()] == [2]
    assert len(logs) == 2, "the first call after the reset is logged again"


def test_counts_are_exact_under_threads_across_reloads() -> None:
    wrapped = tolerant_kwargs(["out"], name="threaded_fwd")(fa3_like)
    q, buf = torch.ones(2), torch.zeros(2)
    per_thread, threads = 2000, 8
    barrier = threading.Barrier(threads + 1)
    done = threading.Event()

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            wrapped(q, q, q, q, q, causal=True, out=buf)

    def reload_until_done() -> None:
        barrier.wait()
        while not done.is_set():
            reload_config()

    sys.setswitchinterval(1e-6)
    try:
        with capture_logs() as logs:
            pool = [threading.Thread(target=work) for _ in range(threads)]
            reloader = threading.Thread(target=reload_until_done)
            for t in [*pool, reloader]:
                t.start()
            for t in pool:
                t.join()
            done.set()
            reloader.join()
    finally:
        sys.setswitchinterval(0.005)
    assert [r["count"] for r in stats()] == [per_thread * threads]
    assert len(logs) == 1


def test_a_reload_that_changes_the_policy_swaps_the_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = tolerant_kwargs(["out"], name="swap")(fa3_like)
    q, buf = torch.ones(2), torch.zeros(2)
    with capture_logs():
        for _ in range(2):
            wrapped(q, q, q, q, q, out=buf)
        assert torch.equal(buf, torch.zeros(2))
        monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__SWAP", "copy")
        reload_config()
        for _ in range(3):
            assert wrapped(q, q, q, q, q, out=buf) is buf
    torch.testing.assert_close(buf, q * 2)
    assert {r["policy"]: r["count"] for r in stats()} == {"warn": 2, "copy": 3}
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__SWAP", "raise")
    reload_config()
    with pytest.raises(UnsupportedKwargError, match="swap does not accept the keyword 'out'"):
        wrapped(q, q, q, q, q, out=buf)


@pytest.mark.parametrize(
    ("value", "counted"),
    [(False, 0), (0, 0), (True, 3), (torch.tensor(False), 3)],
    ids=["neutral", "neutral-by-equality", "true", "tensor"],
)
def test_non_none_neutral_values(value: object, counted: int) -> None:
    wrapped = tolerant_kwargs({"only_qv": False}, name="qv")(fa3_like)
    q = torch.ones(2)
    with capture_logs():
        for _ in range(3):
            torch.testing.assert_close(wrapped(q, q, q, q, q, only_qv=value), q * 2)
    assert [r["count"] for r in stats()] == ([counted] if counted else [])


def test_two_missing_keywords_in_one_call_count_once_each() -> None:
    wrapped = tolerant_kwargs({"out": None, "sinks": None, "only_qv": False}, name="two")(fa3_like)
    q = torch.ones(2)
    with capture_logs():
        for _ in range(3):
            wrapped(q, q, q, q, q, out=q, sinks=q)
            wrapped(q, q, q, q, q, sinks=q, only_qv=False)
            wrapped(q, q, q, q, q, out=q, sinks=None)
    assert {r["kwarg"]: r["count"] for r in stats()} == {"out": 6, "sinks": 6}


def test_copy_fast_path_still_checks_every_buffer() -> None:
    calls = []

    def kernel(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    wrapped = tolerant_kwargs(["out"], "copy", name="checked")(kernel)
    x = torch.ones(3)
    with capture_logs():
        for _ in range(3):
            assert wrapped(x, out=torch.zeros(3)) is not None
        assert wrapped.tolerant._counters["out"].hot
        wrong = torch.full((4,), 7.0)
        with pytest.raises(
            ValueError, match=r"checked: cannot copy the result into out=: the result is \(3,\)"
        ):
            wrapped(x, out=wrong)
        assert torch.equal(wrong, torch.full((4,), 7.0))
        ran = len(calls)
        with pytest.raises(
            UnsupportedKwargError, match=r"checked does not accept the keyword 'out'.*expanded"
        ):
            wrapped(x, out=torch.zeros(1).expand(3))
        assert len(calls) == ran, "a buffer torch refuses is reported before the kernel runs"
    assert [r["count"] for r in stats()] == [3]


def test_a_tensor_subclass_value_takes_the_general_path_and_is_counted() -> None:
    wrapped = tolerant_kwargs(["out"], "copy", name="param")(lambda x: x * 2)
    buf = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with capture_logs():
        for _ in range(3):
            wrapped(torch.ones(2), out=buf)
    torch.testing.assert_close(buf.detach(), torch.full((2,), 2.0))
    assert [r["count"] for r in stats()] == [3]


def test_parameters_the_forwarder_cannot_spell_keep_the_generic_wrapper() -> None:
    def kernel(_kf_fn: int, x: int = 1) -> int:
        return _kf_fn + x

    wrapped: Any = tolerant_kwargs(["out"], name="generic")(kernel)
    assert wrapped.__code__.co_varnames == ("args", "kwargs")
    with capture_logs():
        assert wrapped(1, x=2, out=torch.zeros(1)) == 3
    assert [r["count"] for r in stats()] == [1]


def test_tracebacks_show_the_forwarder_and_where_skips_it() -> None:
    def kernel(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("inside the kernel")

    wrapped = tolerant_kwargs(["out"], name="tb")(kernel)
    with pytest.raises(ValueError, match="inside the kernel") as info:
        wrapped(torch.ones(1))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any("forwarder of" in f.filename and f.line and "_kf_fn(" in f.line for f in frames)
    assert repr(UNSET) == "<not passed>"


@pytest.mark.parametrize(
    ("kernel", "args", "unknown_error"),
    [
        (torch.nn.functional.scaled_dot_product_attention, (4,), TypeError),
        (torch.ops.aten.mm.default, (2,), RuntimeError),
    ],
    ids=["torch-builtin", "torch-op"],
)
def test_builtins_and_ops_get_a_forwarder_around_their_arguments(
    kernel: Any, args: tuple[int], unknown_error: type[Exception]
) -> None:
    wrapped: Any = tolerant_kwargs(["out"], "copy", name="native")(kernel)
    assert wrapped.__code__.co_varnames[:3] == ("out", "_kf_args", "_kf_kwargs")
    x = torch.randn(1, 2, *args, 4) if args == (4,) else torch.randn(2, 2)
    inputs = (x, x, x) if args == (4,) else (x, x)
    expected = kernel(*inputs)
    with capture_logs():
        for _ in range(4):
            buf = torch.empty_like(expected)
            assert wrapped(*inputs, out=buf) is buf
            torch.testing.assert_close(buf, expected)
        assert hot(wrapped.tolerant._counters["out"])
    torch.testing.assert_close(wrapped(*inputs), expected)
    with pytest.raises(unknown_error) as direct:
        kernel(*inputs, bogus=1)
    with pytest.raises(unknown_error) as decorated:
        wrapped(*inputs, bogus=1)
    assert str(decorated.value) == str(direct.value)
    assert [r["count"] for r in stats()] == [4]


def test_a_listed_keyword_named_like_the_forwarders_own_names_keeps_the_generic_wrapper() -> None:
    wrapped: Any = tolerant_kwargs(["_kf_fn"], name="shadow")(lambda x: x + 1)
    assert wrapped.__code__.co_varnames == ("args", "kwargs")
    with capture_logs():
        assert wrapped(1, _kf_fn=2) == 2
    assert [r["kwarg"] for r in stats()] == ["_kf_fn"]


def test_resets_racing_threads_never_break_counting_and_rearm_logging() -> None:
    wrapped = tolerant_kwargs(["out"], name="reset_race")(fa3_like)
    q, buf = torch.ones(2), torch.zeros(2)
    per_thread, threads = 1000, 8
    start, phase_two = threading.Barrier(threads + 1), threading.Barrier(threads + 1)
    after_reset = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):  # resets race these calls
            wrapped(q, q, q, q, q, out=buf)
        phase_two.wait()
        after_reset.wait()
        for _ in range(per_thread):  # and none race these
            wrapped(q, q, q, q, q, out=buf)

    sys.setswitchinterval(1e-6)
    try:
        with capture_logs() as logs:
            pool = [threading.Thread(target=work) for _ in range(threads)]
            for t in pool:
                t.start()
            start.wait()
            for _ in range(20):
                reset_stats()
                assert sum(r["count"] for r in stats()) <= per_thread * threads
            phase_two.wait()
            reset_stats()
            after_reset.wait()
            for t in pool:
                t.join()
    finally:
        sys.setswitchinterval(0.005)
    assert [r["count"] for r in stats()] == [per_thread * threads]
    epochs = [e.get("epoch") for e in logs if e["event"] == "kernel_fallback.kwarg_dropped"]
    assert epochs.count(_events._epoch) == 1, "the first call after the last reset is logged, once"
