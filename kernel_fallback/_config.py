"""Policies and flags from environment variables, validated strictly.

The environment is read once, at first use, into a snapshot; ``reload_config()``
takes a new snapshot and re-resolves every decorated kernel. A value that is not
valid raises :class:`~kernel_fallback.PolicyConfigError` naming the variable, the
value and what is allowed: a typo never becomes a default.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, final

from kernel_fallback.exceptions import PolicyConfigError

__all__ = [
    "ENV_ALLOW",
    "ENV_LOG_FILE",
    "ENV_LOG_FORMAT",
    "ENV_ON_DROP",
    "ENV_ON_DROP_PREFIX",
    "ENV_PREFIX",
    "ENV_PROVIDER_PREFIX",
    "ENV_STRICT",
    "ENV_TRITON",
    "KNOWN_VARIABLES",
    "LOG_FILE_PLACEHOLDERS",
    "LOG_FORMATS",
    "POLICIES",
    "Snapshot",
    "VARIABLES",
    "Variable",
    "check_kernel_declared",
    "check_known_variables",
    "check_log_file",
    "check_near_misses",
    "check_on_drop",
    "check_per_kernel_name",
    "env_suffix",
    "env_value",
    "is_env_name",
    "parse_bool",
    "parse_flag",
    "parse_log_format",
    "parse_policy",
    "parse_policy_spec",
    "per_kernel_near_miss",
    "read_flag",
    "snapshot",
    "unknown_variable_hint",
]

POLICIES: Final = ("warn", "copy", "raise")
ENV_PREFIX: Final = "KERNEL_FALLBACK_"
ENV_ON_DROP: Final = "KERNEL_FALLBACK_ON_DROP"
ENV_STRICT: Final = "KERNEL_FALLBACK_STRICT"
ENV_ON_DROP_PREFIX: Final = "KERNEL_FALLBACK_ON_DROP__"
ENV_PROVIDER_PREFIX: Final = "KERNEL_FALLBACK_PROVIDER__"
ENV_LOG_FORMAT: Final = "KERNEL_FALLBACK_LOG_FORMAT"
ENV_LOG_FILE: Final = "KERNEL_FALLBACK_LOG_FILE"
ENV_ALLOW: Final = "KERNEL_FALLBACK_ALLOW"
#: Read by :mod:`kernel_fallback.integrations.flash_attn._fast`.
ENV_TRITON: Final = "KERNEL_FALLBACK_TRITON"
LOG_FORMATS: Final = ("json", "console")
#: Placeholders a log file name may hold, expanded in each process (see _sinks).
LOG_FILE_PLACEHOLDERS: Final = ("pid", "rank", "host")


@final
@dataclass(frozen=True, slots=True)
class Variable:
    """A variable with a fixed name: what it does, and the parser of its value.

    Its reader and ``kernel-fallback config`` both parse through ``parse(name, raw)``,
    so a value the reader refuses is one ``config`` reports. None: its own module
    parses it (``KERNEL_FALLBACK_ALLOW``: :mod:`kernel_fallback._allow`).
    """

    description: str
    parse: Callable[[str, str], object] | None


PER_KERNEL_PREFIXES: Final = (ENV_ON_DROP_PREFIX, ENV_PROVIDER_PREFIX)

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
BOOL_VALUES: Final = ("true", "false", "1", "0", "yes", "no", "on", "off")


def env_value(raw: str | None) -> str | None:
    """``raw`` as a variable's value: None when unset, empty or only whitespace.

    One rule for every variable, so ``VAR=' '`` (a launcher's empty default) never
    means something for one variable and an error for another.
    """
    return raw if raw is not None and raw.strip() else None


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_env_name(name: object) -> bool:
    """True when ``name`` can name an environment variable (what ``env=`` and flags take)."""
    # fullmatch: `$` would accept a trailing newline ("A\n"), a name no one can set.
    return isinstance(name, str) and _ENV_NAME.fullmatch(name) is not None


def env_suffix(name: str) -> str:
    """A kernel name as it appears in variable names: upper case, non-alphanumerics as ``_``."""
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def did_you_mean(value: str, candidates: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(value, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_variable_hint(name: str, candidates: Iterable[str] = ()) -> str:
    """`` Did you mean ...?`` for a ``KERNEL_FALLBACK_*`` name that nothing reads."""
    # KERNEL_FALLBACK_ON_DROP_X (one underscore) is a per-kernel variable misspelt:
    # suggest its right spelling even when kernel X is not declared yet.
    for prefix in PER_KERNEL_PREFIXES:
        stem = prefix.rstrip("_")
        if name.startswith(stem + "_") and not name.startswith(prefix):
            return f" Did you mean {prefix + name[len(stem) :].lstrip('_')!r}?"
    return did_you_mean(name, [*KNOWN_VARIABLES, *candidates])


def check_known_variables(environ: Mapping[str, str]) -> None:
    """Raise for a set ``KERNEL_FALLBACK_*`` variable that nothing reads: a typo there
    (``KERNEL_FALLBACK_STICT=1``) must not silently leave the default in force."""
    for name, value in environ.items():
        if (
            env_value(value) is not None
            and name.startswith(ENV_PREFIX)
            and name not in KNOWN_VARIABLES
            and not name.startswith(PER_KERNEL_PREFIXES)
        ):
            per_kernel = ", ".join(p + "<NAME>" for p in PER_KERNEL_PREFIXES)
            raise PolicyConfigError(
                f"{name} is not a variable kernel_fallback reads.{unknown_variable_hint(name)} "
                f"Known: {', '.join(KNOWN_VARIABLES)}, and {per_kernel}.",
                name=name,
                value=value,
                allowed=tuple(KNOWN_VARIABLES),
            )


def check_near_misses(snap: Snapshot, prefix: str, declared: Iterable[str]) -> None:
    """Raise for a set ``<prefix><NAME>`` variable that names nothing declared but is
    close to a declared one: ``..._PROVIDER__FLASH_ATTN_VARLEN`` for ``..._VARLEN_FUNC``
    would otherwise leave an explicit request silently unmet. A name close to nothing
    may belong to a kernel declared later, and is left alone."""
    names = list(declared)
    # Compare what follows the prefix: the shared prefix would make every name "close".
    suffixes = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    for name in snap.environ:
        if name.startswith(prefix) and name not in names and snap.get(name) is not None:
            # Other case or runs of `_` first: difflib compares case-sensitively.
            meant = per_kernel_near_miss(name, suffixes) if prefix in PER_KERNEL_PREFIXES else None
            close = [meant[len(prefix) :]] if meant else []
            close = close or difflib.get_close_matches(name[len(prefix) :], suffixes, n=1, cutoff=0.8)
            if close:
                raise PolicyConfigError(
                    f"{name} names no declared kernel. Did you mean {prefix + close[0]!r}?",
                    name=name,
                    value=snap.get(name),
                    allowed=tuple(names),
                )


def _normal_suffix(suffix: str) -> str:
    """A per-kernel suffix as a careless hand may vary it: case, and runs of ``_``."""
    return re.sub(r"_+", "_", env_suffix(suffix)).strip("_")


def _one_typo(a: str, b: str) -> bool:
    """True when ``a`` is ``b`` with one letter or ``_`` added or left out, or two adjacent
    letters swapped. A changed character (FA2/FA3, FWD/BWD) or an added digit
    (ATTN/ATTN2) is not a typo: such pairs are often two real kernels."""
    if len(a) < len(b):
        a, b = b, a
    if len(a) == len(b) + 1:
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(b))
        return (a[i].isalpha() or a[i] == "_") and a[:i] + a[i + 1 :] == b
    if len(a) == len(b) and a != b:
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
            and a[diff[0]].isalpha()
            and a[diff[1]].isalpha()
        )
    return False


def per_kernel_near_miss(name: str, kernels: Iterable[str]) -> str | None:
    """The per-kernel variable ``name`` was probably meant to be, or None.

    ``name`` is a ``KERNEL_FALLBACK_ON_DROP__*`` or ``KERNEL_FALLBACK_PROVIDER__*``
    variable and ``kernels`` the names of the kernels declared. None when ``name``
    is exactly a declared kernel's variable, or close to none. A near miss is the
    same name in another case or with other runs of ``_`` (``..._ON_DROP__fa3``,
    ``..._ON_DROP___FA3``), or one typo away (``..._FA3_VARLN``; see ``_one_typo``:
    ``FA2_VARLEN`` is not a near miss of ``FA3_VARLEN``).
    """
    prefix = next((p for p in PER_KERNEL_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return None
    suffix = name[len(prefix) :]
    declared = {env_suffix(k) for k in kernels}
    if suffix in declared:
        return None
    normal = _normal_suffix(suffix)
    by_normal = {_normal_suffix(d): d for d in sorted(declared)}
    if normal in by_normal:
        return prefix + by_normal[normal]
    close = [d for n, d in by_normal.items() if _one_typo(normal, n)]
    return prefix + close[0] if close else None


def check_per_kernel_name(name: str, raw: str, kernels: Iterable[str]) -> None:
    """Raise when the per-kernel variable ``name`` (set to ``raw``) names no declared
    kernel but is a near miss of one (see :func:`per_kernel_near_miss`): a misspelt
    ``..._ON_DROP__fa3=raise`` must not leave ``warn`` in force. ``kernel-fallback
    config`` calls it for each set per-kernel variable with the kernels it imported."""
    kernels = list(kernels)
    meant = per_kernel_near_miss(name, kernels)
    if meant is None:
        return
    prefix = next(p for p in PER_KERNEL_PREFIXES if meant.startswith(p))
    kernel = min(k for k in kernels if prefix + env_suffix(k) == meant)
    raise PolicyConfigError(
        f"{name}={raw!r} names no declared kernel. Did you mean {meant!r} (kernel {kernel!r})? "
        f"Per-kernel variables are {prefix}<NAME>, NAME the kernel's name upper-cased with "
        "every other character as '_'.",
        name=name,
        value=raw,
        allowed=(meant,),
    )


def check_kernel_declared(kernel: str, declared: Callable[[], Iterable[str]]) -> None:
    """Checks made when a kernel is declared (decorated), against the current snapshot.

    ``kernel`` is its name, ``declared`` returns the names of the kernels declared
    before it (called only when needed: declaring many kernels stays linear). Raises
    :class:`PolicyConfigError` for a set ``KERNEL_FALLBACK_ON_DROP__*`` variable that
    is a near miss of ``kernel``'s and names no declared kernel (see
    :func:`check_per_kernel_name`).
    """
    snap = snapshot()
    for name in _set_on_drop_variables(snap):
        if per_kernel_near_miss(name, [kernel]) is not None:
            raw = snap.get(name)
            assert raw is not None
            # Not a typo when it is exactly the variable of a kernel declared before.
            check_per_kernel_name(name, raw, [kernel, *declared()])


def check_declared_kernels(snap: Snapshot, kernels: Iterable[str]) -> None:
    """What :func:`check_kernel_declared` checks, for every kernel already declared.

    ``reload_config()`` calls it before anything changes, so a misspelt
    ``KERNEL_FALLBACK_ON_DROP__*`` set after the kernels were declared fails the
    reload (all or nothing) instead of leaving ``warn`` in force.
    """
    names = list(kernels)
    for name in _set_on_drop_variables(snap):
        raw = snap.get(name)
        assert raw is not None
        check_per_kernel_name(name, raw, names)


_on_drop_variables: tuple[int, tuple[str, ...]] = (0, ())


def _set_on_drop_variables(snap: Snapshot) -> tuple[str, ...]:
    """The ``KERNEL_FALLBACK_ON_DROP__*`` variables set in ``snap``, found once per snapshot."""
    global _on_drop_variables
    version, names = _on_drop_variables
    if version != snap.version:
        names = tuple(n for n in snap.environ if n.startswith(ENV_ON_DROP_PREFIX) and snap.get(n) is not None)
        _on_drop_variables = (snap.version, names)
    return names


def parse_bool(name: str, raw: str) -> bool:
    """Parse a boolean variable: true/false/1/0/yes/no/on/off, any case; empty is false."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise PolicyConfigError(
        f"{name}={raw!r} is not a boolean; use one of {', '.join(BOOL_VALUES)} (any case)."
        + did_you_mean(value, BOOL_VALUES),
        name=name,
        value=raw,
        allowed=BOOL_VALUES,
    )


