"""Shared fixtures: every test starts from a clean environment and clean counters."""

from __future__ import annotations

import os
from collections.abc import Iterator

# transformers (a dev dependency) brings the `kernels` package, so the chain's `hub` provider
# can really be loaded here; no test may reach the Hugging Face Hub (CI has no network), and
# offline mode makes its lookup fail at once with the error a user without the build sees.
# huggingface_hub reads this at import, so it is set before anything imports it; child
# processes inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import structlog

import kernel_fallback
from kernel_fallback import _events, _logging, _sinks


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


@pytest.fixture
def close_log_files() -> Iterator[None]:
    """Close what configure_logging() or the KERNEL_FALLBACK_LOG_* logger opened.

    For the modules that open log files, so each test leaves no descriptor behind.
    """
    yield
    if _logging._configured is not None:
        _logging._configured.close()
        _logging._configured = None
    if _sinks._from_env is not None:
        _sinks._from_env[1].close()
        _sinks._from_env = None
