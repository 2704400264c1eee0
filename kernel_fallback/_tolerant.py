"""``tolerant_kwargs``: call a kernel that may lack some keywords, by policy.

The decision is made once: when the decorator is applied, the kernel's real
signature or schema says which of the listed keywords it lacks (``missing``).
On a call that passes none of them the wrapper is one set test away from a direct
call; on a call that passes one, the keyword's policy applies. No exception is
raised or caught to find out, so a TypeError or RuntimeError raised inside the
kernel always reaches the caller unchanged.

What the wrapper is depends on the kernel (see :mod:`kernel_fallback._forwarder`): a
Python function that lacks nothing gets a clone of itself, one that lacks a keyword a
forwarder generated with its exact signature; builtins, torch ops, pybind11 functions
and ``**kwargs`` kernels a ``functools.partial`` or a generic wrapper.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NoReturn, Protocol, TypeVar, final

import torch

from kernel_fallback import _binding, _config, _events, _forwarder
from kernel_fallback._options import _capturing, _check_options, _default_name, _is_neutral
from kernel_fallback._signature import KwargSupport, kwarg_support
from kernel_fallback.exceptions import PolicyConfigError, UnsupportedKwargError

__all__ = ["TolerantFunction", "TolerantKernel", "kernels", "tolerant_kwargs"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
#: (policy, where it came from: "decorator", "default" or a variable's name)
Resolved = tuple[str, str]

EVENT: Final = "kernel_fallback.kwarg_dropped"
_registry: weakref.WeakSet[TolerantKernel] = weakref.WeakSet()
# Held while a kernel resolves its policies and joins the registry, and while a reload
# reads or commits the registry: a kernel decorated during a reload gets the new policy.
_registry_lock = threading.RLock()


def _reinit_after_fork() -> None:
    # Only the forking thread lives on in a child: a lock another thread held at fork
    # (a reload in progress) would stay held there, and the child's first decoration hang.
    global _registry_lock
    _registry_lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reinit_after_fork)


@final
class TolerantKernel:
    """The state of one decorated kernel, exposed as ``wrapper.tolerant``.

    ``missing`` are the listed keywords the kernel lacks, ``support`` where that was
    read, ``policies`` the resolved policy of each listed keyword with its source.
    """

    __slots__ = (
        "__weakref__",
        "_counters",
        "_fields",
        "_namespace",
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
        self._counters: dict[str, _events.Counter] = {}
        # The generated forwarder's globals, where its counters are swapped on a reload.
        self._namespace: dict[str, Any] | None = None
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
        counters: dict[str, _events.Counter] = {}
        for kwarg in self.missing:
            policy, source = resolved[kwarg]
            key = ("kwarg", self.name, kwarg, policy)
            if policy == "raise":
                counters[kwarg] = _events.Counter(key)  # never recorded, so never hot
                continue
            action = "copied into the caller's buffer" if policy == "copy" else "dropped"
            counters[kwarg] = _events.counter(key)
            described = _events.describe_key(
                key,
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
        self._counters = counters
        if self._namespace is not None:
            for i, kwarg in enumerate(self.missing):
                self._namespace[f"_kf_S{i}"] = counters[kwarg]

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
        if copy_into is not None and not torch.compiler.is_dynamo_compiling():
            # Traced code writes through functionalization and cannot ask is_inference().
            self._check_buffer(*copy_into)
        result = self.kernel(*args, **kwargs)
        if copy_into is not None:
            result = self._copy_back(copy_into[0], copy_into[1], result)
        # Recorded once the call did what the policy says (a failed copy is no fallback).
        if dropped and torch.compiler.is_dynamo_compiling():
            for kwarg, policy, _ in dropped:
                _events.note_traced("kwarg", self.name, kwarg, policy)
        elif dropped:
            # One capture check per call, and only when a CUDA tensor is involved: the
            # stream is the same for every keyword of the call.
            captured = any(_capturing(value) for _, _, value in dropped)
            for kwarg, policy, _ in dropped:
                counter = self._counters.get(kwarg)
                _events.record(
                    ("kwarg", self.name, kwarg, policy),
                    captured=captured,
                    counter=counter if counter is not None and counter.key[3] == policy else None,
                )
        return result

    def _call_from_forwarder(self, args: tuple[Any, ...], kwargs: dict[str, Any], *values: object) -> Any:
        """The slow path of a generated forwarder: ``values`` are the missing keywords' values."""
        for kwarg, value in zip(self.missing, values, strict=True):
            if value is not _forwarder.UNSET:
                kwargs[kwarg] = value
        return self.call_dropping(args, kwargs)

    def _check_buffer(self, kwarg: str, out: torch.Tensor) -> None:
        """Refuse, before the kernel runs, a buffer torch would not let ``copy_`` write."""
        why = None
        base = out._base
        if out.is_meta:
            why = "it is a meta tensor, which holds no data (a copy into it writes nothing)"
        elif out.requires_grad and out.is_leaf and torch.is_grad_enabled():
            why = "it is a leaf tensor that requires grad (in-place writes to it are refused)"
        elif out.requires_grad and base is not None and base.is_leaf and torch.is_grad_enabled():
            why = "it is a view of a leaf tensor that requires grad (in-place writes to it are refused)"
        elif out.is_inference() and not torch.is_inference_mode_enabled():
            why = "it is an inference-mode tensor and inference mode is off (in-place writes are refused)"
        elif any(stride == 0 and size > 1 for size, stride in zip(out.shape, out.stride(), strict=True)):
            why = "several of its elements share one memory location (an expanded tensor)"
        if why is not None:
            raise self._unsupported(
                kwarg, out, f"its policy is 'copy' but the buffer cannot be written: {why}"
            )

    def _copy_back(self, kwarg: str, out: torch.Tensor, result: Any) -> Any:
        if (
            result.__class__ is torch.Tensor
            and result.dtype is out.dtype
            and result.shape == out.shape
            and result.device == out.device
        ):  # the common case, answered with the fewest checks
            out.copy_(result)
            return out
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
        if hasattr(result, "n_sequence_fields"):  # a structseq (torch.return_types.max...) too
            return type(result)((out, *result[1:]))
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
        """This kernel's rows of :func:`kernel_fallback.stats`.

        Once :data:`~kernel_fallback._events.MAX_ENTRIES` keys are stored, the counts
        of new keys are stored in one ``<overflow>`` row; this kernel's share of it is
        still listed here under its own name (with no ``first_seen`` or ``where``).
        """
        rows = [row for row in _events.stats() if row["kernel"] == self.name]
        for kwarg, counter in self._counters.items():
            count = _events.overflowed_count(counter)
            if count:
                rows.append(
                    {
                        "kind": "kwarg",
                        "kernel": self.name,
                        "kwarg": kwarg,
                        "provider": None,
                        "policy": counter.key[3],
                        "source": self.policies[kwarg][1],
                        "count": count,
                        "compiled_traces": 0,
                        "graph_captures": 0,
                        "first_seen": "",
                        "where": "",
                    }
                )
        return rows

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

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickled, it is the same decoration made again, resolved in the new process.
        return (_restore_kernel, (self.kernel, self.neutral, self.on_drop, self.name, self.env))


