"""How a chain reads one call: positional arguments, hints, call-dependent neutral values, selectors.

(tests/test_chain.py covers declaring, choosing and routing; this module the call shapes
of FA3-like signatures, where every keyword may also come by position.)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from kernel_fallback import (
    PolicyConfigError,
    ProviderUnavailableError,
    UnsupportedKwargError,
    kernel_chain,
)
from kernel_fallback.testing import capture_fallbacks

x, y = torch.arange(4.0), torch.ones(4)
SEEN: list[dict[str, Any]] = []


def fast(
    x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor | None = None, *, scale: float = 1.0
) -> torch.Tensor:
    """Takes no sinks, no bias and no hint."""
    SEEN.append({"provider": "fast", "scale": scale})
    return (x + y) * scale


def full(
    x: torch.Tensor,
    y: torch.Tensor,
    y2: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
    splits: int = 1,
) -> torch.Tensor:
    """Takes everything, including the hint ``splits``; ``bias`` only with ``y2``."""
    SEEN.append({"provider": "full", "splits": splits, "chunk": chunk})
    out = (x + y) * scale
    if sinks is not None:
        out = out + sinks
    return out if bias is None else out + bias


def toy_chain(**options: Any) -> Any:
    """``f(x, y, y2=None, sinks=None, bias=None, chunk=None, splits=1, *, scale=1.0, ver=1)``."""

    @kernel_chain(
        name=f"toy_{uuid.uuid4().hex[:8]}",
        route=["sinks", "bias", "chunk"],
        hints=["splits"],
        also_neutral={"chunk": [0]},
        meaningful_with={"bias": ["y2"]},
        selectors={"ver": {1: None, 2: "full"}},
        **options,
    )
    def toy(
        x: torch.Tensor,
        y: torch.Tensor,
        y2: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        chunk: int | None = None,
        splits: int = 1,
        *,
        scale: float = 1.0,
        ver: int = 1,
    ) -> torch.Tensor:
        raise NotImplementedError

    return toy


@pytest.fixture(autouse=True)
def clear_seen() -> None:
    SEEN.clear()


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def declared() -> Any:
    chain = toy_chain()
    chain.provider("fast", loader=lambda: fast)
    chain.provider("full", loader=lambda: full)
    return chain


def test_positional_arguments_past_the_plain_ones_are_routed_like_keywords() -> None:
    chain = declared()
    sinks = torch.full((4,), 5.0)
    with capture_fallbacks() as events:
        by_keyword = chain(x, y, sinks=sinks)
        by_position = chain(x, y, None, sinks)
    assert torch.equal(by_keyword, x + y + sinks)
    assert torch.equal(by_position, by_keyword)
    assert [(e.kind, e.subject, e.policy) for e in events] == [("dispatch", "full", "route:sinks")] * 2
    assert chain(x, y, None, None).equal(x + y)  # neutral by position: stays on the active provider
    assert SEEN[-1]["provider"] == "fast"


def test_plain_positional_calls_are_passed_through_unchanged() -> None:
    chain = declared()
    assert chain.chain._positional == ("x", "y", "y2")
    assert torch.equal(chain(x, y, scale=2.0), (x + y) * 2)


def test_hints_go_where_they_are_taken_and_vanish_silently_elsewhere() -> None:
    chain = declared()
    with capture_logs() as logs, capture_fallbacks() as events:
        chain.chain.active  # noqa: B018 - choose before capturing the calls
        assert torch.equal(chain(x, y, splits=8), x + y)
        assert torch.equal(chain(x, y, None, None, None, None, 3), x + y)
        chain(x, y, sinks=torch.zeros(4), splits=8)  # routed: the hint goes with the call
    assert [s["provider"] for s in SEEN] == ["fast", "fast", "full"]
    assert SEEN[-1]["splits"] == 8
    assert [e.kind for e in events] == ["dispatch"]
    assert [log["event"] for log in logs] == ["kernel_fallback.dispatch"]
    assert chain.describe()["providers"][0]["ignores"] == ["splits"]


@pytest.mark.parametrize(
    ("call", "provider"),
    [
        pytest.param({"chunk": 0}, "fast", id="also-neutral-0"),
        pytest.param({"chunk": None}, "fast", id="neutral-None"),
        pytest.param({"chunk": 4}, "full", id="chunk-4-routed"),
        pytest.param({"bias": torch.ones(4)}, "fast", id="bias-without-y2"),
        pytest.param({"bias": torch.ones(4), "y2": torch.ones(4)}, "full", id="bias-with-y2"),
    ],
)
def test_neutral_values_may_depend_on_the_call(call: dict[str, Any], provider: str) -> None:
    chain = declared()
    with capture_fallbacks() as events:
        chain(x, y, **call)
    assert SEEN[-1]["provider"] == provider
    assert len(events) == (provider == "full")


def test_bias_given_with_y2_by_position_counts_too() -> None:
    chain = declared()
    out = chain(x, y, torch.ones(4), None, torch.full((4,), 2.0))
    assert SEEN[-1]["provider"] == "full"
    assert torch.equal(out, x + y + 2.0)


def test_a_selector_picks_a_provider_and_never_reaches_one() -> None:
    chain = declared()
    assert torch.equal(chain(x, y, ver=1), x + y)
    assert SEEN[-1]["provider"] == "fast"
    with capture_fallbacks() as events:
        assert torch.equal(chain(x, y, ver=2, splits=2), x + y)
    assert SEEN[-1] == {"provider": "full", "splits": 2, "chunk": None}
    assert events == []  # asked for, not a fallback
    with pytest.raises(
        PolicyConfigError, match=r"\(ver=9\): ver takes 1 \(this chain\), 2 \(provider 'full'\)"
    ):
        chain(x, y, ver=9)


def test_a_selected_provider_that_cannot_serve_refuses() -> None:
    chain = toy_chain()
    chain.provider("fast", loader=lambda: fast)

    def broken() -> Any:
        raise ImportError("no full build here")

    chain.provider("full", loader=broken)
    with pytest.raises(ProviderUnavailableError) as info:
        chain(x, y, ver=2)
    assert str(info.value).endswith(
        "(ver=2) asks for provider 'full', which cannot be used here: ImportError: no full build here. "
        "Pass ver=1 to use the chain's providers (fast)."
    )

    with pytest.raises(UnsupportedKwargError, match="provider 'fast' does not take 'sinks'"):
        toy_with_fast_selected()(x, y, sinks=torch.ones(4), ver=2)


def toy_with_fast_selected() -> Any:
    @kernel_chain(
        name=f"toy_{uuid.uuid4().hex[:8]}", route=["sinks"], selectors={"ver": {1: None, 2: "fast"}}
    )
    def toy(
        x: torch.Tensor, y: torch.Tensor, *, sinks: torch.Tensor | None = None, ver: int = 1
    ) -> torch.Tensor:
        raise NotImplementedError

    toy.provider("full", loader=lambda: full)
    toy.provider("fast", loader=lambda: fast)
    return toy


def test_unsupported_may_be_read_when_the_kernel_loads() -> None:
    read: list[Any] = []

    def ignores(kernel: Any) -> list[str]:
        read.append(kernel)
        return ["sinks"]

    other = toy_chain()
    other.provider("full", loader=lambda: full, unsupported=ignores)
    other.provider("fast", loader=lambda: fast)
    assert read == []  # declared lazily
    with pytest.raises(UnsupportedKwargError, match="'sinks'"):
        other(x, y, sinks=torch.ones(4))
    assert read == [full]
    assert "sinks" in other.describe()["providers"][0]["lacks"]

    bad = toy_chain()
    bad.provider("full", loader=lambda: full, unsupported=lambda kernel: ["sinkz"])
    with pytest.raises(PolicyConfigError, match="Did you mean 'sinks'"):
        bad(x, y)


def positional_full(
    x: torch.Tensor,
    y: torch.Tensor,
    y2: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
    splits: int = 1,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """The chain's own positional order: takes a positional call as it is."""
    SEEN.append({"provider": "positional_full", "splits": splits})
    return full(x, y, y2, scale=scale, sinks=sinks, bias=bias, chunk=chunk, splits=splits)


