"""The pytest plugin, run by pytest's own pytester on small test suites."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "kernel_fallback.pytest_plugin")

#: Header of every generated test module: a kernel that lacks `out`, one that lacks
#: `num_splits`, and helpers that take those fallbacks.
KERNELS = textwrap.dedent(
    """
    import pytest
    import torch
    from kernel_fallback import tolerant_kwargs

    @tolerant_kwargs(drop=["out"], on_drop="copy", name="pt_add")
    def pt_add(x, y):
        return torch.add(x, y)

    @tolerant_kwargs(drop={"num_splits": 1}, name="pt_attn")
    def pt_attn(q):
        return q * 2

    def drop_out():
        pt_add(torch.ones(2), torch.ones(2), out=torch.empty(2))

    def drop_splits():
        pt_attn(torch.ones(2), num_splits=3)
    """
)


@pytest.fixture(autouse=True)
def only_this_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs load the plugin with -p only, even once the entry point is installed."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def make_tests(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_inner=KERNELS + textwrap.dedent(body))


def test_marker_fails_a_test_with_a_fallback(pytester: pytest.Pytester) -> None:
    make_tests(
        pytester,
        """
        @pytest.mark.no_fallbacks
        def test_falls_back():
            drop_out()
            drop_out()

        @pytest.mark.no_fallbacks
        def test_clean():
            pt_add(torch.ones(2), torch.ones(2))

        def test_unmarked_may_fall_back():
            drop_out()
        """,
    )
    result = pytester.runpytest(*PLUGIN, "--strict-markers")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "1 fallback(s) not allowed:",
            "*pt_add: keyword 'out' dropped (policy copy) x2, first at *test_inner.py:*",
            "*@pytest.mark.allow_fallback('pt_add:out') on test_falls_back*",
            "FAILED *test_falls_back - Failed: 1 fallback(s) not allowed:",
        ]
    )
    result.stdout.no_fnmatch_line("*During handling*")


def test_fixture_fails_a_test_with_a_fallback(pytester: pytest.Pytester) -> None:
    make_tests(
        pytester,
        """
        def test_falls_back(no_fallbacks):
            drop_splits()

        def test_clean(no_fallbacks):
            pass
        """,
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*pt_attn: keyword 'num_splits' dropped (policy warn) x1*"])


@pytest.mark.parametrize("how", ["option", "ini"], ids=["command-line", "ini"])
def test_strict_mode_covers_every_test_with_allowances(pytester: pytest.Pytester, how: str) -> None:
    make_tests(
        pytester,
        """
        def test_not_allowed():
            drop_out()

        @pytest.mark.allow_fallback("pt_add:out")
        def test_allowed_by_marker():
            drop_out()

        @pytest.mark.allow_fallback("pt_add:*", "pt_attn:num_splits")
        def test_allowed_by_marker_globs():
            drop_out()
            drop_splits()

        @pytest.mark.allow_fallback("pt_add:out")
        def test_marker_allows_only_what_it_names():
            drop_out()
            drop_splits()

        def test_clean():
            pass
        """,
    )
    if how == "ini":
        pytester.makeini("[pytest]\nkernel_fallback_strict = true\n")
        result = pytester.runpytest(*PLUGIN)
    else:
        result = pytester.runpytest(*PLUGIN, "--kernel-fallback-strict")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["kernel_fallback: strict mode on; allowed: nothing"])
    result.stdout.fnmatch_lines(
        ["FAILED *test_not_allowed*", "FAILED *test_marker_allows_only_what_it_names*"]
    )


@pytest.mark.parametrize(
    "source",
    ["env", "ini", "option"],
    ids=["KERNEL_FALLBACK_ALLOW", "ini-kernel_fallback_allow", "option"],
)
def test_suite_allow_list(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    make_tests(
        pytester,
        """
        def test_accepted():
            drop_out()
            drop_splits()

        def test_other_kernel():
            from kernel_fallback import tolerant_kwargs
            tolerant_kwargs(drop=["out"], name="pt_other")(lambda x: x)(1, out=torch.empty(1))
        """,
    )
    args = [*PLUGIN, "--kernel-fallback-strict"]
    if source == "env":
        monkeypatch.setenv("KERNEL_FALLBACK_ALLOW", "pt_add:out, pt_attn:*")
    elif source == "ini":
        pytester.makeini("[pytest]\nkernel_fallback_allow =\n    pt_add:out\n    pt_attn:*\n")
    else:
        args += ["--kernel-fallback-allow", "pt_add:out", "--kernel-fallback-allow", "pt_attn:*"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*allowed: pt_add:out, pt_attn:*", "*pt_other: keyword 'out' dropped*"])


def test_strict_mode_covers_fixtures(pytester: pytest.Pytester) -> None:
    make_tests(
        pytester,
        """
        @pytest.fixture
        def warm_cache():
            drop_out()
            yield
            drop_splits()

        def test_uses_fixture(warm_cache):
            pass
        """,
    )
    result = pytester.runpytest(*PLUGIN, "--kernel-fallback-strict")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_uses_fixture*",
            "*pt_add: keyword 'out' dropped*",
            "*ERROR at teardown of test_uses_fixture*",
            "*pt_attn: keyword 'num_splits' dropped*",
        ]
    )


def test_expect_fallback_marker_and_fixture(pytester: pytest.Pytester) -> None:
    make_tests(
        pytester,
        """
        @pytest.mark.expect_fallback(kernel="pt_add", kwarg="out")
        def test_expected_happens():
            drop_out()

        @pytest.mark.expect_fallback(kernel="pt_add", kwarg="out")
        def test_expected_missing():
            pt_add(torch.ones(2), torch.ones(2))

        @pytest.mark.expect_fallback(kernel="pt_attn", kwarg="num_splits", count=2)
        def test_expected_count_wrong():
            drop_splits()

        def test_fixture(expect_fallback):
            with expect_fallback(kernel="pt_attn", kwarg="num_splits") as seen:
                drop_splits()
            assert len(seen) == 1

        def test_fixture_missing(expect_fallback):
            with expect_fallback(kernel="pt_attn"):
                drop_out()
        """,
    )
    # Strict mode too: an expected fallback is allowed.
    result = pytester.runpytest(*PLUGIN, "--kernel-fallback-strict", "--strict-markers")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*expected a fallback with kernel='pt_add', kwarg='out', got 0; no fallback was recorded.",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*expected exactly 2 x a fallback with kernel='pt_attn', kwarg='num_splits', got 1*"]
    )
    result.stdout.fnmatch_lines(
        ["*expected a fallback with kernel='pt_attn', got 0; recorded instead: pt_add: keyword 'out'*"]
    )


def test_a_failing_test_keeps_its_own_error(pytester: pytest.Pytester) -> None:
    make_tests(
        pytester,
        """
        @pytest.mark.no_fallbacks
        def test_boom():
            drop_out()
            raise KeyError("the test's own failure")
        """,
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(['*KeyError: "the test\'s own failure"'])
    result.stdout.no_fnmatch_line("*FallbackAssertionError*")


@pytest.mark.parametrize(
    ("ini", "env", "message"),
    [
        (
            "kernel_fallback_allow = pt_add\n",
            None,
            "*ini kernel_fallback_allow: 'pt_add' is not a 'kernel:kwarg' pattern*",
        ),
        ("", ":out", "*KERNEL_FALLBACK_ALLOW: ':out' is not a 'kernel:kwarg' pattern*"),
    ],
    ids=["ini", "env"],
)
def test_bad_allow_list_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ini: str, env: str | None, message: str
) -> None:
    make_tests(pytester, "def test_nothing():\n    pass\n")
    pytester.makeini("[pytest]\n" + ini)
    if env is not None:
        monkeypatch.setenv("KERNEL_FALLBACK_ALLOW", env)
    result = pytester.runpytest(*PLUGIN)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_marker_pattern_is_a_usage_error(pytester: pytest.Pytester) -> None:
    make_tests(
        pytester,
        """
        @pytest.mark.allow_fallback("pt_add")
        def test_marked():
            pass
        """,
    )
    result = pytester.runpytest(*PLUGIN, "--kernel-fallback-strict")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["*test_marked: @pytest.mark.allow_fallback: 'pt_add' is not a 'kernel:kwarg'*"]
    )
    # One error for one bad marker: reported at set-up, not again at teardown.
    result.assert_outcomes(errors=1)
    assert result.stdout.str().count("ERROR at ") == 1, result.stdout.str()


def test_no_header_and_no_effect_when_off(pytester: pytest.Pytester) -> None:
    make_tests(pytester, "def test_falls_back():\n    drop_out()\n")
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("kernel_fallback:*")
