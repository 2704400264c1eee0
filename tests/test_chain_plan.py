"""A chain's generated fast path serves a call exactly as the general path would.

Each test calls a chain whose active provider lacks something (so a plan is made) and
checks what the provider received or what the caller got, against what the general
reading of a call gives.
"""

from __future__ import annotations

import inspect
import uuid
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from kernel_fallback import kernel_chain
from kernel_fallback._chain_plan import make_plan
from kernel_fallback.testing import capture_fallbacks

x, y = torch.arange(4.0), torch.ones(4)
GOT: list[dict[str, Any]] = []


def lean(
    x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor | None = None, chunk: int = 7, *, scale: float = 1.0
) -> torch.Tensor:
    """Lacks sinks, bias, splits and out; its default for ``chunk`` differs from the chain's."""
    GOT.append({"y2": y2, "chunk": chunk, "scale": scale})
    return (x + y) * scale


def full(
    x: torch.Tensor,
    y: torch.Tensor,
    y2: torch.Tensor | None = None,
    chunk: int | None = None,
    *,
    scale: float = 1.0,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    splits: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    GOT.append({"provider": "full", "splits": splits})
    result = (x + y) * scale + (0 if sinks is None else sinks) + (0 if bias is None else bias)
    return result if out is None else out.copy_(result)


def chain_of(*providers: Any) -> Any:
    @kernel_chain(
        name=f"plan_{uuid.uuid4().hex[:8]}",
        route=["sinks", "bias"],
        drop=["out"],
        on_drop={"out": "copy"},
        hints=["splits"],
        meaningful_with={"bias": ["y2"]},
        selectors={"ver": {3: None, 4: "full"}},
    )
    def toy(
        x: torch.Tensor,
        y: torch.Tensor,
        y2: torch.Tensor | None = None,
        chunk: int | None = None,
        *,
        scale: float = 1.0,
        sinks: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        splits: int = 1,
        ver: int = 3,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    for provider in providers:
        toy.provider(provider.__name__, loader=_loader(provider))
    return toy


def _loader(provider: Any) -> Any:
    return lambda: provider


@pytest.fixture(autouse=True)
def clear() -> None:
    GOT.clear()


def test_a_plan_is_made_for_a_provider_that_lacks_keywords_and_none_for_one_that_lacks_nothing() -> None:
    lacking, complete = chain_of(lean, full), chain_of(full)
    lacking(x, y)
    complete(x, y)
    assert lacking.chain._fast[0] is not None
    assert complete.chain._fast[0] is None


def test_an_argument_left_out_keeps_the_providers_default_and_one_given_is_passed() -> None:
    chain = chain_of(lean, full)
    chain(x, y)
    chain(x, y, None, None)
    chain(x, y, chunk=3, scale=2.0)
    assert [(g["chunk"], g["scale"]) for g in GOT] == [(7, 1.0), (None, 1.0), (3, 2.0)]


@pytest.mark.parametrize(
    ("call", "served_by"),
    [
        pytest.param({}, "lean", id="nothing"),
        pytest.param({"splits": 4}, "lean", id="hint-removed"),
        pytest.param({"ver": 3}, "lean", id="ver-3-the-chain"),
        pytest.param({"bias": torch.ones(4)}, "lean", id="bias-without-y2-neutral"),
        pytest.param({"sinks": None, "bias": None}, "lean", id="neutral-values"),
        pytest.param({"sinks": torch.ones(4)}, "full", id="sinks-routed"),
        pytest.param({"bias": torch.ones(4), "y2": torch.ones(4)}, "full", id="bias-with-y2-routed"),
        pytest.param({"ver": 4}, "full", id="ver-4-selects"),
    ],
)
def test_calls_are_served_where_the_general_path_would_serve_them(
    call: dict[str, Any], served_by: str
) -> None:
    chain = chain_of(lean, full)
    with capture_fallbacks() as events:
        chain(x, y, **call)
    assert ("provider" in GOT[-1]) == (served_by == "full")
    routed = served_by == "full" and "ver" not in call
    assert [e.kind for e in events] == (["dispatch"] if routed else [])


def test_out_is_copied_into_by_the_providers_policy_and_logged_at_the_callers_line() -> None:
    chain = chain_of(lean, full)
    buffer = torch.zeros(4)
    with capture_fallbacks() as events, capture_logs() as logs:
        result = chain(x, y, out=buffer)
    assert result is buffer
    assert torch.equal(buffer, x + y)
    assert [(e.kind, e.subject, e.policy) for e in events] == [("kwarg", "out", "copy")]
    (log,) = [log for log in logs if log["event"] == "kernel_fallback.kwarg_dropped"]
    assert log["where"].startswith(f"{__file__}:")


def test_mistakes_raise_what_the_general_path_raises() -> None:
    chain = chain_of(lean, full)
    with pytest.raises(TypeError, match=r"lean\(\) got an unexpected keyword argument 'nope'"):
        chain(x, y, nope=1)
    with pytest.raises(TypeError, match=r"lean\(\) missing 1 required positional argument: 'y'"):
        chain(x)
    with pytest.raises(TypeError, match=r"takes at most 4 positional arguments \(x, y, y2, chunk\) but 5"):
        chain(x, y, None, None, 1)
    with pytest.raises(TypeError, match=r"^plan_\w+\(\) got multiple values for argument 'y'$"):
        chain(x, y, y=y)


def test_no_plan_for_a_provider_without_a_python_signature_or_taking_kwargs() -> None:
    def with_kwargs(x: torch.Tensor, y: torch.Tensor, **more: Any) -> torch.Tensor:
        return x + y

    common: dict[str, Any] = {
        "lacking": frozenset({"sinks"}),
        "hints_lacking": frozenset(),
        "neutral": {"sinks": None},
        "routed": frozenset({"sinks"}),
        "also_neutral": {},
        "meaningful_with": {},
        "quiet_selectors": {},
    }
    sig = inspect.signature(chain_of(lean).__wrapped__)
    assert make_plan("k", "p", sig, kernel=torch.add, impl=torch.add, **common) is None
    assert make_plan("k", "p", sig, kernel=with_kwargs, impl=with_kwargs, **common) is None
    assert make_plan("k", "p", sig, kernel=lean, impl=lean, **common) is not None