def test_a_provider_with_the_chains_positional_order_takes_positional_calls_as_they_are() -> None:
    chain = toy_chain()
    chain.provider("positional_full", loader=lambda: positional_full)
    chain.provider("full", loader=lambda: full)
    sinks = torch.full((4,), 3.0)
    assert torch.equal(chain(x, y, None, sinks, None, 0, 4), x + y + sinks)
    assert chain.chain._fast[4] == 7  # no binding: all 7 positional parameters pass through
    assert SEEN[0] == {"provider": "positional_full", "splits": 4}
    # A selector sends the call to `full`: the positional arguments are bound first.
    SEEN.clear()
    assert torch.equal(chain(x, y, None, sinks, None, 0, 5, ver=2), x + y + sinks)
    assert SEEN == [{"provider": "full", "splits": 5, "chunk": 0}]
    other = declared()
    other(x, y)
    assert other.chain._fast[4] == 3  # `fast` lacks them: positional arguments become keywords


def pure_fast(
    x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor | None = None, *, scale: float = 1.0
) -> torch.Tensor:
    return (x + y) * scale


def pure_full(
    x: torch.Tensor,
    y: torch.Tensor,
    y2: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    chunk: int | None = None,
    splits: int = 1,
) -> torch.Tensor:
    return (x + y) * scale + (0 if sinks is None else sinks)


@pytest.mark.usefixtures("fresh_dynamo")
def test_positional_routes_hints_and_selectors_compile_once_without_graph_breaks() -> None:
    chain = toy_chain()
    chain.provider("fast", loader=lambda: pure_fast)
    chain.provider("full", loader=lambda: pure_full)
    sinks = torch.full((4,), 2.0)
    step = torch.compile(
        lambda a, b, s: chain(a, b, None, s, None, 0, 8, ver=1) + chain(a, b, splits=3, chunk=None),
        fullgraph=True,
        backend="eager",
    )
    with capture_fallbacks() as events:
        for _ in range(3):
            assert torch.equal(step(x, y, sinks), (x + y + sinks) + (x + y))
    assert [(e.kind, e.subject, e.compiled) for e in events] == [("dispatch", "full", True)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
