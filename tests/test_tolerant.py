"""tolerant_kwargs: policies, neutral values, copy semantics, errors, metadata."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import threading
import types
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from child_env import clean_env
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from kernel_fallback import (
    PolicyConfigError,
    UnsupportedKwargError,
    _config,
    kernels,
    reload_config,
    reset_stats,
    stats,
    tolerant_kwargs,
)
from kernel_fallback.testing import capture_fallbacks

GEN = torch.Generator().manual_seed(1234)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


class CountingKernel:
    """A Python kernel entry point without ``out`` that counts how often its body ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return x + alpha * y


@torch.library.custom_op("kf_test_tol::axpy", mutates_args=())
def axpy_op(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return x + alpha * y


@torch.library.custom_op("kf_test_tol::broken", mutates_args=())
def broken_op(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("Unknown keyword argument 'out' for operator (raised by the kernel body)")


# -- pass-through ---------------------------------------------------------------------------------


def test_listed_keyword_the_kernel_accepts_is_passed_through() -> None:
    add = tolerant_kwargs(["out"], "raise")(torch.add)
    x, y, buf = rand(4), rand(4), torch.zeros(4)
    with capture_fallbacks() as events:
        result = add(x, y, out=buf)
    assert result is buf
    torch.testing.assert_close(buf, x + y)
    assert add.tolerant.missing == ()
    assert events == []


@pytest.mark.parametrize(
    ("kernel", "error"),
    [(CountingKernel(), TypeError), (axpy_op, RuntimeError)],
    ids=["python", "custom-op"],
)
def test_unlisted_unknown_keyword_fails_as_the_kernel_fails(kernel: Any, error: type[Exception]) -> None:
    wrapped = tolerant_kwargs(["out"])(kernel)
    with pytest.raises(error, match="bogus"):
        wrapped(rand(3), rand(3), bogus=1)


# -- neutral values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "kwargs"),
    [
        (["out"], {"out": None}),
        ({"only_qv": False}, {"only_qv": False}),
        ({"softcap": 0.0}, {"softcap": 0}),
        ({"window_size": (-1, -1)}, {"window_size": (-1, -1)}),
        ({"window_size": (-1, -1)}, {"window_size": [-1, -1]}),
    ],
    ids=["out-None", "only_qv-False", "softcap-int-zero", "window-tuple", "window-list"],
)
def test_neutral_value_is_dropped_silently(drop: Any, kwargs: dict[str, Any]) -> None:
    kernel = CountingKernel()
    wrapped = tolerant_kwargs(drop, "raise")(kernel)
    x, y = rand(3), rand(3)
    with capture_logs() as logs, capture_fallbacks() as events:
        result = wrapped(x, y, **kwargs)
    torch.testing.assert_close(result, x + y)
    assert (logs, events, stats()) == ([], [], [])


def test_tensor_value_is_never_neutral_even_if_equal() -> None:
    wrapped = tolerant_kwargs({"sinks": 0.0}, "raise")(CountingKernel())
    with pytest.raises(UnsupportedKwargError, match="sinks"):
        wrapped(rand(3), rand(3), sinks=torch.zeros(()))


# -- warn -------------------------------------------------------------------------------------------


def test_warn_drops_returns_the_kernel_result_and_logs_structured_event() -> None:
    kernel = CountingKernel()
    wrapped = tolerant_kwargs(["out"], "warn", name="fa3_varlen")(kernel)
    x, y, buf = rand(3), rand(3), torch.full((3,), 7.0)
    with capture_logs() as logs:
        result = wrapped(x, y, alpha=2.0, out=buf)
    torch.testing.assert_close(result, x + 2 * y)
    assert result is not buf
    torch.testing.assert_close(buf, torch.full((3,), 7.0))  # warn really ignores the buffer
    assert len(logs) == 1
    event = logs[0]
    assert event["event"] == "kernel_fallback.kwarg_dropped"
    assert event["log_level"] == "warning"
    assert (event["kernel"], event["kwarg"], event["policy"], event["source"]) == (
        "fa3_varlen",
        "out",
        "warn",
        "decorator",
    )
    assert event["where"].startswith(__file__)
    assert kernel.calls == 1


def test_warn_logs_once_but_counts_every_call() -> None:
    wrapped = tolerant_kwargs(["out"], "warn", name="hot_loop")(CountingKernel())
    buf = torch.empty(3)
    with capture_logs() as logs:
        for _ in range(1000):
            wrapped(rand(3), rand(3), out=buf)
    assert len(logs) == 1
    (row,) = stats()
    assert (row["kernel"], row["kwarg"], row["policy"], row["count"]) == ("hot_loop", "out", "warn", 1000)
    reset_stats()
    assert stats() == []
    with capture_logs() as logs:
        wrapped(rand(3), rand(3), out=buf)
    assert len(logs) == 1, "reset_stats re-arms first-occurrence logging"


# -- copy -------------------------------------------------------------------------------------------


def test_copy_fills_the_callers_buffer_and_returns_it() -> None:
    wrapped = tolerant_kwargs(["out"], "copy")(torch.ops.aten.mm.default)
    a, b, buf = rand(3, 4), rand(4, 5), torch.empty(3, 5)
    with capture_logs() as logs:
        result = wrapped(a, b, out=buf)
    assert result is buf
    torch.testing.assert_close(buf, a @ b)
    assert logs[0]["policy"] == "copy"
    assert logs[0]["reason"] == "mm.default does not accept 'out' (schema:aten::mm.default)"


Pair = namedtuple("Pair", ["out", "lse"])


@pytest.mark.parametrize(
    "container",
    [tuple, list, lambda items: Pair(*items)],
    ids=["tuple", "list", "namedtuple"],
)
def test_copy_replaces_the_first_element_of_a_sequence_result(container: Any) -> None:
    def attn(q: torch.Tensor, return_softmax_lse: bool = True) -> Any:
        return container([q * 2, q.sum(-1)])

    wrapped = tolerant_kwargs(["out"], "copy")(attn)
    q, buf = rand(2, 3), torch.empty(2, 3)
    result = wrapped(q, out=buf)
    assert type(result) is type(container([1, 2]))
    assert result[0] is buf
    torch.testing.assert_close(buf, q * 2)
    torch.testing.assert_close(result[1], q.sum(-1))


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (torch.full((3, 4), 5.0), r"\(3, 5\) torch.float32 on cpu, the buffer is \(3, 4\) torch.float32"),
        (torch.full((3, 5), 5.0, dtype=torch.float64), r"the buffer is \(3, 5\) torch.float64"),
    ],
    ids=["shape", "dtype"],
)
def test_copy_mismatch_raises_and_leaves_buffer_untouched(buf: torch.Tensor, message: str) -> None:
    wrapped = tolerant_kwargs(["out"], "copy", name="mm_nout")(torch.ops.aten.mm.default)
    before = buf.clone()
    with (
        capture_logs() as logs,
        pytest.raises(ValueError, match=rf"^mm_nout: cannot copy the result into out=: .*{message}"),
    ):
        wrapped(rand(3, 4), rand(4, 5), out=buf)
    assert torch.equal(buf, before)
    assert (logs, stats()) == ([], []), "a copy that failed is not reported as done"


