"""``kernel-fallback config``: validate the variables, show kernels, chains and policies.

Imports torch (the kernels and chains it describes need it); ``report`` and ``check``
never import this module. The process describes the configuration and runs no
workload: the events that loading providers records are neither logged (not to the
``KERNEL_FALLBACK_LOG_FILE`` a later ``check logs/*`` reads, nor anywhere else) nor
summarised at exit; the chain table shows the same facts.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from kernel_fallback import _config
from kernel_fallback._allow import AllowList
from kernel_fallback._textsafe import safe, safe_lines
from kernel_fallback.exceptions import PolicyConfigError, ProviderUnavailableError

__all__ = ["show_config"]

PROG = "kernel-fallback"


class _Discard:
    """A logger that drops every event: the config process is not a workload."""

    def _drop(self, *args: object, **kwargs: object) -> None:
        return None

    debug = info = warning = error = critical = exception = msg = _drop


@contextmanager
def _no_event_log() -> Iterator[None]:
    """Drop this process's events, and restore the previous logger afterwards."""
    from kernel_fallback import _events

    old = _events.set_logger(_Discard())
    try:
        yield
    finally:
        _events.set_logger(old)


def _check_policy_values(name: str, raw: str) -> None:
    """Check the policies in ``warn`` or ``kwarg=policy,...`` without knowing the kernel."""
    # The keywords it names are the only ones we know of: let the one parser check it.
    _config.parse_policy_spec(name, raw, [item.partition("=")[0].strip() for item in raw.split(",")])


def _check_variable(name: str, raw: str, kernels: Sequence[Any]) -> tuple[str, str]:
    """(status, message) of one KERNEL_FALLBACK_* variable: ok, invalid, unknown or unchecked."""
    try:
        if name == _config.ENV_ALLOW:
            AllowList.parse(name, raw)
        elif name in _config.VARIABLES:
            # The parser the variable's reader uses; blank is unset for every variable.
            parse = _config.VARIABLES[name].parse
            if parse is not None and _config.env_value(raw):
                parse(name, raw)
        elif name.startswith(_config.ENV_ON_DROP_PREFIX):
            return _check_per_kernel(name, raw, kernels)
        elif name.startswith(_config.ENV_PROVIDER_PREFIX):
            return _check_provider(name, raw)
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
    # A near miss of a registered kernel's variable (other case, other runs of '_', one
    # typo) is an error, by the rule the decorator applies when a kernel is declared.
    _config.check_per_kernel_name(name, raw, [k.name for k in kernels])
    return "unchecked", f"no kernel named {suffix!r} is registered in this process (--import MODULE)."


def _check_provider(name: str, raw: str) -> tuple[str, str]:
    """Check a KERNEL_FALLBACK_PROVIDER__<NAME> against the chain of that name, if declared."""
    from kernel_fallback._chain import chains  # here: `report` and `check` need no chains

    declared = chains()
    matching = [c for c in declared if c.env_var == name]
    for chain in matching:
        chain.select(_config.snapshot())  # raises for a provider the chain does not have
    if matching:
        return "ok", ""
    _config.check_per_kernel_name(name, raw, [c.name for c in declared])
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
    """Import each module; return the configuration errors their kernels raised.

    Like ``python -m``, the current directory is searched first for these modules (the
    project's own), unless ``PYTHONSAFEPATH`` (``-P``) says not to. Only while they are
    imported: a provider loaded later (``import flash_attn``) must not find a file of
    the same name in the current directory unless the user's own ``sys.path`` holds it.
    """
    cwd = os.getcwd()
    added = not getattr(sys.flags, "safe_path", False) and cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return _import_each(modules)
    finally:
        if added:
            sys.path.remove(cwd)


def _import_each(modules: Sequence[str]) -> list[tuple[str, PolicyConfigError]]:
    errors: list[tuple[str, PolicyConfigError]] = []
    for module in modules:
        try:
            importlib.import_module(module)
        except PolicyConfigError as exc:
            errors.append((f"importing {module}", exc))
        except ImportError as exc:
            raise ImportError(f"--import {module}: cannot import it: {exc}") from exc
        except Exception as exc:  # the user's module failed: one line, exit 2
            raise ImportError(f"--import {module}: importing it raised {type(exc).__name__}: {exc}") from exc
    return errors


def _chain_errors() -> Iterator[tuple[str, Exception]]:
    """The errors each declared chain raises choosing its providers from the environment."""
    from kernel_fallback._chain import chains

    try:
        snap = _config.snapshot()
    except PolicyConfigError:  # reload_config() raised it already: reported there
        return
    for chain in chains():
        try:
            chain.select(snap)  # reads its variables: KERNEL_FALLBACK_PROVIDER__*, flags, gates
        except (PolicyConfigError, ProviderUnavailableError) as exc:
            yield f"chain {chain.name}", exc


