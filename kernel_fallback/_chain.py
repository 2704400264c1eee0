"""``kernel_chain``: one logical kernel, an ordered chain of providers, called as one function.

Declared once, with options checked when declared::

    @kernel_chain(flags=[BoolFlag("USE_FAST", default=True, when_true=("fast", "torch"),
                                  when_false=("torch",))],
                  route=["sinks", "softcap"], drop={"out": None}, on_drop={"out": "copy"})
    def attention(q, k, v, *, sinks=None, softcap=0.0, out=None):
        '''The logical signature and docstring; the body is never called.'''
        raise NotImplementedError

    attention.provider("fast", "fast_pkg.ops:attention", gate=cuda_capability(9))
    attention.provider("torch", loader=load_reference)

Selection, strongest first: ``chain.use(name)``; ``KERNEL_FALLBACK_PROVIDER__<NAME>``;
``kernel_chain(provider=...)`` (these three are *explicit*); else the *automatic* order
of the first declared flag whose variable is set (else of the first flag's default);
else the declaration order. ``auto`` in the variable or ``use("auto")`` forces the
automatic order. An automatic choice that cannot be opened falls back to the next
provider of the order and records one ``provider`` event; an explicit one raises
:class:`ProviderUnavailableError` unless ``explicit_may_fall_back=True``;
``KERNEL_FALLBACK_STRICT`` makes any fallback raise.

Per call, positional arguments past the leading plain parameters are first turned into
their keywords (unless the active provider has the chain's own positional order), so a
keyword is handled the same whether named or not. ``route`` keywords change the result:
when the active provider lacks one that a call passes with a non-neutral value, the call
goes to the first provider of the order that takes every such keyword (one ``dispatch``
event per route), else the keyword's ``on_drop`` policy applies (default ``raise``).
``drop`` keywords are handled in place by the active provider's policy (``copy`` for
``out``). ``hints`` never change the result and are removed silently where lacking;
``selectors`` are consumed by the chain and may name a provider. The fast path is one
set test and the provider call.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar

from kernel_fallback import _config
from kernel_fallback._call_shape import call_shape
from kernel_fallback._chain_plan import SLOW
from kernel_fallback._chain_state import KernelChain, activate, chains
from kernel_fallback._describe import render_table
from kernel_fallback._gates import BoolFlag, Gate
from kernel_fallback._providers import check_provider_name
from kernel_fallback.exceptions import PolicyConfigError

__all__ = ["ChainFunction", "KernelChain", "chains", "describe", "describe_table", "kernel_chain"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class ChainFunction(Protocol[P, R_co]):
    """What :func:`kernel_chain` returns: the logical function, served by its chain.

    ``provider``, ``use``, ``reset``, ``describe`` and ``describe_table`` are those of
    its :class:`KernelChain`, ``chain`` (which also says which provider is ``active``).
    """

    __name__: str
    __wrapped__: Callable[..., Any]
    chain: KernelChain

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def provider(
        self,
        name: str,
        target: str | None = None,
        *,
        loader: Callable[[], Callable[..., Any]] | None = None,
        gate: Gate | Sequence[Gate] = (),
        on_drop: str | Mapping[str, str] | None = None,
        unsupported: Iterable[str] | Callable[[Any], Iterable[str]] = (),
    ) -> None: ...

    def use(self, name: str | None) -> None: ...

    def reset(self) -> None: ...

    def describe(self, *, load: bool = True) -> dict[str, Any]: ...

    def describe_table(self, *, load: bool = True) -> str: ...


def _chained(state: KernelChain, fn: Callable[P, R]) -> ChainFunction[P, R]:
    """The function callers call: the fast path, then the state's slow paths."""
    token = state._token
    dispatch = state._dispatch
    quiet = state._shape.quiet
    slow = SLOW

    def chained(*args: Any, **kwargs: Any) -> Any:
        fast = state._fast
        if fast is None:
            activate(token, state._generation)
            # A second name: torch.compile has already read `_fast` (None) in this trace.
            fast = state._state
        plan, impl, check, active, bind_from = fast
        if plan is not None:  # the provider lacks something: its generated fast path
            result = plan(*args, **kwargs)
            if result is not slow:
                return result
        elif len(args) <= bind_from and (not kwargs or check.isdisjoint(kwargs) or quiet(kwargs, check)):
            return impl(*args, **kwargs)
        return dispatch(impl, active, args, kwargs)

    functools.update_wrapper(chained, fn)
    chained.chain = state  # type: ignore[attr-defined]
    chained.provider = state.provider  # type: ignore[attr-defined]
    chained.use = state.use  # type: ignore[attr-defined]
    chained.reset = state.reset  # type: ignore[attr-defined]
    chained.describe = state.describe  # type: ignore[attr-defined]
    chained.describe_table = state.describe_table  # type: ignore[attr-defined]
    return chained  # type: ignore[return-value]