def parse_log_format(name: str, raw: str) -> str:
    """Parse a log format (``json`` or ``console``, any case)."""
    value = raw.strip().lower()
    if value in LOG_FORMATS:
        return value
    raise PolicyConfigError(
        f"{name}={raw!r} is not a log format; use one of {', '.join(LOG_FORMATS)}."
        + did_you_mean(value, LOG_FORMATS),
        name=name,
        value=raw,
        allowed=LOG_FORMATS,
    )


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def check_log_file(name: str, raw: str) -> str:
    """Return ``raw`` if every ``{...}`` in it is a known placeholder, else raise."""
    if not raw.strip():
        raise PolicyConfigError(f"{name}={raw!r}: the log file name is empty.", name=name, value=raw)
    if "\0" in raw:
        raise PolicyConfigError(f"{name}={raw!r}: a file name cannot hold NUL.", name=name, value=raw)
    for placeholder in _PLACEHOLDER.findall(raw):
        if placeholder not in LOG_FILE_PLACEHOLDERS:
            allowed = tuple(f"{{{p}}}" for p in LOG_FILE_PLACEHOLDERS)
            raise PolicyConfigError(
                f"{name}={raw!r}: {{{placeholder}}} is not a placeholder; use "
                f"{', '.join(allowed)}.{did_you_mean(f'{{{placeholder}}}', allowed)}",
                name=name,
                value=raw,
                allowed=allowed,
            )
    return raw


