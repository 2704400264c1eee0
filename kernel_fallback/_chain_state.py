"""The state of a kernel chain: selection, loading, fallback events and per-call routing.

One :class:`KernelChain` per :func:`~kernel_fallback.kernel_chain`-decorated function
(``function.chain``). The function's fast path reads ``_fast`` (the active provider's
callable, the route keywords it lacks, its name); everything else happens here, once
per choice or once per route, under the chain's lock.

Under torch.compile the choice and each route are made at trace time by functions
Dynamo runs instead of tracing (``_activate``, ``_route``): the graph then calls the
chosen provider directly, and a ``reload_config()`` or ``reset()`` retraces it.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, final

import torch

from kernel_fallback import _config, _events
from kernel_fallback._call_shape import CallShape
from kernel_fallback._chain_plan import make_plan
from kernel_fallback._describe import Selection, describe_chain, render_table
from kernel_fallback._gates import BoolFlag, Gate
from kernel_fallback._options import _capturing
from kernel_fallback._providers import (
    AUTO,
    Loaded,
    Provider,
    Unavailable,
    declare_provider,
    lookup_provider,
    open_provider,
)
from kernel_fallback.exceptions import PolicyConfigError, ProviderUnavailableError, UnsupportedKwargError

__all__ = ["Fast", "KernelChain", "Selection", "activate", "chains", "route"]

PROVIDER_EVENT: Final = "kernel_fallback.provider_fallback"
DISPATCH_EVENT: Final = "kernel_fallback.dispatch"
_registry: weakref.WeakValueDictionary[str, KernelChain] = weakref.WeakValueDictionary()
_tokens = itertools.count()
_generations = itertools.count()


def _reinit_after_fork() -> None:
    # A chain's lock held by another thread at fork (a reload resetting it, a provider
    # loading) would stay held in the child, whose first call would then hang.
    for chain in list(_registry.values()):
        chain._lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reinit_after_fork)


def _not_active(*args: object, **kwargs: object) -> None:
    raise AssertionError("kernel_fallback: a chain was called before choosing its provider")


#: (generated fast path or None, callable, keywords that need the slow path, provider
#: name, positional arguments from which on are turned into keywords first)
Fast = tuple[Callable[..., Any] | None, Callable[..., Any], frozenset[str], str, int]
_NOT_ACTIVE: Final[Fast] = (None, _not_active, frozenset[str](), "", 0)


@final
class KernelChain:
    """The state of one chain, exposed as ``function.chain`` (see :func:`kernel_chain`).

    ``provider()`` declares implementations, ``use()`` picks one explicitly, ``active``
    says which one serves, ``describe()`` and ``describe_table()`` say why.
    """

    __slots__ = (
        "__weakref__",
        "_active",
        "_event_fields",
        "_fast",
        "_generation",
        "_loads",
        "_lock",
        "_neutral",
        "_policies",
        "_positional",
        "_providers",
        "_route_keys",
        "_routes",
        "_selection",
        "_shape",
        "_state",
        "_token",
        "_use",
        "default_provider",
        "explicit_may_fall_back",
        "flags",
        "logical",
        "name",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        shape: CallShape,
        policies: dict[str, str],
        flags: tuple[BoolFlag, ...],
        provider: str | None,
        explicit_may_fall_back: bool,
    ) -> None:
        self.logical = fn
        self.name = name = shape.kernel
        self.flags = flags
        self.default_provider = provider
        self.explicit_may_fall_back = explicit_may_fall_back
        self._shape = shape
        self._neutral = shape.neutral
        self._route_keys = shape.route_keys
        self._positional = shape.positional
        self._policies = policies
        self._providers: dict[str, Provider] = {}
        self._loads: dict[str, Loaded | Unavailable] = {}
        self._routes: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {}
        self._selection: Selection | None = None
        self._active: tuple[str, tuple[str, ...], dict[str, str]] | None = None
        self._fast: Fast | None = None
        self._state: Fast = _NOT_ACTIVE
        self._use: str | None = None
        self._event_fields: dict[tuple[str, str, str, str], object] = {}
        self._generation = ""
        self._lock = threading.RLock()
        self._token = f"{name}#{next(_tokens)}"
        _registry[self._token] = self

    # -- calls (the fast path is the function kernel_chain returns) ----------------

    def _dispatch(
        self, impl: Callable[..., Any], active: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The slow path: the call passes a keyword the active provider lacks, a hint or a selector."""
        shape = self._shape
        if len(args) > shape.bind_from:  # the fast path may have kept them for the active provider
            args, kwargs = shape.keywords(args, kwargs)
        for key in shape.selectors:
            if key in kwargs:
                chosen = shape.selected(key, kwargs.pop(key))
                if chosen is not None:
                    return self._call_selected(key, chosen, args, kwargs)
        needed = shape.needed(args, kwargs)
        target, policy = route(self._token, active, needed)
        if not target:
            got = self._loads.get(active)
            if isinstance(got, Loaded):
                shape.strip(got, needed, kwargs)
            return impl(*args, **kwargs)
        if torch.compiler.is_dynamo_compiling():
            _events.note_traced("dispatch", self.name, target, policy)
        else:
            # Under CUDA graph capture the route is baked into the graph: say so. The query
            # may come by keyword (sglang's varlen call passes every argument so).
            probe = args[0] if args else next(iter(kwargs.values()), None)
            captured = _capturing(probe)
            _events.record(("dispatch", self.name, target, policy), captured=captured)
        got = self._loads.get(target)
        if not isinstance(got, Loaded):  # reset() while this call was in flight: open it again
            got = self._open(target)
        return got.impl(*args, **shape.strip(got, needed, kwargs))

    def _call_selected(self, key: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call whose selector keyword asks for provider ``name``: served there or refused."""
        shape = self._shape
        value = next(v for v, p in shape.selectors[key].items() if p == name)
        with self._lock:
            got = self._load(name)
        if not isinstance(got, Loaded):
            others = [f"{key}={v!r}" for v, p in shape.selectors[key].items() if p is None]
            raise ProviderUnavailableError(
                f"{self.name}({key}={value!r}) asks for provider {name!r}, which cannot be used here: "
                f"{got.reason}. Pass {' or '.join(others) or 'no ' + key} to use the chain's providers "
                f"({', '.join(n for n in self._providers if n != name)}).",
                kernel=self.name,
                reasons={name: got.reason},
            ) from got.error
        needed = shape.needed(args, kwargs)
        for k in needed:
            if k in got.route_lacking:
                raise UnsupportedKwargError(
                    f"{self.name}({key}={value!r}): provider {name!r} does not take {k!r} "
                    f"({got.signature_source}); the call is refused rather than run without it.",
                    kernel=self.name,
                    kwarg=k,
                )
        return got.impl(*args, **shape.strip(got, needed, kwargs))

    def _open(self, name: str) -> Loaded:
        """A provider a route chose, loading it again if a reset forgot it."""
        with self._lock:
            got = self._load(name)
        if not isinstance(got, Loaded):
            raise ProviderUnavailableError(
                f"{self.name}: provider {name!r} was chosen for this call but can no longer be "
                f"used: {got.reason}.",
                kernel=self.name,
                reasons={name: got.reason},
            )
        return got

    # -- declaration -----------------------------------------------------------------

    def provider(
        self,
        name: str,
        target: str | None = None,
        *,
        loader: Callable[[], Callable[..., Any]] | None = None,
        gate: Gate | Sequence[Gate] = (),
        on_drop: str | Mapping[str, str] | None = None,
        unsupported: Iterable[str] | Callable[[Any], Iterable[str]] = (),
    ) -> None:
        """Declare the next provider of the chain, loaded lazily on first need.

        ``target`` is an import path ``"pkg.module:attr"``; or ``loader`` is a callable
        returning the kernel (raise ImportError, OSError or RuntimeError from it to say
        "unavailable here"). ``gate`` is one or more :class:`Gate` checked before loading.
        ``on_drop`` overrides the chain's policy for this provider. ``unsupported`` lists
        route or drop keywords the kernel accepts but does not honour (it ignores them):
        they are handled as if its signature lacked them; or a callable given the loaded
        kernel that returns them (to read them from the installed version).
        """
        spec = declare_provider(
            f"{self.name}.provider({name!r})",
            name,
            target,
            loader=loader,
            gate=gate,
            on_drop=on_drop,
            unsupported=unsupported,
            neutral=self._neutral,
        )
        with self._lock:
            if any(n.lower() == name.lower() for n in self._providers):
                raise PolicyConfigError(
                    f"{self.name}.provider({name!r}): a provider of that name is already declared.",
                    name="name",
                    value=name,
                )
            self._providers[name] = spec
            self._reset(None)

    def use(self, name: str | None) -> None:
        """Choose a provider explicitly (stronger than the environment); None undoes it.

        ``use("auto")`` forces the automatic order even when the environment names one.
        """
        if name is not None and name.strip().lower() != AUTO:
            name = lookup_provider(f"{self.name}.use(name)", name, self._providers)
        with self._lock:
            self._use = AUTO if name is not None and name.strip().lower() == AUTO else name
            self._reset(None)

    def reset(self) -> None:
        """Forget every load result (also failures) and the choice; the next call loads again."""
        with self._lock:
            self._loads.clear()
            self._reset(None)

    def _reset(self, selection: Selection | None) -> None:
        self._selection = selection
        self._active = None
        self._routes = {}
        self._fast = None
        # Read by a call that finds no active provider, so a graph compiled then is
        # guarded on it and retraced after a reset instead of calling a stale provider.
        # A string: torch.compile may turn an int that changes into a dynamic value.
        self._generation = str(next(_generations))

    # -- selection -------------------------------------------------------------------

    @property
    def providers(self) -> tuple[str, ...]:
        """The declared provider names, in declaration order."""
        return tuple(self._providers)

    @property
    def env_var(self) -> str:
        """The variable that names this chain's provider explicitly."""
        return _config.ENV_PROVIDER_PREFIX + _config.env_suffix(self.name)

    @property
    def active(self) -> str:
        """The provider that serves calls (choosing and loading it if not done yet)."""
        self._activate()
        assert self._active is not None
        return self._active[0]

    def select(self, snap: _config.Snapshot) -> Selection:
        """The providers to try under ``snap``, in order; raises on an invalid variable."""
        names = tuple(self._providers)
        if not names:
            raise ProviderUnavailableError(
                f"{self.name}: no provider is declared; add one with {self.name}.provider(...).",
                kernel=self.name,
                reasons={},
            )
        _config.check_near_misses(snap, _config.ENV_PROVIDER_PREFIX, [c.env_var for c in chains()])
        auto, auto_source = self._automatic(snap)
        var = self.env_var
        raw = snap.get(var)
        explicit: str | None = None
        source = ""
        if self._use is not None:
            source = f"{self.name}.use({self._use!r})"
            explicit = None if self._use == AUTO else self._use
        elif raw is not None:
            source = f"{var}={raw!r}"
            explicit = None if raw.strip().lower() == AUTO else lookup_provider(var, raw, names)
        elif self.default_provider is not None:
            source = f"kernel_chain(provider={self.default_provider!r})"
            explicit = lookup_provider("kernel_chain(provider)", self.default_provider, names)
        if explicit is None:
            order, source = auto, (f"{source}, so {auto_source}" if source else auto_source)
        elif self.explicit_may_fall_back:
            order = (explicit, *(n for n in auto if n != explicit))
        else:
            order = (explicit,)
        excluded = {
            n: (f"{source} chose {explicit!r}" if explicit else f"not in the order {source} selects")
            for n in names
            if n not in order
        }
        return Selection(order, explicit, source, snap.strict, excluded)

    def _automatic(self, snap: _config.Snapshot) -> tuple[tuple[str, ...], str]:
        if not self.flags:
            return tuple(self._providers), "declaration order"
        decided: tuple[BoolFlag, bool, str] | None = None
        for flag in self.flags:  # every set flag is validated, the first one decides
            value = flag.read(snap)
            if value is not None and decided is None:
                decided = (flag, value, f"{flag.var}={snap.get(flag.var)!r}")
        if decided is None:
            first = self.flags[0]
            decided = (first, first.default, f"{first.var} unset (default {str(first.default).lower()})")
        flag, value, source = decided
        order = flag.order(value)
        for n in order:
            if n not in self._providers:
                raise PolicyConfigError(
                    f"{self.name}: {flag!r} lists {n!r}, which is not a declared provider "
                    f"({', '.join(self._providers)}).{_config.did_you_mean(n, self._providers)}",
                    name=flag.var,
                    value=n,
                    allowed=tuple(self._providers),
                )
        return order, source

    def _load(self, name: str) -> Loaded | Unavailable:
        got = self._loads.get(name)
        if got is None:
            got = open_provider(
                self._providers[name],
                chain=self.name,
                positional=self._positional,
                neutral=self._neutral,
                route_keys=frozenset(self._route_keys),
                policies=self._policies,
                hints=self._shape.hints,
            )
            self._loads[name] = got
        return got

    def _activate(self) -> Fast:
        """Choose and open the active provider, unless done; raise when none can serve."""
        with self._lock:
            if self._fast is not None:
                return self._fast
            sel = self._selection
            if sel is None:
                sel = self._selection = self.select(_config.snapshot())
            skipped: dict[str, str] = {}
            first_error: BaseException | None = None
            chosen: Loaded | None = None
            for name in sel.order:
                got = self._load(name)
                if isinstance(got, Loaded):
                    chosen = got
                    break
                skipped[name] = got.reason
                first_error = first_error or got.error
            if chosen is None:
                raise self._unavailable(sel, skipped) from first_error
            if skipped:
                self._fell_back(sel, chosen.name, skipped, first_error)
            self._active = (chosen.name, sel.order, skipped)
            self._routes = {}
            # What sends a call to the slow path: a route keyword it lacks, a hint it
            # lacks (removed there), a selector (never passed to a provider).
            check = chosen.route_lacking | chosen.hints_lacking | frozenset(self._shape.selectors)
            plan = self._plan(chosen)
            self._fast = self._state = (plan, chosen.impl, check, chosen.name, self._bind_from(chosen))
            return self._fast

    def _plan(self, chosen: Loaded) -> Callable[..., Any] | None:
        """The fast path generated for ``chosen`` (see :mod:`kernel_fallback._chain_plan`), or None."""
        shape = self._shape
        if shape.signature is None or chosen.kernel is None:
            return None
        return make_plan(
            self.name,
            chosen.name,
            shape.signature,
            kernel=chosen.kernel,
            impl=chosen.impl,
            lacking=chosen.lacking,
            hints_lacking=chosen.hints_lacking,
            neutral=shape.neutral,
            routed=shape.routed,
            also_neutral=shape.also_neutral,
            meaningful_with=shape.meaningful_with,
            quiet_selectors=shape.quiet_selectors,
        )

    def _bind_from(self, chosen: Loaded) -> int:
        """Where the fast path starts turning positional arguments into keywords for ``chosen``.

        A provider whose positional parameters begin with all of the chain's, and that
        lacks none of them, takes a positional call as it is (sgl_kernel's
        ``flash_attn_with_kvcache`` takes sglang's 28 arguments directly); any other
        gets them as keywords.
        """
        shape = self._shape
        names = shape.names
        if shape.bind_from >= len(names):  # nothing to bind (or *args)
            return shape.bind_from
        if chosen.positional is None or chosen.positional[: len(names)] != names:
            return shape.bind_from
        if set(names[shape.bind_from :]) & (chosen.lacking | chosen.hints_lacking):
            return shape.bind_from
        return len(names)

    def _unavailable(self, sel: Selection, skipped: dict[str, str]) -> ProviderUnavailableError:
        if sel.explicit is not None and len(sel.order) == 1:
            return ProviderUnavailableError(
                f"{self.name}: provider {sel.explicit!r} was requested by {sel.source} but cannot be "
                f"used: {skipped[sel.explicit]}. Unset it (or set {self.env_var}=auto) to let the chain "
                f"choose among {', '.join(self._providers)}, or declare the chain with "
                "explicit_may_fall_back=True.",
                kernel=self.name,
                reasons=dict(skipped),
            )
        reasons = {**skipped, **{n: f"not selected: {why}" for n, why in sel.excluded.items()}}
        listed = "; ".join(f"{n}: {why}" for n, why in reasons.items())
        return ProviderUnavailableError(
            f"{self.name}: no provider can be used (order from {sel.source}): {listed}.",
            kernel=self.name,
            reasons=reasons,
        )

    def _fell_back(
        self, sel: Selection, chosen: str, skipped: dict[str, str], error: BaseException | None
    ) -> None:
        wanted = sel.order[0]
        if sel.strict:
            raise ProviderUnavailableError(
                f"{self.name}: {_config.ENV_STRICT} is set and the chain would fall back from "
                f"{wanted!r} to {chosen!r} ({wanted}: {skipped[wanted]}). Choose {chosen!r} "
                f"explicitly with {self.env_var}={chosen}, or unset {_config.ENV_STRICT}.",
                kernel=self.name,
                reasons=dict(skipped),
            ) from error
        key = ("provider", self.name, chosen, "fallback")
        # The events module holds static fields weakly: the chain keeps them alive.
        self._event_fields[key] = _events.describe_key(
            key,
            {
                "event": PROVIDER_EVENT,
                "kernel": self.name,
                "wanted": wanted,
                "chosen": chosen,
                "reason": skipped[wanted],
                "skipped": dict(skipped),
                "mode": "explicit" if sel.explicit else "automatic",
                "source": sel.source,
                "policy": "fallback",
            },
        )
        _events.record(key)

    def route_for(self, active: str, needed: tuple[str, ...]) -> tuple[str, str]:
        """Where a call passing the non-neutral route keywords ``needed`` goes: (provider, policy).

        ``("", "")`` means the active provider itself (its ``on_drop`` policy applies).
        Computed once per (active, keywords) and cached; may open later providers.
        """
        key = (active, needed)
        hit = self._routes.get(key)
        if hit is not None:
            return hit
        with self._lock:
            # A reset() or reload_config() while this call was in flight forgot the loads
            # and the choice: take them up again rather than send the call where it fails.
            loaded = self._loads.get(active) or self._load(active)
            if not isinstance(loaded, Loaded):
                return ("", "")
            missing = tuple(k for k in needed if k in loaded.route_lacking)
            result = ("", "")
            if missing:
                if self._active is None:
                    self._activate()
                assert self._active is not None
                order = self._active[1]
                for name in order:
                    got = self._load(name) if name != active else loaded
                    if isinstance(got, Loaded) and got.route_lacking.isdisjoint(needed):
                        result = self._describe_route(loaded, name, missing)
                        break
            self._routes[key] = result
            return result

    def _describe_route(self, active: Loaded, target: str, missing: tuple[str, ...]) -> tuple[str, str]:
        shown = ", ".join(missing)
        sel = self._selection
        if sel is not None and sel.strict:
            raise UnsupportedKwargError(
                f"{self.name}: the active provider {active.name!r} lacks {shown} and provider "
                f"{target!r} takes it, but {_config.ENV_STRICT} forbids re-routing calls. Choose "
                f"{target!r} with {self.env_var}={target}, or unset {_config.ENV_STRICT}.",
                kernel=self.name,
                kwarg=missing[0],
                env_vars=(_config.ENV_STRICT, self.env_var),
            )
        policy = "route:" + "+".join(missing)
        key = ("dispatch", self.name, target, policy)
        self._event_fields[key] = _events.describe_key(
            key,
            {
                "event": DISPATCH_EVENT,
                "kernel": self.name,
                "active": active.name,
                "chosen": target,
                "kwargs": list(missing),
                "policy": policy,
                "source": active.signature_source,
                "reason": f"{active.name} lacks {shown} ({active.signature_source}); {target} takes it",
            },
        )
        return target, policy

    # -- introspection ---------------------------------------------------------------

    def describe(self, *, load: bool = True) -> dict[str, Any]:
        """This chain as data: providers in order, the active one, why others were skipped.

        With ``load`` (the default) the active provider is chosen first, as a call would;
        a configuration or availability error is reported under ``"error"``, not raised.
        """
        error = None
        if load:
            try:
                self._activate()
            except (PolicyConfigError, ProviderUnavailableError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            return describe_chain(
                kernel=self.name,
                env_var=self.env_var,
                selection=self._selection,
                active=self._active[0] if self._active is not None else None,
                providers=self._providers,
                loads=self._loads,
                error=error,
            )

    def describe_table(self, *, load: bool = True) -> str:
        """:meth:`describe` as a table for people."""
        return render_table([self.describe(load=load)])

    def __repr__(self) -> str:
        active = f" active={self._active[0]!r}" if self._active is not None else ""
        return f"<KernelChain {self.name} providers={list(self._providers)}{active}>"


def activate(token: str, generation: str) -> bool:
    """Choose and open a chain's provider; under torch.compile run at trace time, not traced."""
    del generation  # only there to be guarded on (see KernelChain._reset)
    _registry[token]._activate()
    return True


def route(token: str, active: str, needed: tuple[str, ...]) -> tuple[str, str]:
    """:meth:`KernelChain.route_for` by token; run by Dynamo at trace time, not traced."""
    return _registry[token].route_for(active, needed)


# Same marker as `torch._dynamo.assume_constant_result` (see _events.note_traced): the
# choice is made once at trace time and the graph calls the chosen provider directly.
activate._dynamo_marked_constant = True  # type: ignore[attr-defined]
route._dynamo_marked_constant = True  # type: ignore[attr-defined]


def chains() -> list[KernelChain]:
    """Every live chain, sorted by name."""
    return sorted(_registry.values(), key=lambda chain: chain.name)


def _prepare_reload(snap: _config.Snapshot) -> Callable[[], None]:
    live = [chain for chain in chains() if chain.providers]
    selections = [chain.select(snap) for chain in live]

    def commit() -> None:
        for chain, selection in zip(live, selections, strict=True):
            with chain._lock:
                chain._reset(selection)

    return commit


_config.on_reload(_prepare_reload)