def test_copy_of_a_non_tensor_value_raises() -> None:
    kernel = CountingKernel()
    wrapped = tolerant_kwargs({"only_qv": False}, "copy", name="fa3")(kernel)
    with pytest.raises(UnsupportedKwargError, match="only_qv=True cannot be dropped: its policy is 'copy'"):
        wrapped(rand(3), rand(3), only_qv=True)
    assert kernel.calls == 0


def test_copy_when_kernel_returns_no_tensor_raises() -> None:
    wrapped = tolerant_kwargs(["out"], "copy", name="stats_kernel")(lambda x: float(x.sum()))
    buf = torch.zeros(())
    with pytest.raises(UnsupportedKwargError, match="returned float, not a tensor"):
        wrapped(rand(3), out=buf)
    assert float(buf) == 0.0


def test_copy_two_buffers_is_refused() -> None:
    wrapped = tolerant_kwargs(["out", "lse_out"], "copy")(CountingKernel())
    with pytest.raises(UnsupportedKwargError, match="one result, one buffer"):
        wrapped(rand(3), rand(3), out=torch.empty(3), lse_out=torch.empty(3))


# -- raise ------------------------------------------------------------------------------------------


def test_raise_names_kernel_keyword_and_variables_and_never_runs_the_kernel() -> None:
    kernel = CountingKernel()
    wrapped = tolerant_kwargs(["sinks"], "raise", name="fa3.varlen", env="SGLANG_FA3_ON_DROP")(kernel)
    with pytest.raises(UnsupportedKwargError) as info:
        wrapped(rand(3), rand(3), sinks=rand(8))
    err = info.value
    assert isinstance(err, TypeError)
    assert (err.kernel, err.kwarg) == ("fa3.varlen", "sinks")
    message = str(err)
    assert "fa3.varlen does not accept the keyword 'sinks'" in message
    for var in ("SGLANG_FA3_ON_DROP", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN", "KERNEL_FALLBACK_ON_DROP"):
        assert var in message
        assert var in err.env_vars
    assert kernel.calls == 0
    assert stats() == []


def test_per_keyword_policies() -> None:
    kernel = CountingKernel()
    wrapped = tolerant_kwargs(
        {"out": None, "num_splits": 1, "softcap": 0.0},
        {"out": "copy", "num_splits": "warn", "softcap": "raise"},
    )(kernel)
    x, y, buf = rand(3), rand(3), torch.empty(3)
    assert wrapped(x, y, out=buf, num_splits=4) is buf
    torch.testing.assert_close(buf, x + y)
    with pytest.raises(UnsupportedKwargError, match="softcap"):
        wrapped(x, y, num_splits=4, softcap=30.0)
    assert kernel.calls == 1
    assert {(r["kwarg"], r["policy"], r["count"]) for r in stats()} == {
        ("out", "copy", 1),
        ("num_splits", "warn", 1),
    }


# -- the kernel's own errors ------------------------------------------------------------------------


def test_type_error_inside_the_kernel_is_not_taken_for_a_missing_keyword() -> None:
    calls = []

    def kernel(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(1)
        raise TypeError("kernel() got an unexpected keyword argument 'out'")

    wrapped = tolerant_kwargs(["out"], "warn")(kernel)
    with pytest.raises(TypeError, match="unexpected keyword argument 'out'") as info:
        wrapped(rand(3), out=torch.empty(3))
    assert type(info.value) is TypeError
    assert len(calls) == 1
    assert stats() == []


def test_runtime_error_inside_a_torch_op_propagates_unchanged() -> None:
    wrapped = tolerant_kwargs(["out"], "warn")(broken_op)
    with pytest.raises(RuntimeError, match="raised by the kernel body"):
        wrapped(rand(3), out=torch.empty(3))
    # A call that failed did not fall back: only completed fallbacks are counted.
    assert stats() == []


@contextmanager
def exception_events() -> Iterator[list[str]]:
    """Every Python-level exception raised while the block runs (sys.settrace)."""
    seen: list[str] = []

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "exception":
            seen.append(f"{arg[0].__name__} in {frame.f_code.co_name}")
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield seen
    finally:
        sys.settrace(old)


@pytest.mark.parametrize("policy", ["warn", "copy"])
@pytest.mark.parametrize("kernel", [CountingKernel(), torch.ops.aten.add.Tensor], ids=["python", "aten-op"])
def test_no_exception_is_raised_or_caught_per_call(policy: str, kernel: Any) -> None:
    wrapped = tolerant_kwargs(["out"], policy)(kernel)
    x, y, buf = rand(3), rand(3), torch.empty(3)
    wrapped(x, y, out=buf)
    with exception_events() as seen:
        for _ in range(20):
            wrapped(x, y, out=buf)
    assert seen == []


def test_body_runs_exactly_once_per_call_on_every_path() -> None:
    kernel = CountingKernel()
    wrapped = tolerant_kwargs({"out": None, "num_splits": 1}, {"out": "copy", "num_splits": "warn"})(kernel)
    x, y = rand(3), rand(3)
    wrapped(x, y)
    wrapped(x, y, out=None)
    wrapped(x, y, out=torch.empty(3))
    wrapped(x, y, num_splits=2)
    assert kernel.calls == 4


# -- decorator mechanics ----------------------------------------------------------------------------


def test_metadata_and_state_are_kept() -> None:
    def flash_attn_varlen_func(q: torch.Tensor) -> torch.Tensor:
        """FA3 varlen entry point."""
        return q

    wrapped = tolerant_kwargs(["out"])(flash_attn_varlen_func)
    assert wrapped.__name__ == "flash_attn_varlen_func"
    assert wrapped.__doc__ == "FA3 varlen entry point."
    assert wrapped.__wrapped__ is flash_attn_varlen_func
    plan = wrapped.tolerant
    assert plan.missing == ("out",)
    assert plan in kernels()
    assert plan.describe()["policies"]["out"] == {
        "policy": "warn",
        "source": "default",
        "missing": True,
        "neutral": "None",
    }


def test_torch_op_metadata() -> None:
    wrapped = tolerant_kwargs(["out"])(torch.ops.aten.mm.default)
    assert wrapped.__wrapped__ is torch.ops.aten.mm.default
    assert wrapped.tolerant.name == "mm.default"
    assert wrapped.tolerant.support.source == "schema:aten::mm.default"


def test_methods_static_and_class_methods() -> None:
    class Backend:
        scale = 3.0

        @tolerant_kwargs(["out"], "copy")
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

        @staticmethod
        @tolerant_kwargs(["out"], "copy")
        def double(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @tolerant_kwargs(["out"], "copy")
        @classmethod
        def triple(cls, x: torch.Tensor) -> torch.Tensor:
            return x * cls.scale

    x = rand(3)
    for call, expected in [
        (Backend().forward, x * 3),
        (Backend.double, x * 2),
        (Backend().double, x * 2),
        (Backend.triple, x * 3),
    ]:
        buf = torch.empty(3)
        assert call(x, out=buf) is buf
        torch.testing.assert_close(buf, expected)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (
            (["out"], "wran"),
            {},
            PolicyConfigError,
            r"on_drop='wran' is not a policy; use one of warn, copy, raise\. Did you mean 'warn'\?",
        ),
        (([],), {}, PolicyConfigError, r"drop=\.\.\.\) is empty"),
        (("out",), {}, PolicyConfigError, r"drop must be a list of keyword names"),
        (
            (["out"], {"sinks": "raise"}),
            {},
            PolicyConfigError,
            r"tolerant_kwargs: on_drop names 'sinks', which is not one of its keywords \(out\)\.",
        ),
        ((["out"], {"out": "copyy"}), {}, PolicyConfigError, r"on_drop\['out'\]='copyy' is not a policy"),
        ((["not a name"],), {}, PolicyConfigError, r"'not a name' is not a keyword argument name"),
        (
            (["out"],),
            {"env": "1BAD"},
            PolicyConfigError,
            r"env='1BAD'\): env must be an environment variable name",
        ),
        ((["out"],), {"name": ""}, PolicyConfigError, r"name must be a non-empty string"),
        ((["out"], 3), {}, PolicyConfigError, r"tolerant_kwargs: on_drop=3: use a policy"),
        ((torch.add,), {}, TypeError, r"tolerant_kwargs needs the keywords to drop"),
    ],
    ids=[
        "typo-policy",
        "empty-drop",
        "string-drop",
        "mapping-unknown",
        "mapping-typo",
        "bad-name",
        "bad-env",
        "empty-name",
        "int-policy",
        "bare-use",
    ],
)
def test_invalid_options_fail_when_decorating(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        tolerant_kwargs(*args, **kwargs)


def test_non_callable_target_is_refused() -> None:
    with pytest.raises(TypeError, match="can only wrap a callable, got 3"):
        tolerant_kwargs(["out"])(3)  # type: ignore[arg-type]


# -- threads ----------------------------------------------------------------------------------------


def test_counts_are_exact_under_threads_and_logged_once() -> None:
    wrapped = tolerant_kwargs(["out"], "warn", name="threaded")(CountingKernel())
    x, y, buf = rand(8), rand(8), torch.empty(8)
    per_thread, threads = 2000, 8
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            wrapped(x, y, out=buf)

    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with capture_logs() as logs:
            pool = [threading.Thread(target=work) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
    finally:
        sys.setswitchinterval(0.005)
    assert [r["count"] for r in stats()] == [per_thread * threads]
    assert len(logs) == 1


# -- random signatures (hypothesis) -----------------------------------------------------------------


NAMES = ["out", "softcap", "sinks", "num_splits", "window_size", "qv", "pack_gqa", "scale"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[str, str]], bool, list[str], str, dict[str, Any]]:
    params = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5))
    kinds = [draw(st.sampled_from(["pos_or_kw", "kw_only"])) for _ in params]
    var_kw = draw(st.booleans())
    drop = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=4))
    policy = draw(st.sampled_from(["warn", "raise"]))
    passed = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5))
    values = {name: draw(st.sampled_from([None, 1, 2.5])) for name in passed}
    return list(zip(params, kinds, strict=True)), var_kw, drop, policy, values