def parse_policy(name: str, raw: str) -> str:
    """Parse a policy from a variable (any case, stripped); errors quote ``raw`` as written."""
    value = raw.strip().lower()
    if value in POLICIES:
        return value
    raise PolicyConfigError(
        f"{name}={raw!r} is not a policy; use one of {', '.join(POLICIES)}.{did_you_mean(value, POLICIES)}",
        name=name,
        value=raw,
        allowed=POLICIES,
    )


def check_policy(name: str, value: object) -> str:
    """Return ``value`` if it is a policy, else raise naming ``name``."""
    if isinstance(value, str) and value in POLICIES:
        return value
    hint = did_you_mean(value, POLICIES) if isinstance(value, str) else ""
    raise PolicyConfigError(
        f"{name}={value!r} is not a policy; use one of {', '.join(POLICIES)}.{hint}",
        name=name,
        value=value,
        allowed=POLICIES,
    )


def check_on_drop(where: str, on_drop: object, neutral: Mapping[str, object]) -> str | dict[str, str] | None:
    """A valid ``on_drop`` (a policy, or keyword -> policy over ``neutral``'s keywords), or raise."""
    if on_drop is None:
        return None
    if isinstance(on_drop, str):
        return check_policy(f"{where}: on_drop", on_drop)
    if not isinstance(on_drop, Mapping):
        raise PolicyConfigError(
            f"{where}: on_drop={on_drop!r}: use a policy ({', '.join(POLICIES)}) or a mapping "
            "keyword -> policy.",
            name="on_drop",
            value=on_drop,
            allowed=POLICIES,
        )
    checked: dict[str, str] = {}
    for kwarg, policy in on_drop.items():
        if kwarg not in neutral:
            raise PolicyConfigError(
                f"{where}: on_drop names {kwarg!r}, which is not one of its keywords "
                f"({', '.join(neutral)}).{did_you_mean(str(kwarg), neutral)}",
                name="on_drop",
                value=kwarg,
                allowed=tuple(neutral),
            )
        checked[kwarg] = check_policy(f"{where}: on_drop[{kwarg!r}]", policy)
    return checked


