"""Providers of a kernel chain: declared, then opened once on first need.

A provider is declared with an import path (``"pkg.module:attr"``) or a loader callable,
and optional capability gates. Opening it:

1. runs its gates (no import is attempted while one is closed);
2. imports or loads its kernel;
3. checks its positional parameters against the chain's logical signature;
4. reads its keyword support once with :func:`~kernel_fallback.kwarg_support` and wraps
   it in :func:`~kernel_fallback.tolerant_kwargs` for the chain keywords it lacks.

A gate or a load raising one of :data:`~kernel_fallback._gates.LOAD_ERRORS`
(ImportError, OSError, RuntimeError) makes the provider unavailable, with the reason
kept. Anything else (SyntaxError, NameError, TypeError, an AttributeError raised while a
module executes, ...) is a bug in the provider and propagates unchanged. An attribute
missing from an import path is a load failure: ``from pkg import name`` raises
ImportError for it too.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

from kernel_fallback import _config
from kernel_fallback._gates import Gate, is_load_error
from kernel_fallback._signature import kwarg_support
from kernel_fallback._tolerant import TolerantKernel, tolerant_kwargs
from kernel_fallback.exceptions import PolicyConfigError

__all__ = [
    "AUTO",
    "Loaded",
    "Provider",
    "Unavailable",
    "check_provider_name",
    "check_unsupported",
    "declare_provider",
    "import_target",
    "lookup_provider",
    "neutral_spec",
    "open_provider",
    "positional_names",
]

_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_PROVIDER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
#: Reserved in ``KERNEL_FALLBACK_PROVIDER__<NAME>`` and ``use()``: let the chain choose.
AUTO: Final = "auto"


def check_provider_name(option: str, name: object) -> str:
    """Return ``name`` if it can name a provider (and in variables), else raise."""
    if not isinstance(name, str) or not _PROVIDER_NAME.match(name) or name.lower() == AUTO:
        raise PolicyConfigError(
            f"{option}={name!r}: a provider name starts with a letter and holds letters, digits, "
            f"'_' or '-' ('{AUTO}' is reserved).",
            name=option,
            value=name,
        )
    return name


def lookup_provider(option: str, raw: str, names: Iterable[str]) -> str:
    """The declared provider ``raw`` names (case-insensitively), else PolicyConfigError."""
    declared = tuple(names)
    wanted = raw.strip().lower()
    for name in declared:
        if name.lower() == wanted:
            return name
    allowed = (*declared, AUTO)
    raise PolicyConfigError(
        f"{option}={raw!r} is not a provider of this chain; use one of {', '.join(allowed)}."
        + _config.did_you_mean(wanted, [n.lower() for n in allowed]),
        name=option,
        value=raw,
        allowed=allowed,
    )


def neutral_spec(option: str, spec: object, sig: inspect.Signature) -> dict[str, object]:
    """Keyword -> neutral value from a list (neutral = the logical default) or a mapping."""
    if isinstance(spec, str) or not isinstance(spec, (Mapping, Iterable)):
        raise PolicyConfigError(
            f"kernel_chain({option}={spec!r}): give a list of keyword names (their neutral value is the "
            f"logical signature's default) or a mapping name -> neutral value.",
            name=option,
            value=spec,
        )
    items = dict(spec) if isinstance(spec, Mapping) else dict.fromkeys(spec, inspect.Parameter.empty)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    result: dict[str, object] = {}
    for kwarg, value in items.items():
        param = sig.parameters.get(kwarg) if isinstance(kwarg, str) else None
        if param is None and not (has_var_kw and isinstance(kwarg, str) and kwarg.isidentifier()):
            raise PolicyConfigError(
                f"kernel_chain({option}=...): {kwarg!r} is not a parameter of the logical signature "
                f"{sig}.{_config.did_you_mean(str(kwarg), sig.parameters)}",
                name=option,
                value=kwarg,
                allowed=tuple(sig.parameters),
            )
        if param is not None and param.kind is inspect.Parameter.POSITIONAL_ONLY:
            # The chain turns positional arguments past the leading plain ones into
            # keywords before it looks at them; a positional-only one has no keyword.
            raise PolicyConfigError(
                f"kernel_chain({option}=...): {kwarg!r} is positional-only (before `/`); the chain passes "
                "it to providers by keyword, so make it positional-or-keyword.",
                name=option,
                value=kwarg,
            )
        if value is inspect.Parameter.empty and option == "hints":
            value = None  # a hint has no neutral value: any value may be dropped
        elif value is inspect.Parameter.empty:
            value = param.default if param is not None else inspect.Parameter.empty
            if value is inspect.Parameter.empty:
                raise PolicyConfigError(
                    f"kernel_chain({option}=...): {kwarg!r} has no default in the logical signature; "
                    f"give its neutral value: {option}={{{kwarg!r}: ...}}.",
                    name=option,
                    value=kwarg,
                )
        result[kwarg] = value
    return result


def declare_provider(
    where: str,
    name: str,
    target: str | None,
    *,
    loader: Callable[[], Callable[..., Any]] | None,
    gate: Gate | Sequence[Gate],
    on_drop: str | Mapping[str, str] | None,
    unsupported: Iterable[str] | Callable[[Any], Iterable[str]],
    neutral: Mapping[str, object],
) -> Provider:
    """Check a provider's options (``where`` names the declaration in errors) and build it."""
    check_provider_name(f"{where}: name", name)
    if (target is None) == (loader is None):
        raise PolicyConfigError(
            f"{where}: give exactly one of an import path ('pkg.module:attr') or loader=.",
            name="target",
            value=target,
        )
    if target is not None and (not isinstance(target, str) or not _TARGET.match(target)):
        raise PolicyConfigError(
            f"{where}: target={target!r} is not an import path like 'pkg.module:attr'.",
            name="target",
            value=target,
        )
    if loader is not None and not callable(loader):
        raise TypeError(f"{where}: loader={loader!r} is not callable.")
    gates = (gate,) if isinstance(gate, Gate) else tuple(gate) if isinstance(gate, (list, tuple)) else (gate,)
    if not all(isinstance(g, Gate) for g in gates):
        raise TypeError(f"{where}: gate= takes Gate objects (cuda_capability(8, 9), ...), got {gate!r}.")
    policy = _config.check_on_drop(where, on_drop, neutral)
    if callable(unsupported):  # read when the kernel is loaded (e.g. from its version)
        return Provider(name, target, loader, gates, policy, unsupported)
    declared = check_unsupported(where, unsupported, neutral)
    return Provider(name, target, loader, gates, policy, declared)


