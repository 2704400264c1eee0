"""``tolerant_kwargs``: call a kernel that may lack some keywords, by policy.

The decision is made once: when the decorator is applied, the kernel's real
signature or schema says which of the listed keywords it lacks (``missing``).
On a call that passes none of them the wrapper is one set test away from a direct
call; on a call that passes one, the keyword's policy applies. No exception is
raised or caught to find out, so a TypeError or RuntimeError raised inside the
kernel always reaches the caller unchanged.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import re
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NoReturn, Protocol, TypeVar, final

import torch

from kernel_fallback import _config, _events
from kernel_fallback._signature import KwargSupport, kwarg_support
from kernel_fallback.exceptions import PolicyConfigError, UnsupportedKwargError

__all__ = ["TolerantFunction", "TolerantKernel", "kernels", "tolerant_kwargs"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
#: (policy, where it came from: "decorator", "default" or a variable's name)
Resolved = tuple[str, str]

EVENT: Final = "kernel_fallback.kwarg_dropped"
_PLAIN = (type(None), bool, int, float, str)
_NOT_PLAIN: Final = object()
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_registry: weakref.WeakSet[TolerantKernel] = weakref.WeakSet()


def _plain(value: object) -> object:
    """``value`` with lists as tuples if it is made of plain values only, else a marker."""
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(v) for v in value)
        return _NOT_PLAIN if _NOT_PLAIN in items else items
    return value if isinstance(value, _PLAIN) else _NOT_PLAIN


def _capturing(value: object) -> bool:
    """True while a CUDA graph is being captured on the current stream (no sync)."""
    return isinstance(value, torch.Tensor) and value.is_cuda and torch.cuda.is_current_stream_capturing()


def _is_neutral(value: object, neutral: object) -> bool:
    """True when passing ``value`` means the same as not passing the keyword."""
    if value is neutral:
        return True
    if isinstance(value, torch.Tensor):  # the common case, answered first
        return False
    # Only plain values compare safely (`tensor == x` is elementwise); a list and a tuple
    # of the same items mean the same to a kernel (window_size=[-1, -1]).
    plain = _plain(value)
    return plain is not _NOT_PLAIN and plain == _plain(neutral)


@final
class TolerantKernel:
    """The state of one decorated kernel, exposed as ``wrapper.tolerant``.

    ``missing`` are the listed keywords the kernel lacks, ``support`` where that was
    read, ``policies`` the resolved policy of each listed keyword with its source.
    """

    __slots__ = (
        "__weakref__",
        "_fields",
        "env",
        "kernel",
        "missing",
        "name",
        "neutral",
        "on_drop",
        "policies",
        "support",
    )

    def __init__(
        self,
        kernel: Callable[..., Any],
        name: str,
        neutral: Mapping[str, object],
        on_drop: str | Mapping[str, str] | None,
        env: str | None,
    ) -> None:
        self.kernel = kernel
        self.name = name
        self.neutral = dict(neutral)
        self.on_drop = on_drop
        self.env = env
        self.support: KwargSupport = kwarg_support(kernel)
        self.missing = tuple(k for k in self.neutral if not self.support.accepts(k))
        self.policies: dict[str, Resolved] = {}
        self._commit(self.resolve(_config.snapshot()))

    @property
    def env_vars(self) -> tuple[str, ...]:
        """Variables that set this kernel's policy, strongest first."""
        names = [_config.ENV_STRICT]
        if self.env:
            names.append(self.env)
        names += [_config.ENV_ON_DROP_PREFIX + _config.env_suffix(self.name), _config.ENV_ON_DROP]
        return tuple(names)

    def resolve(self, snap: _config.Snapshot) -> dict[str, Resolved]:
        """Each listed keyword's policy under ``snap``; raises on an invalid variable."""
        layers: list[tuple[str, str | dict[str, str]]] = []
        for var in self.env_vars[1:-1]:
            raw = snap.get(var)
            if raw is not None:
                layers.append((var, _config.parse_policy_spec(var, raw, self.neutral)))
        if self.on_drop is not None:
            layers.append(
                ("decorator", dict(self.on_drop) if isinstance(self.on_drop, Mapping) else self.on_drop)
            )
        if snap.default_policy is not None:
            layers.append((_config.ENV_ON_DROP, snap.default_policy))
        layers.append(("default", "warn"))
        resolved: dict[str, Resolved] = {}
        for kwarg in self.neutral:
            if snap.strict:
                resolved[kwarg] = ("raise", _config.ENV_STRICT)
                continue
            for source, spec in layers:
                policy = spec if isinstance(spec, str) else spec.get(kwarg)
                if policy is not None:
                    resolved[kwarg] = (policy, source)
                    break
        return resolved

    def _commit(self, resolved: dict[str, Resolved]) -> None:
        fields = []
        for kwarg in self.missing:
            policy, source = resolved[kwarg]
            if policy == "raise":
                continue
            action = "copied into the caller's buffer" if policy == "copy" else "dropped"
            described = _events.describe_key(
                ("kwarg", self.name, kwarg, policy),
                {
                    "event": EVENT,
                    "kernel": self.name,
                    "kwarg": kwarg,
                    "policy": policy,
                    "source": source,
                    "action": action,
                    "reason": f"{self.name} does not accept {kwarg!r} ({self.support.source})",
                },
            )
            fields.append(described)
        self._fields = fields  # the events module holds them only weakly
        self.policies = resolved

    def call_dropping(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The slow path: ``kwargs`` holds at least one keyword the kernel lacks."""
        copy_into: tuple[str, torch.Tensor] | None = None
        dropped: list[tuple[str, str, object]] = []
        for kwarg in self.missing:
            if kwarg not in kwargs:
                continue
            value = kwargs.pop(kwarg)
            if _is_neutral(value, self.neutral[kwarg]):
                continue
            policy, source = self.policies[kwarg]
            if policy == "copy":
                if not isinstance(value, torch.Tensor):
                    raise self._unsupported(
                        kwarg, value, "its policy is 'copy' but only a tensor buffer can be copied into"
                    )
                if copy_into is not None:
                    raise self._unsupported(
                        kwarg, value, f"'copy' already fills {copy_into[0]!r}: one result, one buffer"
                    )
                copy_into = (kwarg, value)
            elif policy == "raise":
                why = f"its policy is 'raise' (from {source})"
                if torch.compiler.is_dynamo_compiling():
                    _make_refuser()  # runs at trace time, not traced
                    _refuse_under_compile(self, kwarg, value, why)  # type: ignore[misc]
                raise self._unsupported(kwarg, value, why)
            dropped.append((kwarg, policy, value))
        result = self.kernel(*args, **kwargs)
        if copy_into is not None:
            result = self._copy_back(copy_into[0], copy_into[1], result)
        # Recorded once the call did what the policy says (a failed copy is no fallback).
        for kwarg, policy, value in dropped:
            if torch.compiler.is_dynamo_compiling():
                _events.note_traced("kwarg", self.name, kwarg, policy)
            else:
                _events.record(("kwarg", self.name, kwarg, policy), captured=_capturing(value))
        return result

    def _copy_back(self, kwarg: str, out: torch.Tensor, result: Any) -> Any:
        first = result[0] if isinstance(result, (tuple, list)) and result else result
        if not isinstance(first, torch.Tensor):
            raise self._unsupported(
                kwarg,
                out,
                f"its policy is 'copy' but the kernel returned {type(first).__name__}, not a tensor",
            )
        if first.shape != out.shape or first.dtype != out.dtype or first.device != out.device:
            raise ValueError(
                f"{self.name}: cannot copy the result into {kwarg}=: the result is "
                f"{tuple(first.shape)} {first.dtype} on {first.device}, the buffer is "
                f"{tuple(out.shape)} {out.dtype} on {out.device}; the buffer was left untouched."
            )
        out.copy_(first)
        if first is result:
            return out
        if isinstance(result, list):
            return [out, *result[1:]]
        if hasattr(result, "_fields"):  # a named tuple keeps its type
            return type(result)(out, *result[1:])
        return (out, *result[1:])

    def _unsupported(self, kwarg: str, value: object, why: str) -> UnsupportedKwargError:
        shown = (
            f"a tensor {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else repr(value)
        )
        env_vars = self.env_vars
        return UnsupportedKwargError(
            f"{self.name} does not accept the keyword {kwarg!r} (read from {self.support.source}) "
            f"and {kwarg}={shown} cannot be dropped: {why}. To change the policy set one of "
            f"{', '.join(env_vars[1:])} to warn|copy|raise (or 'kwarg=policy,...'); "
            f"{env_vars[0]} forces 'raise'.",
            kernel=self.name,
            kwarg=kwarg,
            env_vars=env_vars,
        )

    def stats(self) -> list[dict[str, Any]]:
        """This kernel's rows of :func:`kernel_fallback.stats`."""
        return [row for row in _events.stats() if row["kernel"] == self.name]

    def describe(self) -> dict[str, Any]:
        """The decision as data: which keywords are missing and each one's policy."""
        return {
            "kernel": self.name,
            "signature_source": self.support.source,
            "missing": list(self.missing),
            "policies": {
                k: {"policy": p, "source": s, "missing": k in self.missing, "neutral": repr(self.neutral[k])}
                for k, (p, s) in self.policies.items()
            },
        }

    def __repr__(self) -> str:
        return f"<TolerantKernel {self.name} missing={list(self.missing)}>"


_refuse_under_compile: Callable[[TolerantKernel, str, object, str], NoReturn] | None = None


def _make_refuser() -> bool:
    """Make ``_refuse_under_compile``: a raiser that torch.compile never traces.

    Without ``fullgraph`` Dynamo breaks the graph there and the error reaches the
    caller as the UnsupportedKwargError it is; with ``fullgraph=True`` compilation
    fails, naming this reason. Called while Dynamo traces a refusal: marked like
    ``note_traced`` so that Dynamo runs it then instead of tracing it (it could not
    trace ``torch.compiler.disable``), and so nothing imports torch._dynamo early.
    """
    global _refuse_under_compile
    if _refuse_under_compile is not None:
        return True

    def refuse(plan: TolerantKernel, kwarg: str, value: object, why: str) -> NoReturn:
        raise plan._unsupported(kwarg, value, why)

    options = {}
    if "reason" in inspect.signature(torch.compiler.disable).parameters:  # newer torch names it
        options["reason"] = "kernel_fallback: a keyword the kernel lacks was passed under the 'raise' policy"
    _refuse_under_compile = torch.compiler.disable(refuse, **options)  # type: ignore[no-untyped-call]
    return True


# Same marker as `torch._dynamo.assume_constant_result` (see _events.note_traced).
_make_refuser._dynamo_marked_constant = True  # type: ignore[attr-defined]


class TolerantFunction(Protocol[R_co]):
    """What ``tolerant_kwargs`` returns: the kernel, callable with keywords it may lack."""

    tolerant: TolerantKernel
    __name__: str

    @property
    def __wrapped__(self) -> Callable[..., R_co]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> R_co: ...


def _prepare_reload(snap: _config.Snapshot) -> Callable[[], None]:
    plans = list(_registry)
    resolved = [plan.resolve(snap) for plan in plans]

    def commit() -> None:
        for plan, new in zip(plans, resolved, strict=True):
            plan._commit(new)

    return commit


_config.on_reload(_prepare_reload)


def kernels() -> list[TolerantKernel]:
    """Every live decorated kernel, sorted by name."""
    return sorted(_registry, key=lambda plan: plan.name)


def _check_options(
    drop: object, on_drop: object, name: object, env: object
) -> tuple[dict[str, object], str | dict[str, str] | None]:
    if callable(drop) and not isinstance(drop, Mapping):
        raise TypeError(
            f"tolerant_kwargs needs the keywords to drop, got {drop!r}; "
            "write @tolerant_kwargs(drop=['out'], on_drop='copy')."
        )
    if isinstance(drop, str) or not isinstance(drop, Iterable):
        raise PolicyConfigError(
            f"tolerant_kwargs(drop={drop!r}): drop must be a list of keyword names or a "
            "mapping name -> neutral value, e.g. drop=['out'] or drop={'only_qv': False}.",
            name="drop",
            value=drop,
        )
    neutral: dict[str, object] = dict(drop) if isinstance(drop, Mapping) else dict.fromkeys(drop)
    if not neutral:
        raise PolicyConfigError(
            "tolerant_kwargs(drop=...) is empty: list at least one keyword the kernel may lack.",
            name="drop",
            value=drop,
        )
    for kwarg in neutral:
        if not isinstance(kwarg, str) or not kwarg.isidentifier() or keyword.iskeyword(kwarg):
            raise PolicyConfigError(
                f"tolerant_kwargs(drop=...): {kwarg!r} is not a keyword argument name.",
                name="drop",
                value=kwarg,
            )
    policy = _config.check_on_drop("tolerant_kwargs", on_drop, neutral)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise PolicyConfigError(
            f"tolerant_kwargs(name={name!r}): name must be a non-empty string.", name="name", value=name
        )
    if env is not None and (not isinstance(env, str) or not _ENV_NAME.match(env)):
        raise PolicyConfigError(
            f"tolerant_kwargs(env={env!r}): env must be an environment variable name "
            "(letters, digits, underscores, not starting with a digit).",
            name="env",
            value=env,
        )
    return neutral, policy


def _default_name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    for attr in ("__name__", "_qualname"):
        value = getattr(fn, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(fn).__name__


def tolerant_kwargs(
    drop: Iterable[str] | Mapping[str, object],
    on_drop: str | Mapping[str, str] | None = None,
    *,
    name: str | None = None,
    env: str | None = None,
) -> Callable[[Callable[..., R]], TolerantFunction[R]]:
    """Make a kernel tolerate keywords it may lack, by a policy decided once.

    ``drop`` lists the keywords the kernel may lack (neutral value ``None``) or maps
    each to its neutral value (``{"out": None, "only_qv": False}``): a missing
    keyword passed with its neutral value is dropped silently. Otherwise the policy
    of the keyword applies:

    - ``warn``: call without it and log a structured warning (once per key);
    - ``copy``: call without it and copy the result (or its first element) into the
      passed tensor, returning that tensor in the result's place;
    - ``raise``: :class:`UnsupportedKwargError` before the kernel runs.

    ``on_drop`` is one policy or a mapping keyword -> policy; unset, it is
    ``KERNEL_FALLBACK_ON_DROP`` or ``warn``. ``KERNEL_FALLBACK_ON_DROP__<NAME>`` and
    then the variable named by ``env`` override it; ``KERNEL_FALLBACK_STRICT`` makes
    every policy ``raise``. ``name`` is the kernel's name in events, errors and
    variables (default: its ``__name__``). Listed keywords the kernel accepts, and
    keywords not listed, are passed through untouched.

    The wrapper keeps ``__name__``, ``__doc__`` and ``__wrapped__``, and exposes its
    state as ``wrapper.tolerant`` (a :class:`TolerantKernel`).
    """
    neutral, policy = _check_options(drop, on_drop, name, env)

    def decorate(fn: Callable[..., R], /) -> TolerantFunction[R]:
        if isinstance(fn, (staticmethod, classmethod)):
            return type(fn)(decorate(fn.__func__))  # type: ignore[return-value]
        if not callable(fn):
            raise TypeError(f"tolerant_kwargs can only wrap a callable, got {fn!r}.")
        plan = TolerantKernel(fn, name or _default_name(fn), neutral, policy, env)
        _config.check_kernel_declared(plan.name, env, lambda: [k.name for k in kernels()])
        _registry.add(plan)
        missing = frozenset(plan.missing)
        call_dropping = plan.call_dropping

        wrapper: Any
        if missing:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if kwargs and not missing.isdisjoint(kwargs):
                    return call_dropping(args, kwargs)
                return fn(*args, **kwargs)

        elif isinstance(fn, types.FunctionType):

            def wrapper(*args: Any, **kwargs: Any) -> Any:  # a function: it may be a method
                return fn(*args, **kwargs)

        else:
            # Nothing to drop, and no method binding to keep (builtins, torch ops and
            # callable objects are no descriptors): a C-level forwarder costs next to
            # nothing on launch-bound calls (torch.mm(out=) on decode shapes).
            wrapper = functools.partial(fn)

        try:
            functools.update_wrapper(wrapper, fn)
        except AttributeError:  # objects without a __dict__ (torch ops) copy what they have
            wrapper.__wrapped__ = fn
        wrapper.__name__ = getattr(fn, "__name__", plan.name)
        wrapper.tolerant = plan
        result: TolerantFunction[R] = wrapper  # a function carrying `tolerant`
        return result

    return decorate