def parse_policy_spec(name: str, raw: str, kwargs: Iterable[str]) -> str | dict[str, str]:
    """Parse ``warn`` or ``out=copy,num_splits=warn`` (keywords from ``kwargs``)."""
    value = raw.strip()
    if "=" not in value:
        return parse_policy(name, raw)
    allowed = tuple(kwargs)
    result: dict[str, str] = {}
    for item in value.split(","):
        kwarg, sep, policy = item.partition("=")
        kwarg = kwarg.strip()
        if kwarg in result:
            raise PolicyConfigError(
                f"{name}={raw!r}: {kwarg!r} is given twice; give each keyword one policy.",
                name=name,
                value=raw,
                allowed=allowed,
            )
        if not sep or kwarg not in allowed:
            raise PolicyConfigError(
                f"{name}={raw!r}: {kwarg!r} is not a keyword this kernel may drop; "
                f"use 'policy' or 'kwarg=policy,...' with kwarg one of {', '.join(allowed)}."
                + did_you_mean(kwarg, allowed),
                name=name,
                value=raw,
                allowed=allowed,
            )
        if policy.strip().lower() not in POLICIES:
            raise PolicyConfigError(
                f"{name}={raw!r}: {policy.strip()!r} (for {kwarg!r}) is not a policy; use one of "
                f"{', '.join(POLICIES)}.{did_you_mean(policy.strip().lower(), POLICIES)}",
                name=name,
                value=raw,
                allowed=POLICIES,
            )
        result[kwarg] = policy.strip().lower()
    return result