def make_kernel(params: list[tuple[str, str]], var_kw: bool) -> Any:
    """A real function with the drawn signature that returns the keywords it received."""
    pos = [f"{n}=None" for n, kind in params if kind == "pos_or_kw"]
    kw_only = [f"{n}=None" for n, kind in params if kind == "kw_only"]
    parts = pos + (["*", *kw_only] if kw_only else []) + (["**rest"] if var_kw else [])
    body = "received = dict(locals()); received.update(received.pop('rest', {})); return received"
    namespace: dict[str, Any] = {}
    exec(f"def kernel({', '.join(parts)}):\n    {body}\n", namespace)
    return namespace["kernel"]


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_random_signatures_and_keyword_sets(
    scenario: tuple[list[tuple[str, str]], bool, list[str], str, dict[str, Any]],
) -> None:
    params, var_kw, drop, policy, values = scenario
    reset_stats()
    names = {n for n, _ in params}
    wrapped = tolerant_kwargs(drop, policy)(make_kernel(params, var_kw))
    accepted = names | (set(NAMES) if var_kw else set())
    unknown = [k for k in values if k not in accepted and k not in drop]
    refused = [k for k in drop if k in values and k not in accepted and values[k] is not None]
    # A keyword nobody accepts fails as it fails on the kernel itself, before any policy
    # is looked at: the forwarder has the kernel's own parameters.
    if unknown:
        with pytest.raises(TypeError, match="unexpected keyword argument") as info:
            wrapped(**values)
        assert not isinstance(info.value, UnsupportedKwargError)
        assert stats() == []
        return
    if refused and policy == "raise":  # decided before the kernel runs
        with pytest.raises(UnsupportedKwargError):
            wrapped(**values)
        assert stats() == []
        return
    with capture_logs():
        received = wrapped(**values)
    expected = {k: v for k, v in values.items() if k in accepted}
    assert {k: v for k, v in received.items() if k in values} == expected
    assert {r["kwarg"]: r["count"] for r in stats()} == dict.fromkeys(refused, 1)


