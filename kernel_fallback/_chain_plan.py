"""A chain's fast path for one active provider: a function generated once, at activation.

Reading a call generically (binding positional arguments to names, testing every
route keyword for a neutral value, removing hints) costs many times a launch-bound
kernel's own Python call. But for one active provider nearly all of it is known in
advance: which parameters it takes, which route keywords it lacks (each needing a
neutral value), which hints and selectors it must never see. :func:`make_plan`
writes that down as a function with the chain's own parameters, so that Python binds
the call once and the common call (every lacked keyword neutral) costs a few identity
tests and one call of the provider:

- parameters the provider takes are passed on; the plan's default for each is the
  provider's own default, so an argument the caller left out stays left out in effect;
- a route or drop keyword the provider lacks defaults to its neutral value and is
  tested for it (identity first, then the same comparison the chain makes); a drop
  keyword passed with a value (``out=``) sends the call to the provider's policy
  wrapper (``tolerant_kwargs``) instead of the bare kernel;
- hints the provider lacks are simply not passed; selectors must ask for the chain's
  own choice;
- anything else (a route keyword with a value, a selector naming a provider, an
  argument the provider cannot take, a missing required one) returns :data:`SLOW`,
  and the chain reads the call as it always did, from the arguments as given.

No plan is made when the fast path would be no faster or could differ: a provider
without a Python signature, one taking ``*args``/``**kwargs``, a chain with them, or a
provider lacking nothing (the chain then calls it with the arguments as they come).
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

from kernel_fallback._codegen import PREFIX, define
from kernel_fallback._options import _is_neutral

__all__ = ["SLOW", "make_plan"]


class _Slow:
    """What a plan returns when the call needs the chain's general path."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<slow path>"


SLOW: Final = _Slow()