#: Every variable this library reads whose name is fixed (a new one is added here, and
#: read through :func:`read_flag` or the snapshot). Names under ``KERNEL_FALLBACK_``
#: that are neither here nor start with a per-kernel prefix are reported, with a "did
#: you mean", by ``kernel-fallback config``.
VARIABLES: Final[dict[str, Variable]] = {
    ENV_ON_DROP: Variable(
        "default on_drop policy for decorators that set none: warn|copy|raise", parse_policy
    ),
    ENV_STRICT: Variable(
        "boolean: every non-neutral dropped keyword and provider fallback raises", parse_bool
    ),
    ENV_LOG_FORMAT: Variable(
        "json|console: format of the event log (see configure_logging())", parse_log_format
    ),
    ENV_LOG_FILE: Variable(
        "event log file; {pid}, {rank} and {host} are replaced in each process", check_log_file
    ),
    ENV_ALLOW: Variable(
        "kernel:kwarg,... fallbacks accepted by the strict test helpers and `kernel-fallback check`", None
    ),
    ENV_TRITON: Variable(
        "boolean, default true: the torch attention provider decodes on CUDA in Triton", parse_bool
    ),
}
#: Name -> description of :data:`VARIABLES`.
KNOWN_VARIABLES: Final[dict[str, str]] = {name: var.description for name, var in VARIABLES.items()}


def read_flag(name: str, default: bool) -> bool:
    """The boolean variable ``name`` (registered in :data:`VARIABLES`) as set now.

    Unset or blank gives ``default``; a value that is no boolean raises
    :class:`PolicyConfigError`, as ``kernel-fallback config`` reports it.
    """
    return parse_flag(name, os.environ.get(name), default)


def parse_flag(name: str, raw: str | None, default: bool) -> bool:
    """:func:`read_flag` of the value ``raw`` (for a reader that caches per value)."""
    value = env_value(raw)
    if value is None:
        return default
    return bool(VARIABLES[name].parse(name, value))  # type: ignore[misc]


@final
@dataclass(frozen=True, slots=True)
class Snapshot:
    """The environment as read at one moment, and the global settings parsed from it."""

    environ: Mapping[str, str]
    default_policy: str | None
    strict: bool
    version: int
    #: ``KERNEL_FALLBACK_LOG_FORMAT`` / ``_LOG_FILE`` (validated), None when unset.
    log_format: str | None = None
    log_file: str | None = None

    def get(self, name: str) -> str | None:
        """The variable's value, or None when unset, empty or only whitespace."""
        return env_value(self.environ.get(name))


_current: Snapshot | None = None
_version = 0
# Serialises reading the environment (the version counter) and reloads: two concurrent
# reload_config() calls would otherwise number their snapshots alike and commit
# interleaved. Re-entrant: a reloader may ask for snapshot() while a reload runs.
_reload_lock = threading.RLock()


def _reinit_after_fork() -> None:
    # A thread of the parent may have held it at fork: the child's copy would stay held.
    global _reload_lock
    _reload_lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reinit_after_fork)
#: Called with the new snapshot by reload(); they may raise to refuse it.
_reloaders: list[Callable[[Snapshot], Callable[[], None]]] = []


def _read(environ: Mapping[str, str]) -> Snapshot:
    global _version
    check_known_variables(environ)
    raw_default = env_value(environ.get(ENV_ON_DROP))
    default = parse_policy(ENV_ON_DROP, raw_default) if raw_default else None
    strict = parse_bool(ENV_STRICT, environ.get(ENV_STRICT, ""))
    raw_format = env_value(environ.get(ENV_LOG_FORMAT))
    log_format = parse_log_format(ENV_LOG_FORMAT, raw_format) if raw_format else None
    raw_file = env_value(environ.get(ENV_LOG_FILE))
    log_file = check_log_file(ENV_LOG_FILE, raw_file) if raw_file else None
    _version += 1
    return Snapshot(dict(environ), default, strict, _version, log_format, log_file)


def snapshot() -> Snapshot:
    """The current snapshot, read from ``os.environ`` on first use."""
    global _current
    current = _current
    if current is None:
        with _reload_lock:
            if _current is None:
                _current = _read(os.environ)
            current = _current
    return current


def on_reload(prepare: Callable[[Snapshot], Callable[[], None]]) -> None:
    """Register a two-phase re-resolver: ``prepare`` validates and returns a commit."""
    _reloaders.append(prepare)


def reload_config() -> Snapshot:
    """Re-read the environment and re-resolve every kernel's policy and provider.

    All-or-nothing: when any value is invalid, :class:`PolicyConfigError` is raised
    and the previous configuration stays in force everywhere. Concurrent calls run
    one after the other, so each snapshot has its own ``version``.
    """
    global _current
    with _reload_lock:
        new = _read(os.environ)
        commits = [prepare(new) for prepare in list(_reloaders)]
        _current = new
        for commit in commits:
            commit()
        return new
