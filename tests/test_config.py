"""Policies from environment variables: precedence, strict mode, validation, reload."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from kernel_fallback import (
    PolicyConfigError,
    UnsupportedKwargError,
    kernel_chain,
    reload_config,
    stats,
    tolerant_kwargs,
)
from kernel_fallback._config import (
    check_per_kernel_name,
    env_suffix,
    parse_bool,
    parse_policy_spec,
    per_kernel_near_miss,
)


def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def policy_of(wrapped: Any, kwarg: str = "out") -> tuple[str, str]:
    return wrapped.tolerant.policies[kwarg]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("env", "decorator", "expected"),
    [
        ({}, None, ("warn", "default")),
        ({"KERNEL_FALLBACK_ON_DROP": "copy"}, None, ("copy", "KERNEL_FALLBACK_ON_DROP")),
        ({"KERNEL_FALLBACK_ON_DROP": "copy"}, "raise", ("raise", "decorator")),
        (
            {"KERNEL_FALLBACK_ON_DROP__FA3_VARLEN": "copy"},
            "raise",
            ("copy", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
        ),
        (
            {"KERNEL_FALLBACK_ON_DROP__FA3_VARLEN": "copy", "SGLANG_FA3_ON_DROP": "warn"},
            "raise",
            ("warn", "SGLANG_FA3_ON_DROP"),
        ),
        (
            {"SGLANG_FA3_ON_DROP": "warn", "KERNEL_FALLBACK_STRICT": "yes"},
            "copy",
            ("raise", "KERNEL_FALLBACK_STRICT"),
        ),
        ({"KERNEL_FALLBACK_ON_DROP__FA3_VARLEN": ""}, "copy", ("copy", "decorator")),
        ({"KERNEL_FALLBACK_ON_DROP": " COPY "}, None, ("copy", "KERNEL_FALLBACK_ON_DROP")),
    ],
    ids=[
        "default",
        "global",
        "decorator-over-global",
        "kernel-var",
        "env-arg",
        "strict",
        "empty-is-unset",
        "case-space",
    ],
)
def test_precedence(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], decorator: str | None, expected: tuple[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reload_config()
    wrapped = tolerant_kwargs(["out"], decorator, name="fa3.varlen", env="SGLANG_FA3_ON_DROP")(kernel)
    assert policy_of(wrapped) == expected


def test_per_keyword_spec_in_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__MY_KERNEL", "out=copy, num_splits=warn")
    reload_config()
    wrapped = tolerant_kwargs({"out": None, "num_splits": 1, "sinks": None}, "raise", name="my-kernel")(
        kernel
    )
    assert policy_of(wrapped, "out") == ("copy", "KERNEL_FALLBACK_ON_DROP__MY_KERNEL")
    assert policy_of(wrapped, "num_splits") == ("warn", "KERNEL_FALLBACK_ON_DROP__MY_KERNEL")
    assert policy_of(wrapped, "sinks") == ("raise", "decorator")


def test_reload_applies_to_existing_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = tolerant_kwargs(["out"], "copy")(kernel)
    x, y, buf = torch.ones(2), torch.ones(2), torch.zeros(2)
    assert wrapped(x, y, out=buf) is buf
    monkeypatch.setenv("KERNEL_FALLBACK_STRICT", "1")
    assert wrapped(x, y, out=buf) is buf, "the environment is read at reload, not per call"
    reload_config()
    with pytest.raises(UnsupportedKwargError, match="KERNEL_FALLBACK_STRICT"):
        wrapped(x, y, out=buf)


def test_invalid_reload_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP", "copy")
    reload_config()
    first = tolerant_kwargs(["out"], name="first")(kernel)
    second = tolerant_kwargs(["out"], name="second")(kernel)
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP", "warn")
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__SECOND", "cpoy")
    with pytest.raises(
        PolicyConfigError, match="KERNEL_FALLBACK_ON_DROP__SECOND='cpoy' is not a policy"
    ) as info:
        reload_config()
    assert (info.value.name, info.value.value) == ("KERNEL_FALLBACK_ON_DROP__SECOND", "cpoy")
    assert info.value.allowed == ("warn", "copy", "raise")
    assert policy_of(first) == ("copy", "KERNEL_FALLBACK_ON_DROP")
    assert policy_of(second) == ("copy", "KERNEL_FALLBACK_ON_DROP")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "KERNEL_FALLBACK_ON_DROP",
            "wran",
            r"KERNEL_FALLBACK_ON_DROP='wran' is not a policy; use one of warn, copy, raise\. Did you mean 'warn'\?",
        ),
        (
            "KERNEL_FALLBACK_STRICT",
            "ture",
            r"KERNEL_FALLBACK_STRICT='ture' is not a boolean; use one of true, false, 1, 0, yes, no, on, off \(any case\)\. Did you mean 'true'\?",
        ),
        ("KERNEL_FALLBACK_STRICT", "2", r"KERNEL_FALLBACK_STRICT='2' is not a boolean"),
        (
            "KERNEL_FALLBACK_ON_DROP__K",
            "outt=copy",
            r"'outt' is not a keyword this kernel may drop; .* kwarg one of out\. Did you mean 'out'\?",
        ),
        (
            "KERNEL_FALLBACK_ON_DROP__K",
            "out=drop",
            r"KERNEL_FALLBACK_ON_DROP__K='out=drop': 'drop' \(for 'out'\) is not a policy",
        ),
        ("KERNEL_FALLBACK_ON_DROP__K", "out", r"KERNEL_FALLBACK_ON_DROP__K='out' is not a policy"),
    ],
    ids=["policy-typo", "bool-typo", "bool-number", "spec-kwarg-typo", "spec-policy", "bare-kwarg"],
)
def test_invalid_values_are_errors_not_defaults(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)

    def load_and_decorate() -> None:
        reload_config()  # global variables fail here, per-kernel ones at decoration
        tolerant_kwargs(["out"], name="k")(kernel)

    with pytest.raises(PolicyConfigError, match=message):
        load_and_decorate()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "KERNEL_FALLBACK_STICT",
            r"KERNEL_FALLBACK_STICT is not a variable kernel_fallback reads\. Did you mean 'KERNEL_FALLBACK_STRICT'\?",
        ),
        ("KERNEL_FALLBACK_ON_DROP_FA3", r"Did you mean 'KERNEL_FALLBACK_ON_DROP__FA3'\?"),
    ],
    ids=["typo", "single-underscore"],
)
def test_unknown_variable_under_the_prefix_is_an_error(
    monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(PolicyConfigError, match=message):
        reload_config()


def test_source_in_stats_follows_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = tolerant_kwargs(["out"], "warn", name="attn")(kernel)
    x = torch.ones(2)
    with capture_logs():
        wrapped(x, x, out=torch.zeros(2))
        monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__ATTN", "warn")
        reload_config()
        wrapped(x, x, out=torch.zeros(2))
    (row,) = stats()
    assert (row["count"], row["source"]) == (2, "KERNEL_FALLBACK_ON_DROP__ATTN")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(v, True) for v in ("1", "true", "TRUE", "Yes", "on", " on ")]
    + [(v, False) for v in ("0", "false", "False", "no", "OFF", "")],
)
def test_booleans(raw: str, expected: bool) -> None:
    assert parse_bool("X", raw) is expected


def test_env_suffix() -> None:
    assert env_suffix("sgl_kernel.flash_attn.varlen-v3") == "SGL_KERNEL_FLASH_ATTN_VARLEN_V3"


def test_policy_spec_single_and_mapping() -> None:
    assert parse_policy_spec("V", "Raise", ["out"]) == "raise"
    assert parse_policy_spec("V", "out=copy", ["out", "x"]) == {"out": "copy"}


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from kernel_fallback import tolerant_kwargs, UnsupportedKwargError

    @tolerant_kwargs(["out"], "warn", name="fa3")
    def fa3(x):
        return x * 2

    buf = torch.zeros(2)
    try:
        result = fa3(torch.ones(2), out=buf)
        outcome = "returned buffer" if result is buf else "returned new tensor"
    except UnsupportedKwargError as exc:
        outcome = "raised " + exc.kwarg
    print(json.dumps({"outcome": outcome, "buf": buf.tolist(), "policy": fa3.tolerant.policies["out"]}))
    """
)