def test_nothing_missing_keeps_methods_bound_and_builtins_callable() -> None:
    class Backend:
        @tolerant_kwargs(["out"])
        def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return x * 2 if out is None else out.copy_(x * 2)

    x, buf = rand(3), torch.empty(3)
    assert Backend().forward(x, out=buf) is buf
    torch.testing.assert_close(buf, x * 2)
    mm = tolerant_kwargs(["out"], "raise")(torch.mm)
    a, b, o = rand(2, 3), rand(3, 2), torch.empty(2, 2)
    assert mm(a, b, out=o) is o
    assert (mm.__name__, mm.__wrapped__, mm.tolerant.missing) == ("mm", torch.mm, ())


# -- reloads racing decorations (issue 11, item 3) ----------------------------------------------------


def test_reload_while_other_threads_decorate_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    errors: list[BaseException] = []
    done = threading.Event()
    keep: list[Any] = []

    def decorate_forever() -> None:
        i = 0
        while not done.is_set():
            try:
                keep.append(tolerant_kwargs(["out"], name=f"racing{i % 50}")(lambda x: x))
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)
            i += 1
            if len(keep) > 200:
                keep.clear()  # let the weak registry shrink too, as dynamic kernels do

    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP", "copy")
    sys.setswitchinterval(1e-6)
    workers = [threading.Thread(target=decorate_forever) for _ in range(2)]
    try:
        for t in workers:
            t.start()
        for _ in range(200):
            try:
                reload_config()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)
    finally:
        done.set()
        for t in workers:
            t.join()
        sys.setswitchinterval(0.005)
    assert errors == []
    assert {plan.policies["out"][0] for plan in kernels() if plan.name.startswith("racing")} == {"copy"}