def check_unsupported(where: str, unsupported: object, neutral: Mapping[str, object]) -> frozenset[str]:
    """``unsupported`` as a set of the chain's route or drop keywords, else PolicyConfigError."""
    if isinstance(unsupported, str) or not isinstance(unsupported, Iterable):
        raise PolicyConfigError(
            f"{where}: unsupported= is a list of keywords (or a callable of the loaded kernel "
            f"returning one), got {unsupported!r}.",
            name="unsupported",
            value=unsupported,
        )
    declared = frozenset(unsupported)
    for kwarg in declared:
        if kwarg not in neutral:
            raise PolicyConfigError(
                f"{where}: unsupported keyword {kwarg!r} is not a route or drop keyword of the "
                f"chain ({', '.join(neutral)}).{_config.did_you_mean(str(kwarg), neutral)}",
                name="unsupported",
                value=kwarg,
                allowed=tuple(neutral),
            )
    return declared


def import_target(target: str) -> Any:
    """Import ``"pkg.module:attr.sub"``; a missing attribute raises ImportError like ``from``."""
    module_name, _, attr_path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(
                f"cannot import name {attr_path!r} from {module_name!r} ({exc})", name=module_name
            ) from exc
    return obj


@final
class Provider:
    """One declared implementation of a chain (see :meth:`KernelChain.provider`)."""

    __slots__ = ("gates", "loader", "name", "on_drop", "target", "unsupported")

    def __init__(
        self,
        name: str,
        target: str | None,
        loader: Callable[[], Callable[..., Any]] | None,
        gates: tuple[Gate, ...],
        on_drop: str | dict[str, str] | None,
        unsupported: frozenset[str] | Callable[[Any], Iterable[str]],
    ) -> None:
        self.name = name
        self.target = target
        self.loader = loader
        self.gates = gates
        self.on_drop = on_drop
        self.unsupported = unsupported

    @property
    def source(self) -> str:
        """Where the kernel comes from, for people: the import path or the loader's name."""
        if self.target is not None:
            return self.target
        loader = self.loader
        return f"loader {getattr(loader, '__module__', '?')}.{getattr(loader, '__qualname__', repr(loader))}"

    def __repr__(self) -> str:
        return f"<Provider {self.name} from {self.source}>"


@final
@dataclass(frozen=True, slots=True)
class Loaded:
    """A provider that opened: ``impl`` is what calls go to."""

    name: str
    impl: Callable[..., Any]
    signature_source: str
    #: Keywords of the chain (route and drop) it lacks, and the route ones among them.
    lacking: frozenset[str]
    route_lacking: frozenset[str]
    tolerant: TolerantKernel | None = field(default=None, compare=False)
    #: The chain's hints it lacks: removed from calls, silently (they never change results).
    hints_lacking: frozenset[str] = frozenset()
    #: The kernel's own positional parameters (None: no Python signature).
    positional: tuple[str, ...] | None = None
    #: The kernel itself, unwrapped (``impl`` may be its ``tolerant_kwargs`` wrapper).
    kernel: Callable[..., Any] | None = field(default=None, compare=False)


