"""torch.compile(fullgraph=True) through decorated kernels: no graph breaks, no recompiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from structlog.testing import capture_logs

from kernel_fallback import UnsupportedKwargError, reload_config, stats, tolerant_kwargs


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def axpy(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    return x + alpha * y


def frames_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compiled_step(kernel: Callable[..., Any], backend: str) -> Callable[..., Any]:
    def step(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor) -> Any:
        return kernel(x, y, alpha=2.0, out=buf) * 1.0

    return torch.compile(step, fullgraph=True, backend=backend)


@pytest.mark.parametrize(
    ("policy", "backend"),
    [("warn", "eager"), ("copy", "eager"), ("copy", "inductor")],
    ids=["warn-eager", "copy-eager", "copy-inductor"],
)
def test_fallback_compiles_fullgraph_and_does_not_recompile(policy: str, backend: str) -> None:
    kernel = tolerant_kwargs(["out"], policy, name=f"axpy_{policy}")(axpy)
    step = compiled_step(kernel, backend)
    with capture_logs() as logs:
        for _ in range(100):
            x, y, buf = torch.randn(8), torch.randn(8), torch.zeros(8)
            result = step(x, y, buf)
            torch.testing.assert_close(result, x + 2 * y)
            if policy == "copy":
                torch.testing.assert_close(buf, x + 2 * y)
            else:
                assert torch.equal(buf, torch.zeros(8))
    assert frames_compiled() == 1
    # The fallback is recorded once, when the graph is traced: every later run of the
    # compiled graph takes it without passing through Python.
    (row,) = stats()
    assert (row["count"], row["compiled_traces"]) == (1, 1)
    assert len(logs) == 1
    assert logs[0]["compiled"] is True
    assert logs[0]["where"].startswith(__file__)


def test_fast_path_compiles_fullgraph() -> None:
    kernel = tolerant_kwargs(["out"], "raise")(torch.add)
    step = torch.compile(lambda x, y, buf: kernel(x, y, out=buf), fullgraph=True, backend="eager")
    x, y, buf = torch.randn(4), torch.randn(4), torch.zeros(4)
    step(x, y, buf)
    torch.testing.assert_close(buf, x + y)
    assert stats() == []


def test_policy_change_after_compilation_takes_effect_by_recompiling(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tolerant_kwargs(["out"], "warn", name="axpy_reload")(axpy)
    step = compiled_step(kernel, "eager")
    x, y = torch.randn(4), torch.randn(4)
    buf = torch.zeros(4)
    with capture_logs():
        step(x, y, buf)
        assert torch.equal(buf, torch.zeros(4))
        monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__AXPY_RELOAD", "copy")
        reload_config()
        step(x, y, buf)
    torch.testing.assert_close(buf, x + 2 * y)
    assert frames_compiled() == 2, "Dynamo guards on the resolved policy and recompiles once"


def test_raise_policy_under_compile_raises_our_error_unchanged() -> None:
    kernel = tolerant_kwargs(["out"], "raise", name="axpy_raise", env="AXPY_ON_DROP")(axpy)
    step = torch.compile(lambda x, buf: kernel(x, x, out=buf) * 2.0, backend="eager")
    with pytest.raises(UnsupportedKwargError, match="axpy_raise does not accept the keyword 'out'") as info:
        step(torch.randn(4), torch.zeros(4))
    assert type(info.value) is UnsupportedKwargError
    assert info.value.env_vars[1] == "AXPY_ON_DROP"


def test_raise_policy_under_fullgraph_fails_compilation_saying_why() -> None:
    kernel = tolerant_kwargs(["out"], "raise", name="axpy_raise_fg")(axpy)
    step = compiled_step(kernel, "eager")
    with pytest.raises(
        torch._dynamo.exc.Unsupported, match="a keyword the kernel lacks was passed under the 'raise' policy"
    ):
        step(torch.randn(4), torch.randn(4), torch.zeros(4))


def axpy_with_out(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(x + alpha * y)


def test_a_cloned_kernel_compiles_fullgraph() -> None:
    kernel = tolerant_kwargs(["out"], "raise", name="axpy_clone")(axpy_with_out)
    step = compiled_step(kernel, "eager")
    x, y, buf = torch.randn(4), torch.randn(4), torch.zeros(4)
    torch.testing.assert_close(step(x, y, buf), x + 2 * y)
    torch.testing.assert_close(buf, x + 2 * y)
    assert frames_compiled() == 1
    assert stats() == []


@pytest.mark.parametrize("policy", ["warn", "copy"], ids=["warn", "copy"])
def test_eager_repeats_then_compile_neither_break_nor_recompile(policy: str) -> None:
    kernel = tolerant_kwargs(["out"], policy, name=f"axpy_hot_{policy}")(axpy)
    counter = kernel.tolerant._counters["out"]
    with capture_logs() as logs:
        for _ in range(5):  # eager: the first call logs, the rest only tick the counter
            kernel(torch.randn(8), torch.randn(8), alpha=2.0, out=torch.zeros(8))
        assert counter.hot
        step = compiled_step(kernel, "eager")
        for _ in range(20):
            x, y, buf = torch.randn(8), torch.randn(8), torch.zeros(8)
            torch.testing.assert_close(step(x, y, buf), x + 2 * y)
        kernel(torch.randn(8), torch.randn(8), alpha=2.0, out=torch.zeros(8))
    assert frames_compiled() == 1
    (row,) = stats()
    assert (row["count"], row["compiled_traces"]) == (7, 1)
    assert len(logs) == 1