def show_config(imports: Sequence[str], fmt: str, out: TextIO) -> int:
    """Print the configuration as ``fmt`` (text or json); 0 when valid, 1 when not.

    Raises ImportError (a usage error) naming a module of ``imports`` that fails to import.
    """
    with _no_event_log():
        return _show_config(imports, fmt, out)


def _show_config(imports: Sequence[str], fmt: str, out: TextIO) -> int:
    import kernel_fallback  # here, not at the top: `report` and `check` do not need kernels

    config_errors: list[tuple[str, Exception]] = []
    try:
        kernel_fallback.reload_config()  # the environment as it is now, for every kernel
    except PolicyConfigError as exc:
        config_errors.append(("reading the environment", exc))
    config_errors += _import_modules(imports)
    # A chain reads variables of its own (a provider choice, flags such as
    # SGLANG_USE_SGL_FA3_KERNEL): an invalid one fails the workload at its first call.
    config_errors += _chain_errors()
    kernels = kernel_fallback.kernels()
    names = sorted({*_config.KNOWN_VARIABLES, *(n for n in os.environ if n.startswith(_config.ENV_PREFIX))})
    variables = []
    for name in names:
        raw = os.environ.get(name)
        status, message = ("unset", "") if raw is None else _check_variable(name, raw, kernels)
        variables.append({"name": name, "value": raw, "status": status, "message": message})
    # An error raised while resolving a kernel or chain that names a variable is that
    # variable's verdict (its kernel may have failed to register because of it).
    by_name = {v["name"]: v for v in variables}
    import_errors = []
    for source, error in config_errors:
        var = error.name if isinstance(error, PolicyConfigError) else None
        variable = by_name.get(var) if var is not None else None
        if variable is None and var is not None and var in os.environ:
            variable = by_name[var] = {"name": var, "value": os.environ[var], "status": "", "message": ""}
            variables.append(variable)
        if variable is None:
            import_errors.append(f"{source}: {error}")
        elif variable["status"] != "invalid":
            variable["status"], variable["message"] = "invalid", str(error)
    problems = [v for v in variables if v["status"] in ("invalid", "unknown")]
    described = [k.describe() for k in kernels]
    ok = not problems and not import_errors
    # Chains are described without loading providers when the configuration is invalid.
    chain_rows = kernel_fallback.describe(load=ok)
    if fmt == "json":
        data = {
            "ok": ok,
            "variables": variables,
            "import_errors": import_errors,
            "kernels": described,
            "chains": chain_rows,
        }
        json.dump(data, out, indent=2, default=str)  # ASCII only: control characters escaped
        print(file=out)
    else:
        _print_config(variables, import_errors, described, out)
        if chain_rows:
            print(f"Chains ({len(chain_rows)} declared in this process):", file=out)
            safe_lines(textwrap.indent(kernel_fallback.describe_table(load=ok), "  "), out)
    # Loading providers to describe them is not a workload: no exit summary of it.
    kernel_fallback.reset_stats()
    for problem in problems:
        _error(f"{problem['status']} variable {problem['name']}: {problem['message']}")
    for line in import_errors:
        _error(line)
    return 0 if ok else 1


def _error(message: str) -> None:
    print(f"{PROG}: {safe(message)}", file=sys.stderr)


def _print_config(
    variables: list[dict[str, Any]], import_errors: list[str], described: list[dict[str, Any]], out: TextIO
) -> None:
    safe_lines("Variables:", out)
    width = max(len(v["name"]) for v in variables)
    for v in variables:
        value = "(unset)" if v["value"] is None else repr(v["value"])
        note = f"  [{v['status']}] {v['message']}".rstrip() if v["status"] not in ("ok", "unset") else ""
        description = _config.KNOWN_VARIABLES.get(v["name"], "")
        tail = note or (f"  # {description}" if description and v["value"] is None else "")
        safe_lines(f"  {v['name'].ljust(width)} = {value}{tail}", out)
    for error in import_errors:
        safe_lines(f"  [invalid] {error}", out)
    safe_lines(f"Kernels ({len(described)} registered in this process):", out)
    if not described:
        safe_lines("  (none; use --import MODULE to load the modules that declare them)", out)
    for kernel in described:
        missing = ", ".join(kernel["missing"]) or "none"
        name, source = safe(kernel["kernel"]), kernel["signature_source"]
        safe_lines(f"  {name}  (keywords read from {source}; lacks: {missing})", out)
        for kwarg, policy in kernel["policies"].items():
            state = "lacks" if policy["missing"] else "accepts"
            safe_lines(
                f"    {kwarg:<16} {state:<8} policy={policy['policy']:<6} from {policy['source']}", out
            )