def test_a_kernel_decorated_during_a_reload_gets_the_new_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    def decorate_meanwhile(snap: _config.Snapshot) -> Callable[[], None]:
        # Runs inside reload_config(), after the registry was read and before the new
        # configuration is in force: what another thread decorating then would see.
        made.append(tolerant_kwargs(["out"], name="late")(lambda x: x * 2))
        return lambda: None

    monkeypatch.setattr(_config, "_reloaders", [*_config._reloaders, decorate_meanwhile])
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__LATE", "copy")
    reload_config()
    (late,) = made
    assert late.tolerant.policies["out"] == ("copy", "KERNEL_FALLBACK_ON_DROP__LATE")
    buf = torch.zeros(2)
    with capture_logs():
        assert late(torch.ones(2), out=buf) is buf
    torch.testing.assert_close(buf, torch.full((2,), 2.0))


# -- copy: result types and buffers torch refuses (issue 11, item 12) ---------------------------------


def test_copy_keeps_a_torch_structseq_result() -> None:
    wrapped = tolerant_kwargs(["out"], "copy", name="max_dim")(lambda x, dim: torch.max(x, dim=dim))
    x, buf = rand(3, 2), torch.empty(2)
    with capture_logs():
        result = wrapped(x, dim=0, out=buf)
    expected = torch.max(x, dim=0)
    assert type(result) is type(expected)
    assert result.values is buf
    assert torch.equal(result.indices, expected.indices)
    torch.testing.assert_close(buf, expected.values)


