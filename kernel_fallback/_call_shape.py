"""How a kernel chain reads one call: positional arguments, neutral values, hints, selectors.

A :class:`CallShape` is built once per chain from the logical signature and the
``kernel_chain`` options, then consulted on the slow path of each call:

- positional arguments past the leading *plain* parameters (those neither routed,
  dropped, hints nor selectors) become the keywords they bind to, so a keyword given by
  position is handled exactly as if named (sglang passes FA3's 28 by position);
- a route keyword is neutral when its value is the declared neutral value, one of its
  ``also_neutral`` values, or when none of its ``meaningful_with`` parameters is given;
- hints are removed silently for a provider that lacks them;
- a selector keyword is consumed by the chain and names a provider (or None).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping
from typing import Any, final

from kernel_fallback._options import _is_neutral
from kernel_fallback._providers import Loaded, check_provider_name, neutral_spec
from kernel_fallback.exceptions import PolicyConfigError

__all__ = ["CallShape", "call_shape"]


@final
class CallShape:
    """One chain's rules for reading a call (see the module docstring)."""

    __slots__ = (
        "also_neutral",
        "bind_from",
        "hints",
        "kernel",
        "meaningful_with",
        "names",
        "neutral",
        "positional",
        "quiet_selectors",
        "route_keys",
        "routed",
        "selectors",
        "signature",
    )

    def __init__(
        self,
        kernel: str,
        *,
        names: tuple[str, ...],
        plain: int,
        var_positional: bool,
        neutral: dict[str, object],
        route_keys: tuple[str, ...],
        hints: frozenset[str],
        also_neutral: Mapping[str, tuple[object, ...]],
        meaningful_with: Mapping[str, tuple[str, ...]],
        selectors: Mapping[str, Mapping[object, str | None]],
        signature: inspect.Signature | None = None,
    ) -> None:
        self.kernel = kernel
        #: The logical signature (a chain's fast paths are generated from it).
        self.signature = signature
        #: Every parameter that may be given by position, in order.
        self.names = names
        #: The leading plain parameters: passed on to providers by position.
        self.positional = names[:plain]
        #: Positional arguments from this index on become keywords (never with *args).
        self.bind_from = sys.maxsize if var_positional else plain
        self.neutral = neutral
        self.route_keys = route_keys
        self.routed = frozenset(route_keys)
        self.hints = hints
        self.also_neutral = dict(also_neutral)
        self.meaningful_with = dict(meaningful_with)
        self.selectors = {k: dict(v) for k, v in selectors.items()}
        #: Per selector, the values asking for the chain's own choice that a fast path
        #: may consume by itself: ints and strings (never a bool, which is no version).
        self.quiet_selectors = {
            k: frozenset(v for v, p in choices.items() if p is None and v.__class__ in (int, str))
            for k, choices in self.selectors.items()
        }

    def quiet(self, kwargs: dict[str, Any], check: frozenset[str]) -> bool:
        """Consume selectors asking for the chain's own choice; True when nothing else in ``check`` is passed.

        Removing them first is what the slow path does too, so a False answer loses nothing.
        """
        for key, values in self.quiet_selectors.items():
            value = kwargs.get(key, kwargs)
            if value is not kwargs:
                if not ((value.__class__ is int or value.__class__ is str) and value in values):
                    return False
                del kwargs[key]
        return check.isdisjoint(kwargs)

    def keywords(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional arguments past the plain ones, moved into ``kwargs`` under their names."""
        names = self.names
        if len(args) > len(names):
            raise self.too_many_positional(len(args))
        for i in range(self.bind_from, len(args)):
            name = names[i]
            if name in kwargs:
                raise TypeError(f"{self.kernel}() got multiple values for argument {name!r}")
            kwargs[name] = args[i]
        return args[: self.bind_from], kwargs

    def too_many_positional(self, given: int) -> TypeError:
        return TypeError(
            f"{self.kernel}() takes at most {len(self.names)} positional arguments "
            f"({', '.join(self.names)}) but {given} were given."
        )

    def _given(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """The value a call gives ``name`` (by position or keyword), None when not given."""
        i = self.positional.index(name) if name in self.positional else len(args)
        return args[i] if i < len(args) else kwargs.get(name)

    def is_neutral(self, key: str, value: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        """True when passing ``value`` for ``key`` in this call means the same as not passing it."""
        if _is_neutral(value, self.neutral[key]):
            return True
        if any(_is_neutral(value, alt) for alt in self.also_neutral.get(key, ())):
            return True
        needs = self.meaningful_with.get(key)
        return needs is not None and all(self._given(n, args, kwargs) is None for n in needs)

    def needed(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, ...]:
        """The route keywords this call passes with a value that changes the result."""
        neutral = self.neutral
        found: list[str] = []
        for k in self.route_keys:
            if k in kwargs:
                value = kwargs[k]
                # `is` first: sglang passes most of them as their (None) default.
                if value is not neutral[k] and not self.is_neutral(k, value, args, kwargs):
                    found.append(k)
        return tuple(found)

    def strip(self, got: Loaded, needed: tuple[str, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Remove what ``got`` lacks and may go without: hints, and keywords neutral in this call.

        ``needed`` is :meth:`needed` of this call: a route keyword not in it is neutral.
        """
        lacking = got.lacking
        hints = got.hints_lacking
        routed = self.routed
        neutral = self.neutral
        drop = [
            k
            for k, value in kwargs.items()
            if k in hints
            or (k in lacking and (k not in needed if k in routed else _is_neutral(value, neutral[k])))
        ]
        for k in drop:
            del kwargs[k]
        return kwargs

    def selected(self, key: str, value: object) -> str | None:
        """The provider a selector keyword's value names (None: the chain's own choice)."""
        choices = self.selectors[key]
        try:
            if isinstance(value, bool):  # True == 1: a flag is never a version
                raise KeyError(value)
            return choices[value]
        except (KeyError, TypeError):
            allowed = ", ".join(
                f"{v!r} ({'this chain' if p is None else 'provider ' + repr(p)})" for v, p in choices.items()
            )
            raise PolicyConfigError(
                f"{self.kernel}({key}={value!r}): {key} takes {allowed}.",
                name=key,
                value=value,
                allowed=tuple(str(v) for v in choices),
            ) from None


def call_shape(
    where: str,
    kernel: str,
    sig: inspect.Signature,
    *,
    route: Iterable[str] | Mapping[str, object],
    drop: Iterable[str] | Mapping[str, object],
    hints: Iterable[str],
    also_neutral: Mapping[str, Iterable[object]] | None,
    meaningful_with: Mapping[str, Iterable[str]] | None,
    selectors: Mapping[str, Mapping[object, str | None]] | None,
) -> CallShape:
    """Check the call options of ``kernel_chain`` against ``sig`` and build the shape."""
    routed = neutral_spec("route", route, sig)
    dropped = neutral_spec("drop", drop, sig)
    hinted = neutral_spec("hints", hints, sig)
    chosen_by = neutral_spec("selectors", _selector_names(selectors), sig)
    kinds_of = {"route": routed, "drop": dropped, "hints": hinted, "selectors": chosen_by}
    _check_disjoint(kinds_of)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = tuple(p.name for p in sig.parameters.values() if p.kind in kinds)
    special = set().union(*kinds_of.values())
    plain = next((i for i, n in enumerate(names) if n in special), len(names))
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    if var_positional and plain < len(names):
        raise PolicyConfigError(
            f"{where}: {names[plain]!r} comes before *args; with *args, keep routed, dropped, hint "
            "and selector parameters keyword-only.",
            name="route",
            value=names[plain],
        )
    shape = CallShape(
        kernel,
        names=names,
        plain=plain,
        var_positional=var_positional,
        neutral={**routed, **dropped},
        route_keys=tuple(routed),
        hints=frozenset(hinted),
        also_neutral=_per_route_key("also_neutral", also_neutral, routed, None),
        meaningful_with=_per_route_key("meaningful_with", meaningful_with, routed, sig),
        selectors=_check_selectors(where, selectors),
        signature=sig,
    )
    return shape


def _selector_names(selectors: object) -> list[str]:
    if selectors is None:
        return []
    if not isinstance(selectors, Mapping):
        raise PolicyConfigError(
            f"kernel_chain(selectors={selectors!r}): give a mapping keyword -> {{value: provider or None}}.",
            name="selectors",
            value=selectors,
        )
    return list(selectors)


def _check_selectors(
    where: str, selectors: Mapping[str, Mapping[object, str | None]] | None
) -> dict[str, dict[object, str | None]]:
    checked: dict[str, dict[object, str | None]] = {}
    for key, choices in (selectors or {}).items():
        if not isinstance(choices, Mapping) or not choices:
            raise PolicyConfigError(
                f"{where}: selectors[{key!r}]={choices!r}: give a non-empty mapping value -> provider "
                "name (or None for the chain's own choice).",
                name="selectors",
                value=choices,
            )
        for provider in choices.values():
            if provider is not None:
                check_provider_name(f"{where}: selectors[{key!r}]", provider)
        checked[key] = dict(choices)
    return checked


def _check_disjoint(kinds_of: Mapping[str, Mapping[str, object]]) -> None:
    seen: dict[str, str] = {}
    for kind, keys in kinds_of.items():
        for key in keys:
            if key in seen:
                raise PolicyConfigError(
                    f"kernel_chain: {key} is both in {seen[key]}= and {kind}=; a keyword is routed to a "
                    "provider that takes it, handled by policy in place, a hint, or a selector.",
                    name=kind,
                    value=key,
                )
            seen[key] = kind


def _per_route_key(
    option: str,
    spec: Mapping[str, Iterable[Any]] | None,
    routed: Mapping[str, object],
    sig: inspect.Signature | None,
) -> dict[str, tuple[Any, ...]]:
    """``also_neutral`` or ``meaningful_with``: route keyword -> tuple (parameter names when ``sig``)."""
    if spec is not None and not isinstance(spec, Mapping):
        raise PolicyConfigError(
            f"kernel_chain({option}={spec!r}): give a mapping route keyword -> list.", name=option, value=spec
        )
    entries: dict[str, tuple[Any, ...]] = {}
    for key, values in (spec or {}).items():
        if key not in routed:
            raise PolicyConfigError(
                f"kernel_chain({option}=...): {key!r} is not a route keyword ({', '.join(routed)}).",
                name=option,
                value=key,
                allowed=tuple(routed),
            )
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise PolicyConfigError(
                f"kernel_chain({option}[{key!r}]={values!r}): give a list.", name=option, value=values
            )
        entries[key] = tuple(values)
        for needed in entries[key]:
            if sig is not None and needed not in sig.parameters:
                raise PolicyConfigError(
                    f"kernel_chain({option}[{key!r}]): {needed!r} is not a parameter of {sig}.",
                    name=option,
                    value=needed,
                    allowed=tuple(sig.parameters),
                )
    return entries