class _Unset:
    """The plan's default for a parameter the caller must give (or the provider lacks)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not passed>"


_UNSET: Final = _Unset()
_PASSED: Final = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def make_plan(
    kernel_name: str,
    provider: str,
    logical: inspect.Signature,
    *,
    kernel: Callable[..., Any],
    impl: Callable[..., Any],
    lacking: frozenset[str],
    hints_lacking: frozenset[str],
    neutral: Mapping[str, object],
    routed: frozenset[str],
    also_neutral: Mapping[str, tuple[object, ...]],
    meaningful_with: Mapping[str, tuple[str, ...]],
    quiet_selectors: Mapping[str, frozenset[object]],
) -> Callable[..., Any] | None:
    """The fast path of a chain for one provider, or None where none is made (module docstring).

    ``kernel`` is the provider's own function, ``impl`` what the chain calls when a
    keyword it lacks is passed with a value (its ``tolerant_kwargs`` wrapper);
    ``lacking`` its route and drop keywords it lacks, ``hints_lacking`` its missing
    hints; ``quiet_selectors`` each selector's values that ask for the chain's own choice.
    """
    if not lacking and not hints_lacking:
        return None  # the chain passes the call on as it comes: cheaper than any plan
    params = list(logical.parameters.values())
    if any(p.kind not in (*_PASSED, inspect.Parameter.POSITIONAL_ONLY) for p in params):
        return None
    if any(p.name.startswith(PREFIX) or keyword.iskeyword(p.name) for p in params):
        return None
    try:
        own = inspect.signature(kernel)
    except (TypeError, ValueError):
        return None  # builtins, ops: no defaults to read
    theirs = own.parameters
    if any(
        p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in theirs.values()
    ):
        return None
    their_positional = [
        p.name
        for p in theirs.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    namespace: dict[str, Any] = {
        "_kf_U": _UNSET,
        "_kf_SLOW": SLOW,
        "_kf_kernel": kernel,
        "_kf_impl": impl,
        "_kf_isn": _is_neutral,
    }

    def ref(value: object) -> str:
        if value is None or value is True or value is False:
            return repr(value)
        name = f"_kf_c{len(namespace)}"
        namespace[name] = value
        return name

    defaults: dict[str, str] = {}  # parameter -> the source of its default in the plan
    tests: dict[str, str] = {}  # parameter -> when it sends the call to the slow path
    passed: list[str] = []  # given to the provider, in the logical order
    for p in params:
        name = p.name
        if name in quiet_selectors:
            defaults[name] = "_kf_U"
            quiet = ref(quiet_selectors[name])
            tests[name] = (
                f"not ({name} is _kf_U or (({name}.__class__ is int or {name}.__class__ is str) "
                f"and {name} in {quiet}))"
            )
        elif name in hints_lacking:
            defaults[name] = "None"  # never read: the provider does not get it
        elif name in lacking:
            defaults[name] = ref(neutral[name])
        elif name not in theirs:
            defaults[name] = "_kf_U"  # the provider cannot take it: given, the call goes slow
            tests[name] = f"{name} is not _kf_U"
        else:
            default = theirs[name].default
            if default is inspect.Parameter.empty:
                defaults[name] = "_kf_U"  # required by the provider: left out, it says so itself
                tests[name] = f"{name} is _kf_U"
            else:
                defaults[name] = ref(default)
            passed.append(name)
    for name in (p.name for p in params):
        if name in lacking and name in routed:
            # "n is None" means "n not given, or None" only where n's plan default is None.
            needs = meaningful_with.get(name, ())
            shortcut = bool(needs) and all(defaults[n] in ("None", "_kf_U") for n in needs)
            test = _neutral_test(name, neutral, also_neutral, needs if shortcut else (), ref)
            tests[name] = f"{name} is not None" if test == f"{name} is None" else f"not ({test})"
    slow_if = ["_kf_extra", "_kf_more", *tests.values()]

    by_position: list[str] = []
    for i, name in enumerate(their_positional):
        if i < len(passed) and passed[i] == name:
            by_position.append(name)
        else:
            break
    by_keyword = passed[len(by_position) :]
    if any(theirs[n].kind is inspect.Parameter.POSITIONAL_ONLY for n in by_keyword):
        return None
    dropped = [n for n in (p.name for p in params) if n in lacking and n not in routed]
    call_args = [*by_position, *(f"{n}={n}" for n in by_keyword)]
    call = f"_kf_kernel({', '.join(call_args)})"

    signature: list[str] = []
    positional_names = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    for i, name in enumerate(positional_names):
        signature.append(f"{name}={defaults[name]}")
        if params[i].kind is inspect.Parameter.POSITIONAL_ONLY and (
            i + 1 == len(positional_names) or params[i + 1].kind is not inspect.Parameter.POSITIONAL_ONLY
        ):
            signature.append("/")
    signature.append("*_kf_extra")
    signature += [f"{p.name}={defaults[p.name]}" for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    signature.append("**_kf_more")

    body = ["    if (" + "\n            or ".join(slow_if) + "):", "        return _kf_SLOW"]
    if dropped:
        with_values = " or ".join(f"{n} is not {defaults[n]}" for n in dropped)
        policy_args = ", ".join([*call_args, *(f"{n}={n}" for n in dropped)])
        body += [f"    if {with_values}:", f"        return _kf_impl({policy_args})"]
    body.append(f"    return {call}")
    source = f"def _kf_plan({', '.join(signature)}):\n" + "\n".join(body) + "\n"
    label = f"chain plan of {kernel_name} for {provider}"
    made = define(source, "_kf_plan", label, namespace, name=kernel_name, qualname=kernel_name)
    made.__name__ = made.__qualname__ = kernel_name
    made.__doc__ = f"The fast path of chain {kernel_name} for provider {provider}.\n\n{source}"
    return cast(Callable[..., Any], made)


def _neutral_test(
    name: str,
    neutral: Mapping[str, object],
    also_neutral: Mapping[str, tuple[object, ...]],
    needs: tuple[str, ...],
    ref: Callable[[object], str],
) -> str:
    """An expression true exactly when ``name``'s value is neutral in this call."""
    values = [neutral[name], *also_neutral.get(name, ())]
    refs = [ref(v) for v in values]
    terms = [f"{name} is {r}" for r in refs]
    if needs:
        terms.append("(" + " and ".join(f"{n} is None" for n in needs) + ")")
    # Identity answers the common call; the chain's own comparison answers the rest
    # (`None` needs none: only None is neutral for it).
    terms += [f"_kf_isn({name}, {r})" for v, r in zip(values, refs, strict=True) if v is not None]
    return " or ".join(terms)
