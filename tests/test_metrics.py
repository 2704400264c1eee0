"""Prometheus counters of fallbacks, on a real prometheus_client registry."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import torch

from kernel_fallback import _events, tolerant_kwargs
from kernel_fallback.metrics import FallbackMetrics, enable_prometheus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

prometheus_client = pytest.importorskip("prometheus_client")

TOTAL = "kernel_fallback_fallbacks_total"


@tolerant_kwargs(drop=["out"], on_drop="copy", name="m_add")
def m_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.add(x, y)


def drop_out(times: int = 1) -> None:
    for _ in range(times):
        m_add(torch.ones(2), torch.ones(2), out=torch.empty(2))


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A registry of the test's own, with whatever metrics it enabled closed afterwards."""
    registry = prometheus_client.CollectorRegistry()
    yield registry
    for (registry_id, _), metrics in list(_metrics_active().items()):
        if registry_id == id(registry):
            metrics.close()


def _metrics_active() -> dict[tuple[int, str], FallbackMetrics]:
    from kernel_fallback import metrics

    return metrics._active


def value(registry: CollectorRegistry, name: str = TOTAL, **labels: str) -> float | None:
    result: float | None = registry.get_sample_value(name, labels)
    return result


def test_counts_every_occurrence_with_labels(registry: CollectorRegistry) -> None:
    enable_prometheus(registry)
    drop_out(1000)
    _events.record(("provider", "m_attn", "torch", "auto"))
    assert value(registry, kernel="m_add", kwarg="out", provider="", policy="copy") == 1000
    assert value(registry, kernel="m_attn", kwarg="", provider="torch", policy="auto") == 1


def test_counts_from_before_enabling_are_included_by_default(
    registry: CollectorRegistry,
) -> None:
    drop_out(3)
    enable_prometheus(registry)
    drop_out(2)
    assert value(registry, kernel="m_add", kwarg="out", provider="", policy="copy") == 5


def test_counts_from_before_can_be_left_out(registry: CollectorRegistry) -> None:
    drop_out(3)
    enable_prometheus(registry, include_existing=False)
    drop_out(2)
    assert value(registry, kernel="m_add", kwarg="out", provider="", policy="copy") == 2


def test_enabling_twice_returns_the_same_counter(registry: CollectorRegistry) -> None:
    first = enable_prometheus(registry)
    assert enable_prometheus(registry) is first
    drop_out()
    assert value(registry, kernel="m_add", kwarg="out", provider="", policy="copy") == 1


def test_namespace_names_the_metric(registry: CollectorRegistry) -> None:
    enable_prometheus(registry, namespace="serving")
    drop_out()
    assert (
        value(registry, "serving_fallbacks_total", kernel="m_add", kwarg="out", provider="", policy="copy")
        == 1
    )


def test_close_stops_counting_and_unregisters(registry: CollectorRegistry) -> None:
    metrics = enable_prometheus(registry)
    drop_out()
    metrics.close()
    drop_out()
    assert value(registry, kernel="m_add", kwarg="out", provider="", policy="copy") is None
    again = enable_prometheus(registry, include_existing=False)
    assert again is not metrics
    drop_out()
    assert value(registry, kernel="m_add", kwarg="out", provider="", policy="copy") == 1


def test_exposition_text(registry: CollectorRegistry) -> None:
    enable_prometheus(registry)
    drop_out(2)
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE kernel_fallback_fallbacks_total counter" in text
    assert 'kernel_fallback_fallbacks_total{kernel="m_add",kwarg="out",policy="copy",provider=""} 2.0' in text


def test_missing_prometheus_client_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'kernel_fallback\[metrics\]'"):
        enable_prometheus()


def test_close_twice_is_harmless(registry: CollectorRegistry) -> None:
    metrics = enable_prometheus(registry)
    metrics.close()
    metrics.close()
    drop_out()
    assert value(registry, kernel="m_add", kwarg="out", provider="", policy="copy") is None


def test_kernels_past_the_bound_on_stored_keys_keep_their_labels(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_events, "MAX_ENTRIES", 1)
    enable_prometheus(registry)
    drop_out(2)
    late = tolerant_kwargs(drop=["out"], on_drop="copy", name="m_late")(lambda x: x * 2)
    for _ in range(3):
        late(torch.ones(2), out=torch.empty(2))
    assert value(registry, kernel="m_late", kwarg="out", provider="", policy="copy") == 3
    assert value(registry, kernel="<overflow>", kwarg="", provider="", policy="") is None