@pytest.mark.parametrize(
    ("env", "outcome", "buf", "policy"),
    [
        ({}, "returned new tensor", [0.0, 0.0], ["warn", "decorator"]),
        (
            {"KERNEL_FALLBACK_ON_DROP__FA3": "copy"},
            "returned buffer",
            [2.0, 2.0],
            ["copy", "KERNEL_FALLBACK_ON_DROP__FA3"],
        ),
        ({"KERNEL_FALLBACK_STRICT": "on"}, "raised out", [0.0, 0.0], ["raise", "KERNEL_FALLBACK_STRICT"]),
    ],
    ids=["decorator", "kernel-var", "strict"],
)
def test_environment_set_before_import_in_a_real_process(
    env: dict[str, str], outcome: str, buf: list[float], policy: list[str]
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_FALLBACK_")}
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"outcome": outcome, "buf": buf, "policy": policy}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KERNEL_FALLBACK_ON_DROP": "ignore"}, "KERNEL_FALLBACK_ON_DROP='ignore' is not a policy"),
        (
            {"KERNEL_FALLBACK_ON_DROP__fa3": "raise"},
            "KERNEL_FALLBACK_ON_DROP__fa3='raise' names no declared kernel. "
            "Did you mean 'KERNEL_FALLBACK_ON_DROP__FA3' (kernel 'fa3')?",
        ),
    ],
    ids=["invalid-value", "lower-case-kernel-name"],
)
def test_invalid_variable_fails_the_process_at_decoration(env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_FALLBACK_")}
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"PolicyConfigError: {message}" in proc.stderr


# --- per-kernel variables that miss the kernel's name ----------------------------


@pytest.mark.parametrize(
    ("variable", "kernel_name", "meant"),
    [
        ("KERNEL_FALLBACK_ON_DROP__fa3", "fa3", "KERNEL_FALLBACK_ON_DROP__FA3"),
        ("KERNEL_FALLBACK_ON_DROP__FA3_VARLN", "fa3_varlen", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
        ("KERNEL_FALLBACK_ON_DROP___FA3_VARLEN", "fa3_varlen", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
        ("KERNEL_FALLBACK_ON_DROP__FA3__VARLEN", "fa3_varlen", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
        ("KERNEL_FALLBACK_ON_DROP__FA3_VARLEN_", "fa3_varlen", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
        ("KERNEL_FALLBACK_ON_DROP__FA3_VRALEN", "fa3_varlen", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
        ("KERNEL_FALLBACK_ON_DROP__Fa3_VarLen", "fa3.varlen", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
        ("KERNEL_FALLBACK_ON_DROP__FA3_VARLEEN", "fa3_varlen", "KERNEL_FALLBACK_ON_DROP__FA3_VARLEN"),
    ],
    ids=[
        "lower-case",
        "letter-left-out",
        "extra-underscore-lead",
        "double-underscore",
        "trailing-underscore",
        "swapped-letters",
        "mixed-case",
        "letter-added",
    ],
)
def test_a_misspelt_per_kernel_variable_is_an_error_at_decoration(
    monkeypatch: pytest.MonkeyPatch, variable: str, kernel_name: str, meant: str
) -> None:
    gc.collect()  # kernels of earlier tests that are not yet collected would be named in the hint
    monkeypatch.setenv(variable, "raise")
    reload_config()
    with pytest.raises(
        PolicyConfigError, match=re.escape(f"Did you mean {meant!r} (kernel {kernel_name!r})?")
    ) as info:
        tolerant_kwargs(["out"], name=kernel_name)(kernel)
    assert (info.value.name, info.value.value, info.value.allowed) == (variable, "raise", (meant,))
    assert info.value.args[0].startswith(f"{variable}='raise' names no declared kernel.")


@pytest.mark.parametrize(
    "variable",
    ["KERNEL_FALLBACK_ON_DROP__reload_attn", "KERNEL_FALLBACK_ON_DROP__RELOAD_ATN"],
    ids=["lower-case", "letter-left-out"],
)
def test_a_misspelt_per_kernel_variable_set_after_declaration_fails_the_reload(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    gc.collect()
    declared = tolerant_kwargs(["out"], name="reload_attn")(kernel)
    monkeypatch.setenv(variable, "raise")
    with pytest.raises(
        PolicyConfigError, match=re.escape("Did you mean 'KERNEL_FALLBACK_ON_DROP__RELOAD_ATTN'")
    ):
        reload_config()
    # All or nothing: the kernel keeps the policy it had, and still serves.
    x = torch.ones(2)
    assert declared.tolerant.policies["out"][0] == "warn"
    torch.testing.assert_close(declared(x, x, out=torch.empty(2)), x + x)


@pytest.mark.parametrize(
    ("first", "second"),
    [("fa3_varlen", "fa2_varlen"), ("attn", "attn2"), ("varlen_fwd", "varlen_bwd"), ("mha", "mla")],
    ids=["digit-changed", "digit-added", "letter-changed", "short-names"],
)
def test_two_real_kernels_with_close_names_both_take_their_variable(
    monkeypatch: pytest.MonkeyPatch, first: str, second: str
) -> None:
    # Both variables are set before either kernel is declared: declaring the first must not
    # mistake the second's variable for a typo of its own.
    first_var = "KERNEL_FALLBACK_ON_DROP__" + env_suffix(first)
    second_var = "KERNEL_FALLBACK_ON_DROP__" + env_suffix(second)
    monkeypatch.setenv(first_var, "copy")
    monkeypatch.setenv(second_var, "raise")
    reload_config()
    one = tolerant_kwargs(["out"], name=first)(kernel)
    two = tolerant_kwargs(["out"], name=second)(kernel)
    assert policy_of(one) == ("copy", first_var)
    assert policy_of(two) == ("raise", second_var)


def test_a_per_kernel_variable_close_to_nothing_is_left_for_a_later_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__PAGED_DECODE", "copy")
    reload_config()
    tolerant_kwargs(["out"], name="fa3_varlen")(kernel)
    later = tolerant_kwargs(["out"], name="paged_decode")(kernel)
    assert policy_of(later) == ("copy", "KERNEL_FALLBACK_ON_DROP__PAGED_DECODE")


@pytest.mark.parametrize(
    ("variable", "declared", "meant"),
    [
        ("KERNEL_FALLBACK_ON_DROP__FA3", ["fa3"], None),
        ("KERNEL_FALLBACK_ON_DROP__fa3", ["fa3"], "KERNEL_FALLBACK_ON_DROP__FA3"),
        ("KERNEL_FALLBACK_PROVIDER__flash_attn", ["flash.attn"], "KERNEL_FALLBACK_PROVIDER__FLASH_ATTN"),
        ("KERNEL_FALLBACK_ON_DROP__FA2", ["fa3"], None),
        ("KERNEL_FALLBACK_ON_DROP__NS_OP", ["ns::op"], "KERNEL_FALLBACK_ON_DROP__NS__OP"),
        ("KERNEL_FALLBACK_STRICT", ["strict"], None),
    ],
    ids=["exact", "case", "provider-prefix", "other-kernel", "operator-name", "not-per-kernel"],
)
def test_per_kernel_near_miss(variable: str, declared: list[str], meant: str | None) -> None:
    assert per_kernel_near_miss(variable, declared) == meant


@pytest.mark.parametrize(
    "variable",
    ["KERNEL_FALLBACK_PROVIDER__nm_flash_attn", "KERNEL_FALLBACK_PROVIDER___NM_FLASH__ATTN"],
    ids=["lower-case", "extra-underscores"],
)
def test_a_provider_variable_in_another_case_is_a_near_miss_too(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    @kernel_chain(name="nm_flash.attn")
    def attn(x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    attn.provider("torch", loader=lambda: lambda x: x)
    monkeypatch.setenv(variable, "torch")
    with pytest.raises(
        PolicyConfigError,
        match=re.escape(
            f"{variable} names no declared kernel. Did you mean 'KERNEL_FALLBACK_PROVIDER__NM_FLASH_ATTN'?"
        ),
    ):
        reload_config()


def test_check_per_kernel_name_for_the_config_command() -> None:
    check_per_kernel_name("KERNEL_FALLBACK_ON_DROP__FA3", "copy", ["fa3"])  # exact: fine
    with pytest.raises(PolicyConfigError, match=r"Did you mean 'KERNEL_FALLBACK_ON_DROP__FA3'"):
        check_per_kernel_name("KERNEL_FALLBACK_ON_DROP__fa3", "copy", ["fa3", "fa2"])


# --- values as written -------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "KERNEL_FALLBACK_ON_DROP",
        "KERNEL_FALLBACK_STRICT",
        "KERNEL_FALLBACK_LOG_FORMAT",
        "KERNEL_FALLBACK_LOG_FILE",
        "KERNEL_FALLBACK_ON_DROP__BLANK",
        "SGLANG_BLANK_ON_DROP",
        "KERNEL_FALLBACK_NOT_A_VARIABLE",
    ],
    ids=["on-drop", "strict", "log-format", "log-file", "per-kernel", "env-arg", "unknown-name"],
)
@pytest.mark.parametrize("blank", [" ", "\t", " \n "], ids=["space", "tab", "newline"])
def test_whitespace_only_means_unset_for_every_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, blank: str
) -> None:
    monkeypatch.setenv(name, blank)
    snap = reload_config()
    assert (snap.default_policy, snap.strict, snap.log_format, snap.log_file) == (None, False, None, None)
    wrapped = tolerant_kwargs(["out"], "copy", name="blank", env="SGLANG_BLANK_ON_DROP")(kernel)
    assert policy_of(wrapped) == ("copy", "decorator")


def test_a_keyword_given_twice_in_a_spec_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__TWICE", "out=copy, out=raise")
    reload_config()
    with pytest.raises(
        PolicyConfigError,
        match=re.escape("KERNEL_FALLBACK_ON_DROP__TWICE='out=copy, out=raise': 'out' is given twice"),
    ):
        tolerant_kwargs(["out"], name="twice")(kernel)


@pytest.mark.parametrize(
    ("name", "value", "quoted"),
    [
        ("KERNEL_FALLBACK_ON_DROP", " WRAN ", "KERNEL_FALLBACK_ON_DROP=' WRAN ' is not a policy"),
        ("KERNEL_FALLBACK_ON_DROP__QUOTE", "Cpoy", "KERNEL_FALLBACK_ON_DROP__QUOTE='Cpoy' is not a policy"),
        (
            "KERNEL_FALLBACK_ON_DROP__QUOTE",
            "out=DROP",
            "KERNEL_FALLBACK_ON_DROP__QUOTE='out=DROP': 'DROP' (for 'out') is not a policy",
        ),
        ("KERNEL_FALLBACK_STRICT", "Maybe", "KERNEL_FALLBACK_STRICT='Maybe' is not a boolean"),
        ("KERNEL_FALLBACK_LOG_FORMAT", "JSONL", "KERNEL_FALLBACK_LOG_FORMAT='JSONL' is not a log format"),
    ],
    ids=["global-policy", "kernel-policy", "spec-policy", "bool", "log-format"],
)
def test_errors_quote_the_value_as_written(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, quoted: str
) -> None:
    monkeypatch.setenv(name, value)

    def load_and_decorate() -> None:
        reload_config()
        tolerant_kwargs(["out"], name="quote")(kernel)

    with pytest.raises(PolicyConfigError) as info:
        load_and_decorate()
    assert quoted in str(info.value)
    assert info.value.value == value


@pytest.mark.parametrize(
    "env",
    ["A\n", "A B", "1A", "", "A=B", "É"],
    ids=["newline", "space", "digit-first", "empty", "equals", "non-ascii"],
)
def test_env_argument_must_be_a_variable_name(env: str) -> None:
    def decorate() -> None:
        tolerant_kwargs(["out"], env=env)(kernel)

    with pytest.raises(PolicyConfigError, match=r"tolerant_kwargs\(env=.*environment variable name") as info:
        decorate()
    assert info.value.value == env


def test_concurrent_reloads_number_each_snapshot_once() -> None:
    # Many kernels make each reload long enough for the threads to overlap.
    kept = [tolerant_kwargs(["out"], name=f"reload_race_{i}")(kernel) for i in range(50)]
    versions: list[int] = []
    errors: list[BaseException] = []

    def reload_many() -> None:
        try:
            for _ in range(300):
                versions.append(reload_config().version)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        threads = [threading.Thread(target=reload_many) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors
    duplicates = len(versions) - len(set(versions))
    assert duplicates == 0, f"{duplicates} of {len(versions)} snapshots share a version"
    assert all(plan.tolerant.policies["out"] == ("warn", "default") for plan in kept)


@pytest.mark.parametrize(
    "env",
    [
        "KERNEL_FALLBACK_STRICT",
        "KERNEL_FALLBACK_ON_DROP__MY_ATTN",
        "KERNEL_FALLBACK_MY_ATTN",
        "kernel_fallback_x",
    ],
    ids=["global-variable", "per-kernel-variable", "new-name", "lower-case"],
)
def test_env_argument_may_not_name_a_library_variable(env: str) -> None:
    def decorate() -> None:
        tolerant_kwargs(["out"], name="my_attn", env=env)(kernel)

    with pytest.raises(PolicyConfigError, match=r"env=.*belong to kernel_fallback") as info:
        decorate()
    assert info.value.name == "env"
    assert info.value.value == env


def test_every_fixed_variable_the_package_names_is_registered() -> None:
    # `kernel-fallback config` calls a set KERNEL_FALLBACK_* name it does not know a typo:
    # a variable some module reads but the registry lacks would fail every config run.
    import kernel_fallback
    from kernel_fallback._config import PER_KERNEL_PREFIXES, VARIABLES

    root = os.path.dirname(kernel_fallback.__file__)
    named: set[str] = set()
    for folder, _, files in os.walk(root):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(folder, file), encoding="utf-8") as source:
                    named |= set(re.findall(r"[\"'](KERNEL_FALLBACK_[A-Z0-9_]+)[\"']", source.read()))
    fixed = {name for name in named if not name.startswith(PER_KERNEL_PREFIXES) and not name.endswith("_")}
    assert "KERNEL_FALLBACK_TRITON" in fixed, "the scan must see the integration's variable"
    assert fixed <= set(VARIABLES), sorted(fixed - set(VARIABLES))
