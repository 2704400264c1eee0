"""Shared fixtures: every test starts from a clean environment and clean counters."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import structlog

import kernel_fallback
from kernel_fallback import _events


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Unset every KERNEL_FALLBACK_* variable, reload, and clear counters and loggers."""
    for name in list(os.environ):
        if name.startswith(("KERNEL_FALLBACK_", "SGLANG_")):
            monkeypatch.delenv(name)
    kernel_fallback.reload_config()
    kernel_fallback.reset_stats()
    structlog.reset_defaults()
    old_logger = _events.set_logger(None)
    yield
    _events.set_logger(old_logger)
    structlog.reset_defaults()
    for name in list(os.environ):
        if name.startswith(("KERNEL_FALLBACK_", "SGLANG_")):
            monkeypatch.delenv(name)
    kernel_fallback.reload_config()
    kernel_fallback.reset_stats()
