"""The ``kernel-fallback`` command (also ``python -m kernel_fallback``).

- ``report FILES...``: merge JSON-lines logs of many processes into one table of
  fallbacks with counts, processes and first seen (``--format json`` for data);
- ``check FILES... [--allow kernel:kwarg ...]``: exit 1 when the logs show a fallback
  that is not allowed (also ``KERNEL_FALLBACK_ALLOW``), for CI;
- ``config [--import MODULE ...]``: validate every ``KERNEL_FALLBACK_*`` variable and
  print the effective settings and each registered kernel's policies.

Exit status: 0 fine; 1 a finding (a fallback not allowed, an invalid variable); 2 a
usage error, a file that cannot be read or a malformed event. User mistakes are
reported in one line on standard error, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, TextIO

from kernel_fallback import _config
from kernel_fallback._allow import AllowList
from kernel_fallback._logread import FallbackRow, LogInputError, LogReport, read_logs
from kernel_fallback.exceptions import PolicyConfigError

__all__ = ["main"]

PROG = "kernel-fallback"
EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read kernel_fallback event logs, gate CI on them, and check its configuration.",
        epilog="Exit status: 0 ok, 1 a fallback not allowed or an invalid variable, "
        "2 a usage or input error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = sub.add_parser("report", help="merge JSON-lines logs into a table of fallbacks")
    report.add_argument("files", nargs="+", metavar="FILE", help="log files (.gz too; - for stdin)")
    report.add_argument("--format", choices=("table", "json"), default="table", help="output format")

    check = sub.add_parser("check", help="exit 1 when the logs show a fallback that is not allowed")
    check.add_argument("files", nargs="+", metavar="FILE", help="log files (.gz too; - for stdin)")
    check.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="KERNEL:KWARG",
        help="an accepted fallback (fnmatch patterns, e.g. 'my_kernel:out', 'my_kernel:*'); "
        f"repeat or separate with commas; {_config.ENV_ALLOW} is added",
    )
    check.add_argument("--format", choices=("table", "json"), default="table", help="output format")

    config = sub.add_parser(
        "config", help="validate KERNEL_FALLBACK_* variables, show the effective policies"
    )
    config.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so the kernels it declares are shown and their variables checked",
    )
    config.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad arguments (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "report":
            return _report(args, sys.stdout)
        if args.command == "check":
            return _check(args, sys.stdout)
        return _show_config(args, sys.stdout)
    except (_UsageError, LogInputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader (`| head`) went away: not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# --- report and check -------------------------------------------------------------


def _count(row: FallbackRow) -> str:
    return str(row.count) if row.exact else f">={row.count}"


def _table(rows: Sequence[FallbackRow], out: TextIO) -> None:
    header = ("KERNEL", "KIND", "KWARG/PROVIDER", "POLICY", "COUNT", "PROCS", "FIRST SEEN (UTC)", "WHERE")
    cells = [
        (
            r.kernel,
            r.kind,
            r.subject,
            r.policy,
            _count(r),
            str(r.processes),
            r.first_seen[:19].replace("T", " "),
            r.where,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    for line in (header, *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def _footer(report: LogReport, out: TextIO) -> None:
    print(
        f"{len(report.files)} file(s), {report.lines} line(s): {report.events} kernel_fallback event(s) "
        f"from {report.processes} process(es); {report.ignored} line(s) ignored "
        "(not kernel_fallback JSON events).",
        file=out,
    )
    if any(not r.exact for r in report.rows):
        print(
            ">=N: some processes logged a first occurrence but no summary (killed, or exited "
            "before flush()); N is a lower bound.",
            file=out,
        )
    _note_if_nothing_read(report)


def _note_if_nothing_read(report: LogReport) -> None:
    # Lines but no events of ours: console-format logs would pass a gate vacuously.
    if report.events == 0 and report.ignored:
        print(
            f"note: no kernel_fallback JSON events found; were the logs written with "
            f"{_config.ENV_LOG_FORMAT}=json?",
            file=sys.stderr,
        )


def _report(args: argparse.Namespace, out: TextIO) -> int:
    report = read_logs(args.files)
    if args.format == "json":
        json.dump(report.as_dict(), out, indent=2)
        print(file=out)
        return EXIT_OK
    if report.rows:
        _table(report.rows, out)
    else:
        print("No fallbacks.", file=out)
    _footer(report, out)
    return EXIT_OK


def _allow_list(specs: Sequence[str]) -> AllowList:
    try:
        return AllowList.parse("--allow", specs) + AllowList.from_env()
    except PolicyConfigError as exc:
        raise _UsageError(str(exc)) from exc


def _check(args: argparse.Namespace, out: TextIO) -> int:
    allow = _allow_list(args.allow)
    report = read_logs(args.files)
    if report.unreadable_ours:
        # A gate must not pass on fallbacks it could not read.
        raise _UsageError(
            f"{report.unreadable_ours} line(s) name kernel_fallback events but are not JSON; "
            f"write the logs with {_config.ENV_LOG_FORMAT}=json (or configure_logging(format='json'))."
        )
    denied = [r for r in report.rows if not allow.allows(r.kernel, r.subject)]
    accepted = [r for r in report.rows if r not in denied]
    unused = [
        p for p in allow.patterns if not any(AllowList((p,)).allows(r.kernel, r.subject) for r in accepted)
    ]
    if args.format == "json":
        data = {
            "ok": not denied,
            "denied": [r.as_dict() for r in denied],
            "allowed": [r.as_dict() for r in accepted],
            "unused_allow": unused,
            **{k: v for k, v in report.as_dict().items() if k != "fallbacks"},
        }
        json.dump(data, out, indent=2)
        print(file=out)
    elif denied:
        print(f"{PROG} check: FAILED: {len(denied)} fallback(s) not allowed:", file=out)
        _table(denied, out)
        patterns = ",".join(sorted({f"{r.kernel}:{r.subject}" for r in denied}))
        print(
            f"Fix them, or accept them with --allow {patterns} or {_config.ENV_ALLOW}={patterns}.", file=out
        )
    else:
        what = f"{len(accepted)} fallback(s), all allowed" if accepted else "no fallbacks"
        print(
            f"{PROG} check: ok: {what} ({report.events} event(s) in {len(report.files)} file(s)).", file=out
        )
    if unused and args.format != "json":
        print(f"note: allowed but not seen (stale allow-list?): {', '.join(unused)}", file=sys.stderr)
    _note_if_nothing_read(report)
    return EXIT_FINDING if denied else EXIT_OK


# --- config ------------------------------------------------------------------------


def _check_policy_values(name: str, raw: str) -> None:
    """Check the policies in ``warn`` or ``kwarg=policy,...`` without knowing the kernel."""
    # The keywords it names are the only ones we know of: let the one parser check it.
    _config.parse_policy_spec(name, raw, [item.partition("=")[0].strip() for item in raw.split(",")])


def _check_variable(name: str, raw: str, kernels: Sequence[Any]) -> tuple[str, str]:
    """(status, message) of one KERNEL_FALLBACK_* variable: ok, invalid, unknown or unchecked."""
    try:
        if name == _config.ENV_ON_DROP:
            if raw:
                _config.check_policy(name, raw.strip().lower())
        elif name == _config.ENV_STRICT:
            _config.parse_bool(name, raw)
        elif name == _config.ENV_LOG_FORMAT:
            if raw:
                _config.parse_log_format(name, raw)
        elif name == _config.ENV_LOG_FILE:
            if raw:
                _config.check_log_file(name, raw)
        elif name == _config.ENV_ALLOW:
            AllowList.parse(name, raw)
        elif name.startswith(_config.ENV_ON_DROP_PREFIX):
            return _check_per_kernel(name, raw, kernels)
        elif name.startswith(_config.ENV_PROVIDER_PREFIX):
            return _check_provider(name)
        else:
            _config.check_known_variables({name: raw})  # raises for a set, unknown name
            return "unknown", "empty, and not a variable kernel_fallback reads." + _unknown_hint(
                name, kernels
            )
    except PolicyConfigError as exc:
        return "invalid", str(exc)
    return "ok", ""


def _check_per_kernel(name: str, raw: str, kernels: Sequence[Any]) -> tuple[str, str]:
    suffix = name[len(_config.ENV_ON_DROP_PREFIX) :]
    matching = [k for k in kernels if _config.env_suffix(k.name) == suffix]
    for kernel in matching:
        _config.parse_policy_spec(name, raw, kernel.neutral)
    if matching:
        return "ok", ""
    _check_policy_values(name, raw)
    known = [_config.ENV_ON_DROP_PREFIX + _config.env_suffix(k.name) for k in kernels]
    hint = _config.did_you_mean(name, known)
    return "unchecked", f"no kernel named {suffix!r} is registered in this process (--import MODULE).{hint}"


def _check_provider(name: str) -> tuple[str, str]:
    """Check a KERNEL_FALLBACK_PROVIDER__<NAME> against the chain of that name, if declared."""
    from kernel_fallback._chain import chains  # here: `report` and `check` need no chains

    declared = chains()
    matching = [c for c in declared if c.env_var == name]
    for chain in matching:
        chain.select(_config.snapshot())  # raises for a provider the chain does not have
    if matching:
        return "ok", ""
    hint = _config.did_you_mean(name, [c.env_var for c in declared])
    return "unchecked", f"no chain with this variable is declared in this process (--import MODULE).{hint}"


def _unknown_hint(name: str, kernels: Sequence[Any]) -> str:
    """ " Did you mean ...?" for a name under the prefix that nothing reads."""
    return _config.unknown_variable_hint(name, _candidates(kernels))


def _candidates(kernels: Sequence[Any]) -> list[str]:
    names = list(_config.KNOWN_VARIABLES)
    for kernel in kernels:
        names += [p + _config.env_suffix(kernel.name) for p in _config.PER_KERNEL_PREFIXES]
    return names


def _import_modules(modules: Sequence[str]) -> list[tuple[str, PolicyConfigError]]:
    """Import each module; return the configuration errors their kernels raised."""
    # Like `python -m`, look in the current directory first, for the project's own modules.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    errors: list[tuple[str, PolicyConfigError]] = []
    for module in modules:
        try:
            importlib.import_module(module)
        except PolicyConfigError as exc:
            errors.append((f"importing {module}", exc))
        except ImportError as exc:
            raise _UsageError(f"--import {module}: cannot import it: {exc}") from exc
    return errors


def _show_config(args: argparse.Namespace, out: TextIO) -> int:
    import kernel_fallback  # here, not at the top: `report` and `check` do not need kernels

    config_errors: list[tuple[str, PolicyConfigError]] = []
    try:
        kernel_fallback.reload_config()  # the environment as it is now, for every kernel
    except PolicyConfigError as exc:
        config_errors.append(("reading the environment", exc))
    config_errors += _import_modules(args.imports)
    kernels = kernel_fallback.kernels()
    names = sorted({*_config.KNOWN_VARIABLES, *(n for n in os.environ if n.startswith(_config.ENV_PREFIX))})
    variables = []
    for name in names:
        raw = os.environ.get(name)
        status, message = ("unset", "") if raw is None else _check_variable(name, raw, kernels)
        variables.append({"name": name, "value": raw, "status": status, "message": message})
    # An error raised while resolving a kernel that names a variable is that
    # variable's verdict (its kernel may have failed to register because of it).
    by_name = {v["name"]: v for v in variables}
    import_errors = []
    for source, error in config_errors:
        variable = by_name.get(error.name)
        if variable is None:
            import_errors.append(f"{source}: {error}")
        elif variable["status"] != "invalid":
            variable["status"], variable["message"] = "invalid", str(error)
    problems = [v for v in variables if v["status"] in ("invalid", "unknown")]
    described = [k.describe() for k in kernels]
    ok = not problems and not import_errors
    # Chains are described without loading providers when the configuration is invalid.
    chain_rows = kernel_fallback.describe(load=ok)
    if args.format == "json":
        json.dump(
            {
                "ok": ok,
                "variables": variables,
                "import_errors": import_errors,
                "kernels": described,
                "chains": chain_rows,
            },
            out,
            indent=2,
            default=str,
        )
        print(file=out)
    else:
        _print_config(variables, import_errors, described, out)
        if chain_rows:
            print(f"Chains ({len(chain_rows)} declared in this process):", file=out)
            print(textwrap.indent(kernel_fallback.describe_table(load=ok), "  "), file=out)
    # Loading providers to describe them is not a workload: no exit summary of it.
    kernel_fallback.reset_stats()
    for problem in problems:
        print(
            f"{PROG}: {problem['status']} variable {problem['name']}: {problem['message']}", file=sys.stderr
        )
    for line in import_errors:
        print(f"{PROG}: {line}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FINDING


def _print_config(
    variables: list[dict[str, Any]], import_errors: list[str], described: list[dict[str, Any]], out: TextIO
) -> None:
    print("Variables:", file=out)
    width = max(len(v["name"]) for v in variables)
    for v in variables:
        value = "(unset)" if v["value"] is None else repr(v["value"])
        note = f"  [{v['status']}] {v['message']}".rstrip() if v["status"] not in ("ok", "unset") else ""
        description = _config.KNOWN_VARIABLES.get(v["name"], "")
        tail = note or (f"  # {description}" if description and v["value"] is None else "")
        print(f"  {v['name'].ljust(width)} = {value}{tail}", file=out)
    for error in import_errors:
        print(f"  [invalid] {error}", file=out)
    print(f"Kernels ({len(described)} registered in this process):", file=out)
    if not described:
        print("  (none; use --import MODULE to load the modules that declare them)", file=out)
    for kernel in described:
        missing = ", ".join(kernel["missing"]) or "none"
        print(
            f"  {kernel['kernel']}  (keywords read from {kernel['signature_source']}; lacks: {missing})",
            file=out,
        )
        for kwarg, policy in kernel["policies"].items():
            state = "lacks" if policy["missing"] else "accepts"
            print(
                f"    {kwarg:<16} {state:<8} policy={policy['policy']:<6} from {policy['source']}", file=out
            )