def _leaf_requiring_grad() -> torch.Tensor:
    return torch.zeros(3, requires_grad=True)


def _inference_tensor() -> torch.Tensor:
    with torch.inference_mode():
        return torch.zeros(3)


@pytest.mark.parametrize(
    ("make_buffer", "why"),
    [
        (lambda: torch.zeros(1).expand(3), "share one memory location"),
        (_leaf_requiring_grad, "leaf tensor that requires grad"),
        (_inference_tensor, "inference-mode tensor"),
        (lambda: _leaf_requiring_grad()[:3], "view of a leaf tensor that requires grad"),
        (lambda: torch.empty(3, device="meta"), "meta tensor, which holds no data"),
    ],
    ids=["expanded", "leaf-requires-grad", "inference-tensor", "view-of-leaf-requiring-grad", "meta"],
)
@pytest.mark.parametrize("shape", ["function", "callable-object"])
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "first-call"])
def test_copy_into_a_buffer_torch_refuses_fails_before_the_kernel_runs(
    make_buffer: Callable[[], torch.Tensor], why: str, shape: str, warm: bool
) -> None:
    body = CountingKernel()
    kernel = body if shape == "callable-object" else (lambda x, y: body(x, y))
    wrapped = tolerant_kwargs(["out"], "copy", name="refused")(kernel)
    if warm:
        with capture_logs():
            wrapped(rand(3), rand(3), out=torch.empty(3))  # a good buffer first: the fast path is armed
    buf = make_buffer()
    with pytest.raises(
        UnsupportedKwargError, match=f"refused does not accept the keyword 'out'.*{why}"
    ) as info:
        wrapped(rand(3), rand(3), out=buf)
    assert (info.value.kernel, info.value.kwarg) == ("refused", "out")
    assert body.calls == int(warm), "refused before the kernel ran"
    assert [r["count"] for r in stats()] == ([1] if warm else [])


def test_copy_into_a_leaf_requiring_grad_is_fine_under_no_grad() -> None:
    wrapped = tolerant_kwargs(["out"], "copy", name="nograd")(lambda x: x * 2)
    buf = _leaf_requiring_grad()
    with torch.no_grad(), capture_logs():
        assert wrapped(torch.ones(3), out=buf) is buf
    torch.testing.assert_close(buf.detach(), torch.full((3,), 2.0))


