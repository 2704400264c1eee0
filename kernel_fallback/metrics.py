"""Optional Prometheus counters of fallbacks (``pip install 'kernel_fallback[metrics]'``).

>>> from kernel_fallback.metrics import enable_prometheus
>>> metrics = enable_prometheus()          # doctest: +SKIP

Counts every fallback recorded from then on (and, by default, those counted before)
in ``kernel_fallback_fallbacks_total`` with the labels ``kernel``, ``kwarg`` (the
dropped keyword, or ``""``), ``provider`` (the provider fallen back to, or ``""``) and
``policy``. It is driven by the same per-occurrence listener as
:mod:`kernel_fallback.testing`, so it sees repeats that deduplicated logging hides.
Under ``torch.compile`` a fallback is counted once per trace and under CUDA graphs
once per capture: replays do not pass through Python (see ``stats()``).

Multiprocess mode (gunicorn workers, tensor-parallel ranks in one pod): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory shared by the processes *before*
any of them imports ``prometheus_client``; each process then writes its counters to
files there, and the process that serves ``/metrics`` aggregates them with
``prometheus_client.multiprocess.MultiProcessCollector`` on a registry of its own.
Counters need no ``mark_process_dead``. See the prometheus_client documentation.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Final, final

from kernel_fallback import _events
from kernel_fallback._events import FallbackEvent

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["FallbackMetrics", "enable_prometheus"]

LABELS: Final = ("kernel", "kwarg", "provider", "policy")
#: Label sets whose child counter is kept for a direct increment; more than this
#: (kernels made dynamically) are looked up per occurrence instead.
_CACHE_LIMIT: Final = 4096

_lock = threading.Lock()
_active: dict[tuple[int, str], FallbackMetrics] = {}


def _reinit_after_fork() -> None:
    # Held by another thread at fork, the child's copy would never be released.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reinit_after_fork)


def _labels(kind: str, kernel: str, subject: str, policy: str) -> tuple[str, str, str, str]:
    return (kernel, subject, "", policy) if kind == "kwarg" else (kernel, "", subject, policy)


@final
class FallbackMetrics:
    """A Prometheus counter of fallbacks, fed by a listener on every recorded fallback.

    ``counter`` is the ``prometheus_client.Counter``; :meth:`close` stops counting and
    unregisters it.
    """

    def __init__(self, registry: CollectorRegistry, namespace: str, include_existing: bool) -> None:
        from prometheus_client import Counter

        self.registry = registry
        self.namespace = namespace
        self.counter: Any = Counter(
            "fallbacks",
            "Fallbacks taken by kernel_fallback: a dropped keyword or another provider.",
            list(LABELS),
            namespace=namespace,
            registry=registry,
        )
        self._children: dict[tuple[str, str, str, str], Any] = {}
        self._closed = False
        if include_existing:
            # Counted before enabling; a fallback recorded while this runs may be
            # counted twice or not at all, so enable at start-up when it matters.
            for row in _events.stats():
                subject = row["kwarg"] if row["kind"] == "kwarg" else row["provider"]
                labels = _labels(row["kind"], row["kernel"], subject or "", row["policy"])
                self.counter.labels(*labels).inc(row["count"])
        _events.add_listener(self._on_event)

    def _on_event(self, event: FallbackEvent) -> None:
        labels = _labels(event.kind, event.kernel, event.subject, event.policy)
        child = self._children.get(labels)
        if child is None:
            child = self.counter.labels(*labels)
            if len(self._children) < _CACHE_LIMIT:
                self._children[labels] = child
        child.inc()

    def close(self) -> None:
        """Stop counting and unregister the counter from its registry; closing again does nothing."""
        with _lock:
            if self._closed:
                return
            self._closed = True
            if _active.get((id(self.registry), self.namespace)) is self:
                del _active[(id(self.registry), self.namespace)]
        _events.remove_listener(self._on_event)
        self.registry.unregister(self.counter)


def enable_prometheus(
    registry: CollectorRegistry | None = None,
    *,
    namespace: str = "kernel_fallback",
    include_existing: bool = True,
) -> FallbackMetrics:
    """Count fallbacks in ``<namespace>_fallbacks_total`` on ``registry`` (default: the global one).

    Idempotent: enabling again for the same registry and namespace returns the same
    object. ``include_existing`` adds the counts recorded before this call. Raises
    ImportError, saying what to install, when prometheus_client is missing.
    """
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "kernel_fallback.metrics needs prometheus_client: pip install 'kernel_fallback[metrics]' "
            "(or pip install prometheus_client)."
        ) from exc
    if registry is None:
        registry = prometheus_client.REGISTRY
    with _lock:
        key = (id(registry), namespace)
        metrics = _active.get(key)
        if metrics is None:
            metrics = _active[key] = FallbackMetrics(registry, namespace, include_existing)
    return metrics
