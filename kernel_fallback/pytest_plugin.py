"""pytest plugin: fail tests on fallbacks, expect fallbacks, run a whole suite strict.

Registered through the ``pytest11`` entry point (or ``-p kernel_fallback.pytest_plugin``).
Built on :func:`kernel_fallback.testing.no_fallbacks` and
:func:`kernel_fallback.testing.expect_fallback`, which work without pytest.

Per test:
- ``@pytest.mark.no_fallbacks``, or requesting the ``no_fallbacks`` fixture: the test
  fails when a fallback that is not allowed happens in it (setup, call or teardown);
- ``@pytest.mark.allow_fallback("kernel:kwarg", ...)``: accepted in this test;
- ``@pytest.mark.expect_fallback(kernel=..., kwarg=..., provider=..., count=...)``, or the
  ``expect_fallback`` fixture used as ``with expect_fallback(kernel=..., kwarg=...):``:
  the test fails unless that fallback happens; an expected fallback is allowed.

Whole suite: ``--kernel-fallback-strict`` or the ini setting ``kernel_fallback_strict =
true`` makes every test behave as if marked ``no_fallbacks``. Fallbacks a project has
accepted are listed once in the ini setting ``kernel_fallback_allow`` (one pattern or
several per line), in ``KERNEL_FALLBACK_ALLOW=kernel:kwarg,...`` or with
``--kernel-fallback-allow``, so strict mode can be on from day one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import final

import pytest

from kernel_fallback import testing
from kernel_fallback._allow import AllowList
from kernel_fallback._config import ENV_ALLOW
from kernel_fallback._events import FallbackEvent
from kernel_fallback.exceptions import PolicyConfigError

__all__ = [
    "expect_fallback",
    "no_fallbacks",
    "pytest_addoption",
    "pytest_configure",
    "pytest_report_header",
    "pytest_runtest_call",
    "pytest_runtest_setup",
    "pytest_runtest_teardown",
]


@final
@dataclass(frozen=True, slots=True)
class _Settings:
    strict: bool
    allow: AllowList


_SETTINGS = pytest.StashKey[_Settings]()
_MARKERS = pytest.StashKey["AllowList | PolicyConfigError"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--kernel-fallback-strict``, ``--kernel-fallback-allow`` and their ini settings."""
    group = parser.getgroup("kernel_fallback", "kernel_fallback: fallbacks in tests")
    group.addoption(
        "--kernel-fallback-strict",
        action="store_true",
        default=False,
        help="fail every test in which a fallback that is not allowed happens (ini: kernel_fallback_strict)",
    )
    group.addoption(
        "--kernel-fallback-allow",
        action="append",
        default=[],
        metavar="KERNEL:KWARG",
        help="a fallback accepted in strict mode (fnmatch patterns; repeat or separate with commas); "
        f"added to the ini setting kernel_fallback_allow and {ENV_ALLOW}",
    )
    parser.addini(
        "kernel_fallback_strict",
        type="bool",
        default=False,
        help="fail every test in which a fallback that is not allowed happens",
    )
    parser.addini(
        "kernel_fallback_allow",
        type="linelist",
        default=[],
        help="fallbacks accepted in strict mode: kernel:kwarg patterns, one or more per line",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers and read the strict mode and allow-list settings."""
    config.addinivalue_line(
        "markers", "no_fallbacks: fail the test when a fallback that is not allowed happens in it"
    )
    config.addinivalue_line(
        "markers", "allow_fallback(*patterns): accept these kernel:kwarg fallbacks in this test"
    )
    config.addinivalue_line(
        "markers",
        "expect_fallback(kernel=None, kwarg=None, provider=None, count=None): "
        "fail the test unless this fallback happens in it",
    )
    try:
        allow = (
            AllowList.parse("ini kernel_fallback_allow", config.getini("kernel_fallback_allow"))
            + AllowList.parse("--kernel-fallback-allow", config.getoption("kernel_fallback_allow"))
            + AllowList.from_env()
        )
    except PolicyConfigError as exc:
        raise pytest.UsageError(str(exc)) from exc
    strict = bool(config.getoption("kernel_fallback_strict") or config.getini("kernel_fallback_strict"))
    config.stash[_SETTINGS] = _Settings(strict, allow)


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say when strict mode is on, and what is allowed."""
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or not (settings.strict or settings.allow):
        return None
    allowed = ", ".join(settings.allow.patterns) or "nothing"
    return f"kernel_fallback: strict mode {'on' if settings.strict else 'off'}; allowed: {allowed}"


def _marker_allow(item: pytest.Item, phase: str) -> AllowList | None:
    """The test's ``allow_fallback`` patterns, read once per test.

    A bad pattern is one error, raised at set-up; the later phases of that test then
    run unguarded (None) instead of reporting it again.
    """
    read = item.stash.get(_MARKERS, None)
    if read is None:
        try:
            read = AllowList()
            for marker in item.iter_markers("allow_fallback"):
                read = read + AllowList.parse("@pytest.mark.allow_fallback", marker.args)
        except PolicyConfigError as exc:
            read = exc
        item.stash[_MARKERS] = read
    if isinstance(read, PolicyConfigError):
        if phase == "setup":
            raise pytest.UsageError(f"{item.nodeid}: {read}") from read
        return None
    return read


def _hint(item: pytest.Item) -> Callable[[list[str]], str]:
    def hint(patterns: list[str]) -> str:
        quoted = ", ".join(repr(p) for p in patterns)
        return (
            f"Fix the call, or accept the fallback: @pytest.mark.allow_fallback({quoted}) on "
            f"{item.name}, or for the whole suite the ini setting kernel_fallback_allow or "
            f"{ENV_ALLOW}={','.join(patterns)}."
        )

    return hint


@contextmanager
def _guarded(item: pytest.Item, phase: str) -> Iterator[None]:
    """Apply the test's markers and the suite's strict mode around one phase of a test."""
    settings = item.config.stash[_SETTINGS]
    strict = (
        settings.strict
        or item.get_closest_marker("no_fallbacks") is not None
        or "no_fallbacks" in getattr(item, "fixturenames", ())
    )
    stack = ExitStack()
    if phase == "call":
        for marker in item.iter_markers("expect_fallback"):
            stack.enter_context(testing.expect_fallback(*marker.args, **marker.kwargs))
    marked = _marker_allow(item, phase) if strict else None
    if marked is not None:
        stack.enter_context(testing.FallbackGuard(settings.allow + marked, hint=_hint(item)))
    try:
        yield
    except BaseException:
        # The test's own failure says more than ours; the guards let it through.
        if not stack.__exit__(*sys.exc_info()):
            raise
    else:
        try:
            stack.close()
        except testing.FallbackAssertionError as exc:
            failure = str(exc)
        else:
            return
        # Outside the except block, so no chained traceback: the message says what,
        # where and how to allow it, and our frames would be noise.
        pytest.fail(failure, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """Strict mode covers fixture set-up."""
    with _guarded(item, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Strict mode and ``expect_fallback`` markers around the test itself."""
    with _guarded(item, "call"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """Strict mode covers fixture teardown."""
    with _guarded(item, "teardown"):
        return (yield)


@pytest.fixture
def no_fallbacks() -> None:
    """Fail this test when a fallback that is not allowed happens in it (as the marker does)."""


@pytest.fixture
def expect_fallback() -> Callable[..., AbstractContextManager[list[FallbackEvent]]]:
    """:func:`kernel_fallback.testing.expect_fallback`: ``with expect_fallback(kernel=..., kwarg=...):``."""
    return testing.expect_fallback