# -- processes ------------------------------------------------------------------------------------

_FORK_WHILE_RELOADING = """
import json, os, threading, time
import structlog, torch
from prometheus_client import CollectorRegistry
from kernel_fallback import kernel_chain, reload_config, tolerant_kwargs
from kernel_fallback.metrics import enable_prometheus

structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # events go nowhere

def add(x, y):
    return x + y

kept = [tolerant_kwargs(["out"], name=f"k{i}")(add) for i in range(2000)]

@kernel_chain(name="forked_chain", drop=["out"])
def chained(x, y, *, out=None):
    raise NotImplementedError

chained.chain.provider("plain", loader=lambda: add)
stop = False

def reload_forever():  # holds the registry lock and each chain's lock in turn
    while not stop:
        reload_config()

def metrics_forever():  # holds metrics._lock in turn
    while not stop:
        enable_prometheus(CollectorRegistry(), include_existing=False).close()

def describe_forever():  # holds the chain's lock in turn
    while not stop:
        chained.chain.describe()

for target in (reload_forever, metrics_forever, describe_forever):
    threading.Thread(target=target, daemon=True).start()
time.sleep(0.2)
x = torch.ones(2)
pids = []
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        tolerant_kwargs(["out"], name="in_child")(add)(x, x, out=torch.empty(2))
        chained(x, x)
        chained.chain.describe()
        reload_config()
        enable_prometheus(CollectorRegistry()).close()
        os._exit(0)
    pids.append(pid)
    time.sleep(0.02)
stop = True
waiting, codes, deadline = set(pids), [], time.monotonic() + 60
while waiting and time.monotonic() < deadline:
    for pid in list(waiting):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
            waiting.discard(pid)
    time.sleep(0.05)
for pid in waiting:  # hung: deadlocked on a lock inherited held
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(json.dumps({"children": len(pids), "hung": len(waiting), "codes": codes}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_reload_in_another_thread_does_not_hang() -> None:
    # The scenario: 2000 kernels, a thread reloading (others enabling metrics and
    # describing a chain), 20 children forked meanwhile; each decorates, calls and
    # describes a chain, reloads and enables metrics. A lock another thread held at fork
    # (registry, chain or metrics lock) hung 15-20 of them.
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _FORK_WHILE_RELOADING],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hung"] == 0, result
    assert result["codes"] == [0] * result["children"], result


async def _async_kernel(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _generator_kernel(x: torch.Tensor) -> Iterator[torch.Tensor]:
    yield x * 2


async def _async_generator_kernel(x: torch.Tensor) -> AsyncIterator[torch.Tensor]:
    yield x * 2


async def _collect(items: AsyncIterator[torch.Tensor]) -> list[torch.Tensor]:
    return [item async for item in items]


@pytest.mark.parametrize(
    ("kernel", "is_kind", "run"),
    [
        (_async_kernel, inspect.iscoroutinefunction, lambda made: [asyncio.run(made)]),
        (_generator_kernel, inspect.isgeneratorfunction, list),
        (_async_generator_kernel, inspect.isasyncgenfunction, lambda made: asyncio.run(_collect(made))),
    ],
    ids=["async-def", "generator", "async-generator"],
)
@pytest.mark.parametrize("drop", [["out"], ["x"]], ids=["lacks-a-keyword", "lacks-none"])
def test_coroutine_and_generator_kernels_stay_what_they_are(
    kernel: Callable[..., Any],
    is_kind: Callable[[Any], bool],
    run: Callable[[Any], list[Any]],
    drop: list[str],
) -> None:
    wrapped = tolerant_kwargs(drop, name="kind")(kernel)
    assert is_kind(wrapped), "asyncio, pytest and friends ask inspect what a function is"
    x = torch.ones(2)
    with capture_logs():
        results = run(wrapped(x, out=torch.empty(2)) if drop == ["out"] else wrapped(x))
    torch.testing.assert_close(results, run(kernel(x)))
    assert [r["count"] for r in stats()] == ([1] if drop == ["out"] else [])