def kernel_chain(
    *,
    name: str | None = None,
    route: Iterable[str] | Mapping[str, object] = (),
    drop: Iterable[str] | Mapping[str, object] = (),
    on_drop: str | Mapping[str, str] | None = None,
    hints: Iterable[str] = (),
    also_neutral: Mapping[str, Iterable[object]] | None = None,
    meaningful_with: Mapping[str, Iterable[str]] | None = None,
    selectors: Mapping[str, Mapping[object, str | None]] | None = None,
    flags: Sequence[BoolFlag] = (),
    provider: str | None = None,
    explicit_may_fall_back: bool = False,
) -> Callable[[Callable[P, R]], ChainFunction[P, R]]:
    """Turn a logical signature into a :class:`KernelChain`; declare providers on the result.

    - ``name``: the kernel's name in events, errors and ``KERNEL_FALLBACK_PROVIDER__<NAME>``
      (default: the function's ``__name__``).
    - ``route``: keywords that change the result, routed to a provider that takes them
      when the active one lacks them; ``drop``: keywords a provider may ignore by policy
      (``out``). Lists take the neutral value from the logical signature's default;
      mappings give it.
    - ``hints``: keywords that never change the result (``num_splits``, ``pack_gqa``):
      passed to providers that take them, removed silently (no event) for the others.
    - ``also_neutral``: keyword -> further values that mean "off" (``attention_chunk``:
      ``[0]`` besides None); ``meaningful_with``: keyword -> the parameters it means
      something with (``cu_seqlens_k_new``: ``["k", "v"]``): when none of them is given
      (or is None), any value of the keyword is neutral.
    - ``selectors``: keyword -> {value: provider name or None}; the keyword is never
      passed to a provider: None serves the call as usual, a name sends it to that
      provider (even outside the automatic order) or refuses it when that provider
      cannot be used (``ProviderUnavailableError``) or lacks a keyword the call needs
      (``UnsupportedKwargError``); a value not listed raises ``PolicyConfigError``.
    Routed, dropped, hint and selector parameters may be positional-or-keyword: a
    positional argument past the leading plain parameters is turned into its keyword
    before routing, so it is handled exactly as if named.
    - ``on_drop``: policy (``warn``/``copy``/``raise``) or keyword -> policy, for a
      keyword nobody in the order takes. Route keywords default to ``raise``, drop
      keywords to the core default (``KERNEL_FALLBACK_ON_DROP`` or ``warn``).
    - ``flags``: :class:`BoolFlag` host variables that pick the automatic order.
    - ``provider``: an explicit default choice (the environment overrides it).
    - ``explicit_may_fall_back``: let an explicit choice that cannot load fall back
      (with an event) instead of raising :class:`ProviderUnavailableError`.
    """
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise PolicyConfigError(
            f"kernel_chain(name={name!r}): give a non-empty string.", name="name", value=name
        )
    if not isinstance(flags, Sequence) or not all(isinstance(f, BoolFlag) for f in flags):
        raise TypeError(f"kernel_chain(flags={flags!r}): give a list of BoolFlag(...).")
    if provider is not None:
        check_provider_name("kernel_chain(provider)", provider)
    if not isinstance(explicit_may_fall_back, bool):
        raise PolicyConfigError(
            f"kernel_chain(explicit_may_fall_back={explicit_may_fall_back!r}): give True or False.",
            name="explicit_may_fall_back",
            value=explicit_may_fall_back,
        )

    def decorate(fn: Callable[P, R], /) -> ChainFunction[P, R]:
        if not inspect.isfunction(fn):
            raise TypeError(
                f"kernel_chain decorates a function whose signature is the logical one, got {fn!r}."
            )
        sig = inspect.signature(fn)
        kernel = name or fn.__name__
        where = f"kernel_chain({kernel})"
        shape = call_shape(
            where,
            kernel,
            sig,
            route=route,
            drop=drop,
            hints=hints,
            also_neutral=also_neutral,
            meaningful_with=meaningful_with,
            selectors=selectors,
        )
        neutral = shape.neutral
        checked = _config.check_on_drop(where, on_drop, neutral)
        policies = dict.fromkeys(shape.route_keys, "raise")
        if isinstance(checked, str):
            policies = dict.fromkeys(neutral, checked)
        elif checked:
            policies.update(checked)
        state = KernelChain(
            fn,
            shape=shape,
            policies=policies,
            flags=tuple(flags),
            provider=provider,
            explicit_may_fall_back=explicit_may_fall_back,
        )
        return _chained(state, fn)

    return decorate


def describe(*, load: bool = True) -> list[dict[str, Any]]:
    """Every live chain as data (see :meth:`KernelChain.describe`), sorted by name."""
    return [chain.describe(load=load) for chain in chains()]


def describe_table(*, load: bool = True) -> str:
    """Every live chain as a table for people."""
    return render_table(describe(load=load))
