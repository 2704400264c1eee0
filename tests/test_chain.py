"""kernel_chain: declaration, lazy loading, selection, fallback rules, per-call dispatch, describe."""

from __future__ import annotations

import gc
import importlib
import inspect
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from structlog.testing import capture_logs

import kernel_fallback
from kernel_fallback import (
    PolicyConfigError,
    ProviderUnavailableError,
    UnsupportedKwargError,
    kwarg_support,
    reload_config,
    stats,
)
from kernel_fallback._chain import ChainFunction, KernelChain, describe, describe_table, kernel_chain
from kernel_fallback._gates import (
    BoolFlag,
    Gate,
    cuda_available,
    cuda_capability,
    cuda_version,
    device_capability,
    platform_is,
    torch_version,
)
from kernel_fallback.testing import capture_fallbacks

Chain = ChainFunction[..., Any]


def add(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """A provider without ``sinks`` and ``out``."""
    return x + alpha * y


def add_sinks(
    x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """A provider with ``sinks`` (added to the result), without ``out``."""
    result = x + alpha * y
    return result if sinks is None else result + sinks


def make_chain(name: str | None = None, **options: Any) -> Chain:
    """A chain over ``f(x, y, *, alpha, sinks, out)``: sinks is routed, out copied."""
    options.setdefault("route", ["sinks"])
    options.setdefault("drop", ["out"])
    options.setdefault("on_drop", {"out": "copy"})

    @kernel_chain(name=name or f"toy_{uuid.uuid4().hex[:8]}", **options)
    def toy(
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        alpha: float = 1.0,
        sinks: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Toy logical kernel."""
        raise NotImplementedError

    return toy


@pytest.fixture
def module_dir(tmp_path: Path, env: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a real module on sys.path; returns its (unique) name."""
    env.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = f"kf_test_mod_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture
def env() -> Iterator[pytest.MonkeyPatch]:
    """Set variables, undone before conftest's clean-up reloads the configuration."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def provider_events(events: list[Any], kind: str = "provider") -> list[Any]:
    return [e for e in events if e.kind == kind]


x, y = torch.arange(4.0), torch.ones(4)


# -- declaration -----------------------------------------------------------------------


def _logical_positional_only_sinks(x: torch.Tensor, sinks: torch.Tensor | None = None, /) -> torch.Tensor:
    raise NotImplementedError


def _logical_sinks_before_star_args(
    x: torch.Tensor, sinks: torch.Tensor | None = None, *rest: torch.Tensor
) -> torch.Tensor:
    raise NotImplementedError


def _logical_no_default(x: torch.Tensor, *, sinks: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


DECLARATION_ERRORS = [
    pytest.param(
        lambda: make_chain(route=["sinkz"]), PolicyConfigError, "Did you mean 'sinks'", id="route-typo"
    ),
    pytest.param(
        lambda: kernel_chain(route=["sinks"])(_logical_positional_only_sinks),
        PolicyConfigError,
        r"'sinks' is positional-only \(before `/`\)",
        id="route-positional-only",
    ),
    pytest.param(
        lambda: kernel_chain(route=["sinks"])(_logical_sinks_before_star_args),
        PolicyConfigError,
        "'sinks' comes before \\*args",
        id="route-before-star-args",
    ),
    pytest.param(
        lambda: make_chain(hints=["sinks"]),
        PolicyConfigError,
        "sinks is both in route= and hints=",
        id="hint-overlap",
    ),
    pytest.param(
        lambda: make_chain(also_neutral={"out": [0]}),
        PolicyConfigError,
        "'out' is not a route keyword",
        id="also-neutral-not-route",
    ),
    pytest.param(
        lambda: make_chain(meaningful_with={"sinks": ["kk"]}),
        PolicyConfigError,
        "'kk' is not a parameter",
        id="meaningful-with-unknown",
    ),
    pytest.param(
        lambda: make_chain(route=[], selectors={"sinks": {}}),
        PolicyConfigError,
        "non-empty mapping",
        id="selector-empty",
    ),
    pytest.param(
        lambda: make_chain(route=[], selectors={"sinks": {1: "auto"}}),
        PolicyConfigError,
        "reserved",
        id="selector-auto",
    ),
    pytest.param(
        lambda: kernel_chain(route=["sinks"])(_logical_no_default),
        PolicyConfigError,
        "no default",
        id="route-no-default",
    ),
    pytest.param(
        lambda: make_chain(drop=["sinks"]), PolicyConfigError, "both in route= and drop=", id="overlap"
    ),
    pytest.param(
        lambda: make_chain(on_drop="wran"), PolicyConfigError, "Did you mean 'warn'", id="policy-typo"
    ),
    pytest.param(lambda: make_chain(on_drop={"outt": "copy"}), PolicyConfigError, "'outt'", id="policy-key"),
    pytest.param(
        lambda: make_chain(route="sinks"), PolicyConfigError, "list of keyword names", id="route-str"
    ),
    pytest.param(lambda: kernel_chain(name=" "), PolicyConfigError, "non-empty", id="empty-name"),
    pytest.param(lambda: kernel_chain(flags=["X"]), TypeError, "BoolFlag", id="flags-not-boolflag"),  # type: ignore[list-item]
    pytest.param(lambda: kernel_chain(provider="auto"), PolicyConfigError, "reserved", id="provider-auto"),
    pytest.param(lambda: kernel_chain()(torch.add), TypeError, "decorates a function", id="not-function"),
    pytest.param(
        lambda: kernel_chain(explicit_may_fall_back=1),  # type: ignore[arg-type]
        PolicyConfigError,
        "True or False",
        id="fall-back-not-bool",
    ),
]


@pytest.mark.parametrize(("declare", "error", "match"), DECLARATION_ERRORS)
def test_kernel_chain_options_are_checked_when_declared(
    declare: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        declare()


PROVIDER_ERRORS = [
    pytest.param(
        {"name": "fast", "loader": lambda: add}, PolicyConfigError, "already declared", id="duplicate"
    ),
    pytest.param(
        {"name": "FAST", "loader": lambda: add}, PolicyConfigError, "already declared", id="dup-case"
    ),
    pytest.param(
        {"name": "1st", "loader": lambda: add}, PolicyConfigError, "starts with a letter", id="bad-name"
    ),
    pytest.param({"name": "auto", "loader": lambda: add}, PolicyConfigError, "reserved", id="auto-name"),
    pytest.param({"name": "p", "target": "pkg.module"}, PolicyConfigError, "import path", id="no-colon"),
    pytest.param({"name": "p"}, PolicyConfigError, "exactly one", id="neither"),
    pytest.param(
        {"name": "p", "target": "a:b", "loader": lambda: add}, PolicyConfigError, "exactly one", id="both"
    ),
    pytest.param({"name": "p", "loader": 3}, TypeError, "not callable", id="loader-not-callable"),
    pytest.param(
        {"name": "p", "loader": lambda: add, "gate": "cuda"}, TypeError, "Gate objects", id="gate-type"
    ),
    pytest.param(
        {"name": "p", "loader": lambda: add, "unsupported": ["sinkz"]},
        PolicyConfigError,
        "Did you mean 'sinks'",
        id="unsupported-typo",
    ),
    pytest.param(
        {"name": "p", "loader": lambda: add, "unsupported": "sinks"},
        PolicyConfigError,
        "list of keywords .*got .sinks.",
        id="unsup-str",
    ),
    pytest.param(
        {"name": "p", "loader": lambda: add, "on_drop": {"alpha": "warn"}},
        PolicyConfigError,
        "which is not one of its keywords",
        id="on-drop-key",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), PROVIDER_ERRORS)
def test_provider_options_are_checked_when_declared(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    chain = make_chain()
    chain.provider("fast", loader=lambda: add)
    with pytest.raises(error, match=match):
        chain.provider(**kwargs)
    assert chain.chain.providers == ("fast",)


HELPER_ERRORS = [
    pytest.param(
        lambda: BoolFlag("1BAD", default=True, when_true=("a",), when_false=("b",)), "variable", id="var"
    ),
    pytest.param(
        lambda: BoolFlag("F", default=1, when_true=("a",), when_false=("b",)),  # type: ignore[arg-type]
        "True or False",
        id="dflt",
    ),
    pytest.param(
        lambda: BoolFlag("F", default=True, when_true=(), when_false=("b",)), "non-empty", id="empty"
    ),
    pytest.param(
        lambda: BoolFlag("F", default=True, when_true="ab", when_false=("b",)), "non-empty", id="str"
    ),
    pytest.param(
        lambda: BoolFlag("F", default=True, when_true=("a", "a"), when_false=("b",)), "twice", id="dup"
    ),
    pytest.param(lambda: cuda_capability(), "major versions", id="capability-empty"),
    pytest.param(lambda: cuda_capability(True), "major versions", id="capability-bool"),
    pytest.param(lambda: cuda_version(at_least="twelve"), "not a version", id="cuda-version"),
    pytest.param(lambda: torch_version(), "at_least=, below=", id="torch-version-empty"),
    pytest.param(lambda: platform_is(), "sys.platform", id="platform-empty"),
    pytest.param(lambda: Gate("", lambda: None), "description", id="gate-description"),
]


@pytest.mark.parametrize(("build", "match"), HELPER_ERRORS)
def test_flag_and_gate_options_are_checked(build: Callable[[], object], match: str) -> None:
    with pytest.raises(PolicyConfigError, match=match):
        build()


def test_chain_keeps_the_logical_name_doc_and_signature() -> None:
    chain = make_chain("toy_meta")
    chain.provider("fast", loader=lambda: add_sinks)
    assert chain.__name__ == "toy"
    assert chain.__doc__ == "Toy logical kernel."
    assert isinstance(chain.chain, KernelChain)
    assert inspect.signature(chain) == inspect.signature(chain.chain.logical)
    assert list(inspect.signature(chain).parameters) == ["x", "y", "alpha", "sinks", "out"]
    support = kwarg_support(chain)
    assert {"sinks", "out", "alpha"} <= support.names
    assert not support.open
    assert repr(chain.chain) == "<KernelChain toy_meta providers=['fast']>"
    chain(x, y)
    assert repr(chain.chain) == "<KernelChain toy_meta providers=['fast'] active='fast'>"


# -- loading ---------------------------------------------------------------------------


def test_loads_lazily_once_even_under_threads() -> None:
    loads: list[int] = []
    barrier = threading.Barrier(8)

    def loader() -> Callable[..., Any]:
        loads.append(1)
        return add

    chain = make_chain()
    chain.provider("fast", loader=loader)
    assert loads == []
    chain.describe(load=False)
    assert loads == []
    results: list[torch.Tensor] = []

    def call() -> None:
        barrier.wait()
        results.append(chain(x, y))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1]
    assert all(torch.equal(r, x + y) for r in results)


LOAD_FAILURES = [
    pytest.param(None, "ModuleNotFoundError: No module named 'kf_no_such_module_", id="missing-module"),
    pytest.param(
        "import ctypes\nctypes.CDLL('libkf_missing_fa3.so')\ndef kernel(x, y): return x\n",
        "OSError: libkf_missing_fa3.so: cannot open shared object file",
        id="missing-shared-object",
    ),
    pytest.param(
        "raise RuntimeError('CUDA error: no CUDA-capable device is detected')\n",
        "RuntimeError: CUDA error: no CUDA-capable device is detected",
        id="cuda-init-runtime-error",
    ),
    pytest.param(
        "import kf_dependency_that_is_not_installed\n",
        "No module named 'kf_dependency_that_is_not_installed'",
        id="missing-dependency",
    ),
    pytest.param(
        "def other(x, y): return x\n", "ImportError: cannot import name 'kernel'", id="missing-attribute"
    ),
]


@pytest.mark.parametrize(("source", "reason"), LOAD_FAILURES)
def test_real_load_failures_make_a_provider_unavailable(
    module_dir: Callable[[str], str], source: str | None, reason: str
) -> None:
    module = f"kf_no_such_module_{uuid.uuid4().hex[:6]}" if source is None else module_dir(source)
    chain = make_chain()
    chain.provider("native", f"{module}:kernel")
    chain.provider("ref", loader=lambda: add_sinks)
    with capture_fallbacks() as events:
        assert torch.equal(chain(x, y), x + y)
        chain(x, y)
    (event,) = provider_events(events)
    assert (event.fields["wanted"], event.fields["chosen"]) == ("native", "ref")
    assert reason in event.fields["reason"]
    (native,) = (p for p in chain.describe()["providers"] if p["name"] == "native")
    assert native["status"] == "unavailable"
    assert reason in native["reason"]


BUGS = [
    pytest.param("def kernel(:\n", SyntaxError, id="syntax-error"),
    pytest.param("import os\nos.no_such_function()\n", AttributeError, id="attribute-error-at-import"),
    pytest.param("1 / 0\n", ZeroDivisionError, id="zero-division-at-import"),
]


@pytest.mark.parametrize(("source", "error"), BUGS)
def test_bugs_in_a_provider_module_propagate(
    module_dir: Callable[[str], str], source: str, error: type[Exception]
) -> None:
    chain = make_chain()
    chain.provider("native", f"{module_dir(source)}:kernel")
    chain.provider("ref", loader=lambda: add_sinks)
    for _ in range(2):  # not cached as "unavailable": the bug shows on every attempt
        with pytest.raises(error):
            chain(x, y)
    assert stats() == []


def _raise(error: type[Exception]) -> Callable[[], Any]:
    def loader() -> Any:
        raise error("raised by the loader")  # a new one each time: no traceback kept alive

    return loader


LOADER_BUGS = [
    pytest.param(_raise(ValueError), ValueError, id="value-error"),
    pytest.param(_raise(RecursionError), RecursionError, id="recursion-error"),
    pytest.param(lambda: 42, TypeError, id="not-callable"),
]


@pytest.mark.parametrize(("loader", "error"), LOADER_BUGS)
def test_loader_bugs_propagate(loader: Callable[[], Any], error: type[Exception]) -> None:
    chain = make_chain()
    chain.provider("native", loader=loader)
    chain.provider("ref", loader=lambda: add_sinks)
    with pytest.raises(error):
        chain(x, y)


def test_closed_gate_skips_the_import(module_dir: Callable[[str], str]) -> None:
    # Importing this module would fail the test: a closed gate must prevent the import.
    module = module_dir("raise AssertionError('imported despite a closed gate')\n")
    chain = make_chain()
    chain.provider("native", f"{module}:kernel", gate=Gate("a test gate", lambda: "closed for the test"))
    chain.provider("ref", loader=lambda: add_sinks)
    with capture_fallbacks() as events:
        chain(x, y)
    (event,) = provider_events(events)
    assert event.fields["reason"] == "gate 'a test gate' is closed: closed for the test"


def test_gate_raising_a_load_error_is_closed_other_errors_propagate() -> None:
    def cuda_init() -> str | None:
        raise RuntimeError("CUDA driver initialization failed")

    assert Gate("CUDA", cuda_init).reason() == (
        "checking CUDA raised RuntimeError: CUDA driver initialization failed"
    )
    with pytest.raises(ZeroDivisionError):
        Gate("buggy", lambda: str(1 / 0)).reason()
    with pytest.raises(TypeError, match="return None or a reason"):
        Gate("wrong type", lambda: True).reason()  # type: ignore[arg-type,return-value]


NO_CUDA = not torch.cuda.is_available()
GATES = [
    pytest.param(cuda_available(), NO_CUDA, "CUDA", id="cuda-available"),
    pytest.param(cuda_capability(8, 9), NO_CUDA, "CUDA", id="capability"),
    pytest.param(cuda_version(at_least="12.3"), torch.version.cuda is None, "CUDA", id="cuda-version"),
    pytest.param(torch_version(at_least="2.0"), False, "", id="torch-new-enough"),
    pytest.param(torch_version(at_least="99.1"), True, "is not >= 99.1", id="torch-too-old"),
    pytest.param(
        torch_version(at_least="1.0", below="2.0"), True, "is not >= 1.0 and < 2.0", id="torch-too-new"
    ),
    pytest.param(platform_is(sys.platform), False, "", id="this-platform"),
    pytest.param(platform_is("plan9"), True, f"platform is {sys.platform}, not plan9", id="other-platform"),
]


@pytest.mark.parametrize(("gate", "closed", "reason"), GATES)
def test_real_gates_on_this_machine(gate: Gate, closed: bool, reason: str) -> None:
    got = gate.reason()
    assert (got is not None) == closed
    if closed:
        assert reason in (got or "")


@pytest.mark.parametrize("device", ["cpu", "meta"], ids=["cpu", "meta"])
def test_device_capability_is_zero_off_cuda(device: str) -> None:
    assert device_capability(torch.device(device)) == (0, 0)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_device_capability_matches_the_driver_on_cuda() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    assert device_capability(device) == torch.cuda.get_device_capability(device)


def test_provider_whose_positional_parameters_differ_is_unavailable() -> None:
    def swapped(y: torch.Tensor, x: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
        return x + alpha * y

    chain = make_chain()
    chain.provider("swapped", loader=lambda: swapped)
    chain.provider("ref", loader=lambda: add_sinks)
    assert chain.chain.active == "ref"
    (row,) = (p for p in chain.describe()["providers"] if p["name"] == "swapped")
    assert row["reason"] == (
        "its positional parameters (y, x) differ from the chain's (x, y): a positional call would bind "
        "the wrong arguments"
    )


def test_too_many_positional_arguments_raise_type_error() -> None:
    chain = make_chain()
    chain.provider("ref", loader=lambda: add_sinks)
    with pytest.raises(TypeError, match=r"takes at most 2 positional arguments \(x, y\) but 3 were given"):
        chain(x, y, 2.0)


def test_reset_retries_a_failed_load(module_dir: Callable[[str], str], tmp_path: Path) -> None:
    chain = make_chain()
    name = f"kf_later_{uuid.uuid4().hex[:6]}"
    chain.provider("native", f"{name}:kernel")
    chain.provider("ref", loader=lambda: add_sinks)
    assert chain.chain.active == "ref"
    (tmp_path / f"{name}.py").write_text("def kernel(x, y, *, alpha=1.0):\n    return x * 0\n")
    importlib.invalidate_caches()
    assert chain.chain.active == "ref"  # failures are remembered
    chain.reset()
    try:
        assert chain.chain.active == "native"
        assert torch.equal(chain(x, y), x * 0)
    finally:
        sys.modules.pop(name, None)


# -- selection -------------------------------------------------------------------------


def flagged_chain(var: str, **options: Any) -> Chain:
    flag = BoolFlag(var, default=True, when_true=("fast", "ref"), when_false=("other", "ref"))
    chain = make_chain(flags=[flag], **options)
    chain.provider("other", loader=lambda: add)
    chain.provider("fast", loader=lambda: add)
    chain.provider("ref", loader=lambda: add_sinks)
    return chain


@pytest.mark.parametrize(
    ("value", "active"),
    [(None, "fast"), ("1", "fast"), ("Yes", "fast"), ("on", "fast"), ("0", "other"), ("FALSE", "other")],
    ids=["unset-default", "1", "Yes", "on", "0", "FALSE"],
)
def test_bool_flag_picks_the_order(env: pytest.MonkeyPatch, value: str | None, active: str) -> None:
    chain = flagged_chain("KF_TEST_USE_FAST")
    if value is not None:
        env.setenv("KF_TEST_USE_FAST", value)
    reload_config()
    assert chain.chain.active == active
    described = chain.describe()
    assert described["mode"] == "automatic"
    assert described["selected_by"].startswith("KF_TEST_USE_FAST")


def test_invalid_boolean_raises_and_reload_keeps_the_previous_choice(env: pytest.MonkeyPatch) -> None:
    chain = flagged_chain("KF_TEST_USE_FAST")
    assert chain.chain.active == "fast"
    env.setenv("KF_TEST_USE_FAST", "ture")
    with pytest.raises(PolicyConfigError, match="Did you mean 'true'") as info:
        reload_config()
    assert "true, false, 1, 0, yes, no, on, off" in str(info.value)
    assert info.value.name == "KF_TEST_USE_FAST"
    assert chain.chain.active == "fast"


def test_invalid_boolean_raises_at_first_use(env: pytest.MonkeyPatch) -> None:
    env.setenv("KF_TEST_FRESH_FLAG", "maybe")
    reload_config()  # no live chain reads it yet
    chain = flagged_chain("KF_TEST_FRESH_FLAG")
    with pytest.raises(PolicyConfigError, match=r"KF_TEST_FRESH_FLAG='maybe' is not a boolean"):
        chain(x, y)
    assert chain.describe()["error"].startswith("PolicyConfigError: KF_TEST_FRESH_FLAG='maybe'")


def test_first_set_flag_decides() -> None:
    first = BoolFlag("KF_TEST_FIRST", default=False, when_true=("fast",), when_false=("ref",))
    second = BoolFlag("KF_TEST_SECOND", default=True, when_true=("other",), when_false=("ref",))
    chain = make_chain(flags=[first, second])
    for name in ("other", "fast", "ref"):
        chain.provider(name, loader=lambda: add_sinks)
    snap = kernel_fallback._config._read({"KF_TEST_SECOND": "1"})
    assert chain.chain.select(snap).order == ("other",)
    assert chain.chain.select(kernel_fallback._config._read({})).order == ("ref",)  # the first flag's default
    both = kernel_fallback._config._read({"KF_TEST_SECOND": "1", "KF_TEST_FIRST": "1"})
    assert chain.chain.select(both).order == ("fast",)


def test_flag_naming_an_undeclared_provider_raises() -> None:
    chain = make_chain(flags=[BoolFlag("KF_TEST_F", default=True, when_true=("hubb",), when_false=("ref",))])
    chain.provider("ref", loader=lambda: add_sinks)
    with pytest.raises(PolicyConfigError, match="lists 'hubb', which is not a declared provider"):
        chain(x, y)


def test_env_names_the_provider_explicitly(env: pytest.MonkeyPatch) -> None:
    chain = flagged_chain("KF_TEST_USE_FAST", name="toy_env")
    env.setenv("KERNEL_FALLBACK_PROVIDER__TOY_ENV", " REF ")
    reload_config()
    assert chain.chain.active == "ref"
    assert chain.describe()["mode"] == "explicit"
    env.setenv("KERNEL_FALLBACK_PROVIDER__TOY_ENV", "auto")
    reload_config()
    assert chain.chain.active == "fast"


def test_unknown_provider_name_lists_valid_ones(env: pytest.MonkeyPatch) -> None:
    chain = flagged_chain("KF_TEST_USE_FAST", name="toy-env.2")
    assert chain.chain.env_var == "KERNEL_FALLBACK_PROVIDER__TOY_ENV_2"
    env.setenv("KERNEL_FALLBACK_PROVIDER__TOY_ENV_2", "rfe")
    with pytest.raises(PolicyConfigError) as info:
        reload_config()
    assert str(info.value) == (
        "KERNEL_FALLBACK_PROVIDER__TOY_ENV_2='rfe' is not a provider of this chain; use one of "
        "other, fast, ref, auto. Did you mean 'ref'?"
    )
    assert info.value.allowed == ("other", "fast", "ref", "auto")


def test_use_beats_env_and_declaration(env: pytest.MonkeyPatch) -> None:
    chain = flagged_chain("KF_TEST_USE_FAST", name="toy_use", provider="other")
    assert chain.chain.active == "other"  # the declared explicit default
    env.setenv("KERNEL_FALLBACK_PROVIDER__TOY_USE", "ref")
    reload_config()
    assert chain.chain.active == "ref"  # the environment beats the declaration
    chain.use("fast")
    assert chain.chain.active == "fast"  # use() beats the environment
    chain.use("auto")
    assert chain.chain.active == "fast"
    assert chain.describe()["mode"] == "automatic"
    chain.use(None)
    assert chain.chain.active == "ref"
    with pytest.raises(PolicyConfigError, match="Did you mean 'fast'"):
        chain.use("fats")


# -- fallback rules --------------------------------------------------------------------


def broken_chain(**options: Any) -> Chain:
    chain = make_chain(name="toy_broken", **options)
    chain.provider("native", "kf_no_such_native_module:kernel")
    chain.provider("fast", loader=lambda: add)
    chain.provider("ref", loader=lambda: add_sinks)
    return chain


def test_automatic_fallback_emits_one_structured_event() -> None:
    chain = broken_chain()
    with capture_logs() as logs, capture_fallbacks() as events:
        for _ in range(5):
            assert torch.equal(chain(x, y), x + y)
    (event,) = provider_events(events)
    assert event.subject == "fast"
    (log,) = [entry for entry in logs if entry["event"] == "kernel_fallback.provider_fallback"]
    assert {k: log[k] for k in ("kernel", "wanted", "chosen", "mode", "source")} == {
        "kernel": "toy_broken",
        "wanted": "native",
        "chosen": "fast",
        "mode": "automatic",
        "source": "declaration order",
    }
    assert log["reason"] == "ModuleNotFoundError: No module named 'kf_no_such_native_module'"
    assert log["log_level"] == "warning"
    (row,) = [r for r in stats() if r["kind"] == "provider"]
    assert (row["kernel"], row["provider"], row["count"]) == ("toy_broken", "fast", 1)


def test_explicit_request_that_cannot_load_raises(env: pytest.MonkeyPatch) -> None:
    chain = broken_chain()
    env.setenv("KERNEL_FALLBACK_PROVIDER__TOY_BROKEN", "native")
    reload_config()
    with capture_fallbacks() as events, pytest.raises(ProviderUnavailableError) as info:
        chain(x, y)
    assert info.value.reasons == {"native": "ModuleNotFoundError: No module named 'kf_no_such_native_module'"}
    assert "requested by KERNEL_FALLBACK_PROVIDER__TOY_BROKEN='native'" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert events == []


def test_explicit_request_may_fall_back_when_declared(env: pytest.MonkeyPatch) -> None:
    chain = broken_chain(explicit_may_fall_back=True)
    chain.use("native")
    with capture_fallbacks() as events:
        assert chain.chain.active == "fast"
    (event,) = provider_events(events)
    assert (event.fields["mode"], event.fields["wanted"]) == ("explicit", "native")


def test_strict_turns_a_provider_fallback_into_an_error(env: pytest.MonkeyPatch) -> None:
    chain = broken_chain()
    env.setenv("KERNEL_FALLBACK_STRICT", "1")
    reload_config()
    with pytest.raises(ProviderUnavailableError, match="KERNEL_FALLBACK_STRICT is set") as info:
        chain(x, y)
    assert "KERNEL_FALLBACK_PROVIDER__TOY_BROKEN=fast" in str(info.value)
    chain.use("fast")  # an explicit choice that loads is no fallback
    assert torch.equal(chain(x, y), x + y)


def test_no_usable_provider_lists_every_reason() -> None:
    flag = BoolFlag("KF_TEST_ORDER", default=True, when_true=("native", "gated"), when_false=("spare",))
    chain = make_chain(name="toy_dead", flags=[flag])
    chain.provider("native", "kf_no_such_native_module:kernel")
    chain.provider("gated", loader=lambda: add, gate=platform_is("plan9"))
    chain.provider("spare", loader=lambda: add)
    with pytest.raises(ProviderUnavailableError) as info:
        chain(x, y)
    assert info.value.reasons == {
        "native": "ModuleNotFoundError: No module named 'kf_no_such_native_module'",
        "gated": f"gate 'platform plan9' is closed: platform is {sys.platform}, not plan9",
        "spare": "not selected: not in the order KF_TEST_ORDER unset (default true) selects",
    }
    assert str(info.value).startswith("toy_dead: no provider can be used (order from KF_TEST_ORDER unset")


def test_a_chain_without_providers_says_so() -> None:
    with pytest.raises(ProviderUnavailableError, match=r"no provider is declared; add one with toy_empty"):
        make_chain(name="toy_empty")(x, y)


# -- per-call dispatch -----------------------------------------------------------------


def test_keyword_the_active_provider_lacks_is_routed_with_one_event() -> None:
    chain = broken_chain()
    sinks = torch.full((4,), 10.0)
    with capture_logs() as logs, capture_fallbacks() as events:
        for _ in range(3):
            assert torch.equal(chain(x, y, sinks=sinks), x + y + sinks)
        assert torch.equal(chain(x, y, sinks=None), x + y)  # neutral: stays on the active provider
    dispatch = provider_events(events, "dispatch")
    assert [(e.subject, e.policy) for e in dispatch] == [("ref", "route:sinks")] * 3
    (log,) = [entry for entry in logs if entry["event"] == "kernel_fallback.dispatch"]
    assert {k: log[k] for k in ("kernel", "active", "chosen", "kwargs")} == {
        "kernel": "toy_broken",
        "active": "fast",
        "chosen": "ref",
        "kwargs": ["sinks"],
    }
    assert chain.chain.active == "fast"


def test_route_goes_to_a_provider_taking_every_passed_keyword() -> None:
    def only_scale(
        x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0, scale: float = 1.0
    ) -> torch.Tensor:
        return (x + alpha * y) * scale

    def both(
        x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0, sinks: Any = None, scale: float = 1.0
    ) -> torch.Tensor:
        return (add_sinks(x, y, alpha=alpha, sinks=sinks)) * scale

    @kernel_chain(route=["sinks", "scale"])
    def two(
        x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0, sinks: Any = None, scale: float = 1.0
    ) -> torch.Tensor:
        raise NotImplementedError

    two.provider("plain", loader=lambda: add)
    two.provider("sinks_only", loader=lambda: add_sinks)
    two.provider("scale_only", loader=lambda: only_scale)
    two.provider("both", loader=lambda: both)
    s = torch.ones(4)
    with capture_fallbacks() as events:
        assert torch.equal(two(x, y, sinks=s), x + y + s)
        assert torch.equal(two(x, y, scale=3.0), (x + y) * 3)
        assert torch.equal(two(x, y, sinks=s, scale=3.0), (x + y + s) * 3)
    assert [(e.subject, e.policy) for e in events if e.kind == "dispatch"] == [
        ("sinks_only", "route:sinks"),
        ("scale_only", "route:scale"),
        ("both", "route:sinks+scale"),
    ]


@pytest.mark.parametrize(
    ("on_drop", "outcome"),
    [("raise", "raises"), ("warn", "dropped")],
    ids=["default-raise", "warn"],
)
def test_when_no_provider_takes_the_keyword_its_policy_applies(on_drop: str, outcome: str) -> None:
    chain = make_chain(name="toy_nobody", on_drop={"out": "copy", "sinks": on_drop})
    chain.provider("fast", loader=lambda: add)
    with capture_fallbacks() as events:
        if outcome == "raises":
            with pytest.raises(
                UnsupportedKwargError, match=r"toy_nobody\.fast does not accept the keyword 'sinks'"
            ):
                chain(x, y, sinks=torch.ones(4))
        else:
            assert torch.equal(chain(x, y, sinks=torch.ones(4)), x + y)
    kinds = [(e.kind, e.kernel, e.subject) for e in events if e.kind != "provider"]
    assert kinds == ([] if outcome == "raises" else [("kwarg", "toy_nobody.fast", "sinks")])


def test_strict_forbids_rerouting(env: pytest.MonkeyPatch) -> None:
    chain = make_chain(name="toy_strict")
    chain.provider("fast", loader=lambda: add)
    chain.provider("ref", loader=lambda: add_sinks)
    env.setenv("KERNEL_FALLBACK_STRICT", "true")
    reload_config()
    assert torch.equal(chain(x, y), x + y)
    with pytest.raises(UnsupportedKwargError, match="KERNEL_FALLBACK_STRICT forbids re-routing") as info:
        chain(x, y, sinks=torch.ones(4))
    assert (info.value.kernel, info.value.kwarg) == ("toy_strict", "sinks")


def test_an_explicit_choice_is_not_rerouted() -> None:
    chain = broken_chain()
    chain.use("fast")
    with pytest.raises(UnsupportedKwargError, match="'sinks'"):
        chain(x, y, sinks=torch.ones(4))


def test_declared_unsupported_keyword_never_reaches_the_kernel() -> None:
    seen: list[dict[str, Any]] = []

    def ignores_sinks(x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        seen.append(kwargs)
        alpha: float = kwargs.get("alpha", 1.0)
        return x + alpha * y

    chain = make_chain()
    chain.provider("lenient", loader=lambda: ignores_sinks, unsupported=["sinks"])
    chain.provider("ref", loader=lambda: add_sinks)
    s = torch.ones(4)
    assert torch.equal(chain(x, y, sinks=s), x + y + s)
    assert torch.equal(chain(x, y, alpha=2.0, sinks=None), x + 2 * y)
    assert seen == [{"alpha": 2.0}]
    (row,) = (p for p in chain.describe()["providers"] if p["name"] == "lenient")
    assert row["signature"] == "signature + declared unsupported"
    assert row["lacks"] == ["sinks"]  # `out` goes into **kwargs: only declaring it would say otherwise


def test_out_is_copied_into_the_callers_buffer() -> None:
    chain = make_chain(name="toy_out")
    chain.provider("fast", loader=lambda: add)
    buf = torch.zeros(4)
    with capture_fallbacks() as events:
        result = chain(x, y, out=buf)
    assert result is buf
    assert torch.equal(buf, x + y)
    assert [(e.kind, e.kernel, e.subject, e.policy) for e in events] == [
        ("kwarg", "toy_out.fast", "out", "copy")
    ]


def test_signatures_are_read_once_per_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[object] = []
    real = kernel_fallback._signature.kwarg_support

    def counting(fn: object) -> Any:
        reads.append(fn)
        return real(fn)

    monkeypatch.setattr("kernel_fallback._providers.kwarg_support", counting)
    chain = broken_chain()
    for _ in range(50):
        chain(x, y)
        chain(x, y, sinks=torch.ones(4))
        chain(x, y, sinks=None, alpha=2.0)
    assert reads == [add, add_sinks]


# -- reload, describe ------------------------------------------------------------------


def test_reload_config_switches_the_provider(env: pytest.MonkeyPatch) -> None:
    chain = flagged_chain("KF_TEST_USE_FAST")
    assert chain.chain.active == "fast"
    env.setenv("KF_TEST_USE_FAST", "off")
    reload_config()
    assert chain.chain.active == "other"


def test_describe_says_why_each_provider_was_skipped() -> None:
    flag = BoolFlag(
        "KF_TEST_DESCRIBE", default=True, when_true=("native", "fast", "ref"), when_false=("hub",)
    )
    chain = make_chain(name="toy_describe", flags=[flag])
    chain.provider("hub", loader=lambda: add)
    chain.provider("native", "kf_no_such_native_module:kernel")
    chain.provider("fast", loader=lambda: add)
    chain.provider("ref", loader=lambda: add_sinks)
    before = chain.describe(load=False)
    assert [p["status"] for p in before["providers"]] == ["not loaded"] * 4
    chain(x, y)
    data = chain.describe()
    assert {k: data[k] for k in ("kernel", "active", "mode", "order", "strict", "error")} == {
        "kernel": "toy_describe",
        "active": "fast",
        "mode": "automatic",
        "order": ["native", "fast", "ref"],
        "strict": False,
        "error": None,
    }
    assert [(p["name"], p["position"], p["status"]) for p in data["providers"]] == [
        ("native", 1, "unavailable"),
        ("fast", 2, "active"),
        ("ref", 3, "not tried"),
        ("hub", None, "not selected"),
    ]
    chain(x, y, sinks=torch.ones(4))  # loads ref for the route
    assert [p["status"] for p in chain.describe()["providers"]] == [
        "unavailable",
        "active",
        "available",
        "not selected",
    ]
    gc.collect()  # chains of earlier tests, kept alive by exception tracebacks, go away
    assert [d for d in describe() if d["kernel"] == "toy_describe"] == [chain.describe()]
    table = chain.describe_table()
    assert table.splitlines()[:2] == [
        "toy_describe: active fast (automatic: KF_TEST_DESCRIBE unset (default true))",
        "  #  provider  status        detail",
    ]
    assert (
        "  1  native    unavailable   ModuleNotFoundError: No module named 'kf_no_such_native_module'"
        in table
    )
    assert (
        "  -  hub       not selected  not in the order KF_TEST_DESCRIBE unset (default true) selects" in table
    )
    assert "toy_describe: active fast" in describe_table()


# -- torch.compile ---------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiles_fullgraph_first_call_included_and_recompiles_only_on_reload(
    env: pytest.MonkeyPatch,
) -> None:
    chain = flagged_chain("KF_TEST_COMPILE")
    step = torch.compile(lambda a, b: chain(a, b, alpha=2.0) * 1.0, fullgraph=True, backend="eager")
    routed = torch.compile(lambda a, b, s: chain(a, b, sinks=s), fullgraph=True, backend="eager")
    s = torch.ones(4)
    with capture_fallbacks() as events:
        for _ in range(5):
            assert torch.equal(step(x, y), x + 2 * y)  # the very first call activates under tracing
            assert torch.equal(routed(x, y, s), x + y + s)
    assert unique_graphs() == 2
    (event,) = [e for e in events if e.kind == "dispatch"]
    assert event.compiled
    env.setenv("KF_TEST_COMPILE", "0")
    reload_config()
    assert torch.equal(step(x, y), x + 2 * y)
    assert chain.describe()["active"] == "other"
    assert unique_graphs() == 3


@pytest.mark.parametrize("disturb", ["reset", "reload_config"])
def test_routed_calls_survive_a_reset_or_reload_in_flight(disturb: str) -> None:
    def fast(x: torch.Tensor) -> torch.Tensor:
        return x

    def reference(x: torch.Tensor, *, sinks: torch.Tensor | None = None) -> torch.Tensor:
        return x + (0 if sinks is None else sinks)

    @kernel_chain(route=["sinks"], name=f"race_{disturb}")
    def toy(x: torch.Tensor, *, sinks: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    toy.provider("fast", loader=lambda: fast)
    toy.provider("torch", loader=lambda: reference)
    x, s = torch.ones(1), torch.ones(1)
    stop = threading.Event()
    action = toy.reset if disturb == "reset" else kernel_fallback.reload_config

    def disturber() -> None:
        while not stop.is_set():
            action()

    errors: list[str] = []
    thread = threading.Thread(target=disturber)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    with capture_logs():
        thread.start()
        try:
            for _ in range(20_000):
                try:
                    assert float(toy(x, sinks=s)) == 2.0
                except Exception as exc:  # noqa: BLE001 - collected, to report every kind at once
                    errors.append(f"{type(exc).__name__}: {exc}"[:100])
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(old)
    assert errors == []


def test_a_misspelt_provider_variable_is_an_error_not_a_silent_fallback(env: pytest.MonkeyPatch) -> None:
    chain = make_chain("near_miss_kernel")
    chain.provider("torch", loader=lambda: add)
    env.setenv("KERNEL_FALLBACK_PROVIDER__NEAR_MISS_KERNL", "torch")
    with pytest.raises(
        PolicyConfigError,
        match=r"KERNEL_FALLBACK_PROVIDER__NEAR_MISS_KERNL names no declared kernel\. Did you mean 'KERNEL_FALLBACK_PROVIDER__NEAR_MISS_KERNEL'\?",
    ):
        kernel_fallback.reload_config()
    env.setenv("KERNEL_FALLBACK_PROVIDER__SOMETHING_ELSE_ENTIRELY", "torch")  # may be declared later
    env.delenv("KERNEL_FALLBACK_PROVIDER__NEAR_MISS_KERNL")
    kernel_fallback.reload_config()
    assert chain.chain.active == "torch"