@final
@dataclass(frozen=True, slots=True)
class Unavailable:
    """A provider that could not be opened, and why."""

    name: str
    reason: str
    error: BaseException | None = field(default=None, compare=False)


def positional_names(kernel: Callable[..., Any]) -> tuple[str, ...] | None:
    """``kernel``'s parameters that can be given by position, in order; None without a signature."""
    try:
        sig = inspect.signature(kernel)
    except (TypeError, ValueError):
        return None  # builtins and ops: no Python signature to compare
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in sig.parameters.values() if p.kind in kinds)


def _positional_mismatch(kernel: Callable[..., Any], positional: tuple[str, ...]) -> str | None:
    """Why positional arguments would bind differently in ``kernel``, or None."""
    try:
        sig = inspect.signature(kernel)
    except (TypeError, ValueError):
        return None  # builtins and ops: no Python signature to compare
    names: list[str] = []
    for param in sig.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            break
        if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
    else:
        if len(names) < len(positional):
            names.append("<end>")
    got = tuple(names[: len(positional)])
    if got == positional[: len(got)]:
        return None
    return (
        f"its positional parameters ({', '.join(got)}) differ from the chain's "
        f"({', '.join(positional)}): a positional call would bind the wrong arguments"
    )


def _declared(kernel: Callable[..., Any], accepted: Iterable[str], neutral: Mapping[str, object]) -> Any:
    """A forwarder to ``kernel`` whose signature says it takes only ``accepted`` of the chain's keywords.

    Used when a provider declares keywords unsupported that its real signature accepts
    (a ``**kwargs`` wrapper, or a function that ignores them): the tolerant wrapper
    reads the declared signature, so it never passes them on.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        return kernel(*args, **kwargs)

    params = [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=neutral[k]) for k in accepted]
    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    forward.__name__ = getattr(kernel, "__name__", "forward")
    return forward


def open_provider(
    spec: Provider,
    *,
    chain: str,
    positional: tuple[str, ...],
    neutral: Mapping[str, object],
    route_keys: frozenset[str],
    policies: Mapping[str, str],
    hints: frozenset[str] = frozenset(),
) -> Loaded | Unavailable:
    """Gate, load, check and wrap one provider; load errors give :class:`Unavailable`."""
    for gate in spec.gates:
        closed = gate.reason()
        if closed is not None:
            return Unavailable(spec.name, f"gate {gate.description!r} is closed: {closed}")
    try:
        if spec.target is not None:
            kernel = import_target(spec.target)
        else:
            assert spec.loader is not None  # checked at declaration
            kernel = spec.loader()
    except Exception as exc:
        if not is_load_error(exc):
            raise
        return Unavailable(spec.name, f"{type(exc).__name__}: {exc}", exc)
    if not callable(kernel):
        raise TypeError(
            f"{chain}: provider {spec.name!r} ({spec.source}) gave {kernel!r}, which is not callable."
        )
    mismatch = _positional_mismatch(kernel, positional)
    if mismatch is not None:
        return Unavailable(spec.name, mismatch)
    support = kwarg_support(kernel)
    unsupported = spec.unsupported
    if callable(unsupported):
        unsupported = check_unsupported(
            f"{chain}.provider({spec.name!r}): unsupported", unsupported(kernel), neutral
        )
    lacking = frozenset(k for k in neutral if not support.accepts(k) or k in unsupported)
    hints_lacking = frozenset(h for h in hints if not support.accepts(h))
    source = support.source + (" + declared unsupported" if unsupported else "")
    if not lacking:
        return Loaded(
            spec.name,
            kernel,
            source,
            lacking,
            frozenset(),
            hints_lacking=hints_lacking,
            positional=positional_names(kernel),
            kernel=kernel,
        )
    target = kernel
    if any(support.accepts(k) for k in unsupported & neutral.keys()):
        target = _declared(kernel, [k for k in neutral if k not in lacking], neutral)
    merged = dict(policies)
    if isinstance(spec.on_drop, str):
        merged = dict.fromkeys(neutral, spec.on_drop)
    elif spec.on_drop:
        merged.update(spec.on_drop)
    impl = tolerant_kwargs(dict(neutral), merged or None, name=f"{chain}.{spec.name}")(target)
    tolerant: TolerantKernel = impl.tolerant
    return Loaded(
        spec.name,
        impl,
        source,
        lacking,
        lacking & route_keys,
        tolerant,
        hints_lacking,
        positional_names(kernel),
        kernel,
    )