def _restore_kernel(
    kernel: Callable[..., Any],
    neutral: dict[str, object],
    on_drop: str | Mapping[str, str] | None,
    name: str,
    env: str | None,
) -> TolerantKernel:
    wrapped: TolerantFunction[Any] = tolerant_kwargs(neutral, on_drop, name=name, env=env)(kernel)
    return wrapped.tolerant


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
    with _registry_lock:
        plans = list(_registry)
    _config.check_declared_kernels(snap, [plan.name for plan in plans])
    resolved = [plan.resolve(snap) for plan in plans]

    def commit() -> None:
        with _registry_lock:
            for plan, new in zip(plans, resolved, strict=True):
                plan._commit(new)
            # Decorated since `plans` was read: each resolved the configuration then in
            # force, which may be the old one. The new one is in force now (reload_config
            # sets it before committing), and was validated for every variable except
            # such a kernel's own: if that one is invalid the kernel keeps what it has,
            # as the kernels of a failed reload do.
            prepared = set(map(id, plans))
            for plan in list(_registry):
                if id(plan) not in prepared:
                    try:
                        new_policies = plan.resolve(snap)
                    except PolicyConfigError:
                        continue
                    plan._commit(new_policies)

    return commit


_config.on_reload(_prepare_reload)


def kernels() -> list[TolerantKernel]:
    """Every live decorated kernel, sorted by name."""
    with _registry_lock:
        plans = list(_registry)
    return sorted(plans, key=lambda plan: plan.name)


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
    state as ``wrapper.tolerant`` (a :class:`TolerantKernel`). For a Python function it
    is a function too (a clone, or a forwarder with the kernel's parameters), so it
    binds as a method as the kernel does. Stored at module level
    (``fa3 = tolerant_kwargs(...)(flash_attn_varlen_func)``), it takes the name it is
    stored under as ``__module__``/``__qualname__`` so that pickle (and ``spawn``) finds it.
    """
    neutral, policy = _check_options(drop, on_drop, name, env)

    def decorate(fn: Callable[..., R], /) -> TolerantFunction[R]:
        return decorate_stored(fn, _binding.stored_as(sys._getframe(1)))

    def decorate_stored(fn: Callable[..., R], stored: tuple[str, str] | None) -> TolerantFunction[R]:
        if isinstance(fn, (staticmethod, classmethod)):
            return type(fn)(decorate_stored(fn.__func__, stored))  # type: ignore[return-value]
        if not callable(fn):
            raise TypeError(f"tolerant_kwargs can only wrap a callable, got {fn!r}.")
        kernel_name = name or _default_name(fn)
        # Before registering: a misspelt per-kernel variable must not leave a kernel behind.
        _config.check_kernel_declared(kernel_name, lambda: [k.name for k in kernels()])
        with _registry_lock:
            plan = TolerantKernel(fn, kernel_name, neutral, policy, env)
            _registry.add(plan)
        wrapper: Any = _make_wrapper(fn, plan)
        try:
            functools.update_wrapper(wrapper, fn)
        except AttributeError:  # objects without a __dict__ (torch ops) copy what they have
            wrapper.__wrapped__ = fn
        wrapper.__name__ = getattr(fn, "__name__", plan.name)
        if stored is not None and isinstance(wrapper, types.FunctionType):
            # pickle finds a function by these two: make them lead to the wrapper.
            wrapper.__module__, wrapper.__qualname__ = stored
        wrapper.tolerant = plan
        result: TolerantFunction[R] = wrapper  # a function carrying `tolerant`
        return result

    return decorate


def _make_wrapper(fn: Callable[..., Any], plan: TolerantKernel) -> Any:
    """The cheapest callable that behaves as ``plan`` says (metadata is the caller's)."""
    missing = frozenset(plan.missing)
    if not missing:
        if isinstance(fn, types.FunctionType):
            return _forwarder.clone(fn)  # nothing can be missing: fn at its own cost
        # No method binding to keep (builtins, torch ops and callable objects are no
        # descriptors): a C-level forwarder costs next to nothing on launch-bound calls
        # (torch.mm(out=) on decode shapes).
        return functools.partial(fn)
    if _forwarder.is_coroutine_or_generator(fn):
        return _forwarder.same_kind(fn, plan.call_dropping, missing)
    hooks = _forwarder.Hooks(plan._call_from_forwarder, plan._check_buffer, plan._copy_back)
    with _registry_lock:  # no reload commits between reading the counters and publishing them
        neutral = {k: plan.neutral[k] for k in plan.missing}
        made = _forwarder.forwarder(fn, neutral, hooks, [plan._counters[k] for k in plan.missing])
        if made is not None:
            wrapper, plan._namespace = made
            return wrapper
    call_dropping = plan.call_dropping

    def generic(*args: Any, **kwargs: Any) -> Any:  # parameters a forwarder could not spell
        if kwargs and not missing.isdisjoint(kwargs):
            return call_dropping(args, kwargs)
        return fn(*args, **kwargs)

    return generic
