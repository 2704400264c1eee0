"""Per-kernel forwarders, generated once at decoration: a decorated call costs a direct one.

A generic ``*args, **kwargs`` wrapper pays for packing the arguments, testing every
keyword and unpacking them again: several times a no-op kernel's own call cost. For a
plain Python function the wrapper does not need to be generic:

- when the kernel lacks none of the listed keywords, :func:`clone` returns a copy of
  the function itself (same code, globals, defaults and closure);
- otherwise :func:`forwarder` generates a function with the kernel's exact parameters
  plus each missing keyword as a keyword-only parameter (for builtins, torch ops,
  pybind11 functions and callable objects: ``*args`` and ``**kwargs`` around them).
  A call that does not pass one costs one identity test per missing keyword; one
  that passes a tensor whose key is already logged ticks the key's counter (see
  ``_events.Counter``) and calls the kernel without it. Everything else (the first
  occurrence, listeners, ``raise``, ``copy`` checks that fail, non-tensor values, CUDA
  graph capture, torch.compile tracing) goes to the kernel's general slow path, which
  decides exactly as for any other callable.

Under torch.compile the forwarder asks ``is_dynamo_compiling()`` before it reads any
counter state, so Dynamo traces only the slow path: no guard on the counters, no
recompile when they change, no graph break.
"""

from __future__ import annotations

import inspect
import keyword
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

from kernel_fallback._codegen import PREFIX, define
from kernel_fallback._events import Counter
from kernel_fallback._options import stream_capturing

__all__ = ["UNSET", "Hooks", "clone", "forwarder", "is_coroutine_or_generator", "same_kind"]


class _Unset:
    """The default of a missing keyword in a forwarder: the caller did not pass it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not passed>"

    def __reduce__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


def clone(fn: types.FunctionType) -> types.FunctionType:
    """A new function object running ``fn``'s code: ``fn`` at a direct call's cost.

    It binds as a method exactly as ``fn`` does; the caller copies the metadata.
    """
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ is not None else None
    return copy


class Hooks:
    """What a generated forwarder calls into; all bound to one decorated kernel."""

    __slots__ = ("check_buffer", "copy_back", "slow")

    def __init__(
        self,
        slow: Callable[..., Any],
        check_buffer: Callable[[str, torch.Tensor], None],
        copy_back: Callable[[str, torch.Tensor, Any], Any],
    ) -> None:
        self.slow = slow
        self.check_buffer = check_buffer
        self.copy_back = copy_back


@dataclass(frozen=True, slots=True)
class _Params:
    """A forwarder's parameters, as the kernel's code object lists them."""

    positional: tuple[str, ...]
    n_posonly: int
    kwonly: tuple[str, ...]
    varargs: str | None
    varkw: str | None
    defaults: tuple[Any, ...] | None
    kwdefaults: dict[str, Any]


def _parameters(fn: Callable[..., Any], missing: Mapping[str, object]) -> _Params | None:
    """``fn``'s own parameters for a Python function, ``*args, **kwargs`` for anything else.

    None when a name could not be spelt in source or would shadow one the forwarder uses.
    """
    if any(name.startswith(PREFIX) for name in missing):
        return None
    if not isinstance(fn, types.FunctionType):
        # Builtins, torch ops, pybind11, callable objects: Python cannot bind their
        # parameters for them, so they bind them themselves, as on a direct call.
        return _Params((), 0, (), "_kf_args", "_kf_kwargs", None, {})
    code = fn.__code__
    names = code.co_varnames
    n_args, n_kwonly = code.co_argcount, code.co_kwonlyargcount
    rest = n_args + n_kwonly
    varargs = names[rest] if code.co_flags & inspect.CO_VARARGS else None
    varkw = names[rest + (varargs is not None)] if code.co_flags & inspect.CO_VARKEYWORDS else None
    params = _Params(
        names[:n_args],
        code.co_posonlyargcount,
        names[n_args:rest],
        varargs,
        varkw,
        fn.__defaults__,
        dict(fn.__kwdefaults__ or {}),
    )
    spelt = [*params.positional, *params.kwonly, *(n for n in (varargs, varkw) if n is not None)]
    if any(
        not n.isidentifier() or keyword.iskeyword(n) or n.startswith(PREFIX) or n in missing for n in spelt
    ):
        return None
    return params


def _source(params: _Params, missing: Mapping[str, object]) -> str:
    """The forwarder's source: test each missing keyword, tick or go the general way."""
    n_args, n_defaults = len(params.positional), len(params.defaults or ())
    signature: list[str] = []
    for i, name in enumerate(params.positional):
        signature.append(f"{name}=None" if i >= n_args - n_defaults else name)  # real defaults set later
        if i == params.n_posonly - 1:
            signature.append("/")
    signature.append(f"*{params.varargs}" if params.varargs else "*")
    signature += [f"{name}=None" if name in params.kwdefaults else name for name in params.kwonly]
    signature += [f"{name}=None" for name in missing]
    if params.varkw:
        signature.append(f"**{params.varkw}")

    star = [f"*{params.varargs}"] if params.varargs else []
    double_star = [f"**{params.varkw}"] if params.varkw else []
    by_name = [f"{n}={n}" for n in params.kwonly]
    call = f"_kf_fn({', '.join([*params.positional, *star, *by_name, *double_star])})"
    packed = [*params.positional, *star]
    packed_args = f"({', '.join(packed)}{',' if len(packed) == 1 else ''})"
    packed_kwargs = "{" + ", ".join([*(f"{n!r}: {n}" for n in params.kwonly), *double_star]) + "}"
    slow = f"return _kf_slow({packed_args}, {packed_kwargs}, {', '.join(missing)})"

    body: list[str] = []
    kwargs = list(missing)
    for i, name in enumerate(kwargs):
        neutral = "None" if missing[name] is None else f"_kf_N{i}"
        later = [
            f"({other} is _kf_U or {other} is None)" if missing[other] is None else f"{other} is _kf_U"
            for other in kwargs[i + 1 :]
        ]
        body += [
            f"    if {name} is not _kf_U and {name} is not {neutral}:",
            # Dynamo must not read the counter (a guard, a recompile when it turns hot).
            f"        if {' and '.join(['not _kf_C()', *later])}:",
            f"            _kf_s = _kf_S{i}",
            f"            if _kf_s.hot and {name}.__class__ is _kf_T and not ({name}.is_cuda and _kf_cap()):",
            # Counted once the call did what the policy says, as on the general path.
            "                if _kf_s.copies:",
            # Cheap tests first; the full check runs (and raises) only for a buffer that
            # needs grad, is an inference tensor, is not contiguous or is a meta tensor
            # (get_device() below is -1 for it as for the CPU: it must not get that far).
            f"                    if ({name}.requires_grad or {name}.is_inference()",
            f"                            or not {name}.is_contiguous() or {name}.is_meta):",
            f"                        _kf_check({name!r}, {name})",
            f"                    _kf_r = {call}",
            f"                    if (_kf_r.__class__ is _kf_T and _kf_r.dtype is {name}.dtype",
            f"                            and _kf_r.shape == {name}.shape",
            # get_device(): an int, cheaper than two device objects; -1 on the CPU.
            f"                            and _kf_r.get_device() == {name}.get_device()):",
            f"                        {name}.copy_(_kf_r)",
            "                        _kf_s.tick()",
            f"                        return {name}",
            f"                    _kf_r = _kf_copy({name!r}, {name}, _kf_r)",
            "                    _kf_s.tick()",
            "                    return _kf_r",
            f"                _kf_r = {call}",
            "                _kf_s.tick()",
            "                return _kf_r",
            f"        {slow}",
        ]
    body.append(f"    return {call}")
    return f"def _kf_forward({', '.join(signature)}):\n" + "\n".join(body) + "\n"


def forwarder(
    fn: Callable[..., Any], missing: Mapping[str, object], hooks: Hooks, counters: Sequence[Counter]
) -> tuple[types.FunctionType, dict[str, Any]] | None:
    """Generate ``fn``'s forwarder; return it with its globals, or None when it cannot be made.

    ``missing`` maps each keyword ``fn`` lacks to its neutral value, in order;
    ``counters`` holds one counter per missing keyword, for its current policy. The
    caller swaps them in the returned globals (``_kf_S0``...) when the policies change.
    ``hooks.slow(args, kwargs, *values)`` receives every missing keyword's value
    (``UNSET`` when not passed) and must do what a generic wrapper does.
    """
    params = _parameters(fn, missing)
    if params is None:
        return None
    source = _source(params, missing)
    namespace: dict[str, Any] = {
        "_kf_fn": fn,
        "_kf_U": UNSET,
        "_kf_T": torch.Tensor,
        "_kf_C": torch.compiler.is_dynamo_compiling,
        "_kf_cap": stream_capturing,
        "_kf_slow": hooks.slow,
        "_kf_check": hooks.check_buffer,
        "_kf_copy": hooks.copy_back,
    }
    for i, name in enumerate(missing):
        namespace[f"_kf_N{i}"] = missing[name]
        namespace[f"_kf_S{i}"] = counters[i]
    found = getattr(fn, "__name__", None)
    fn_name: str = found if isinstance(found, str) else type(fn).__name__
    found = getattr(fn, "__qualname__", None)
    qualname: str = found if isinstance(found, str) else fn_name
    made = define(
        source,
        "_kf_forward",
        f"forwarder of {getattr(fn, '__module__', None)}.{qualname}",
        namespace,
        name=fn_name,
        qualname=qualname,
    )
    made.__defaults__ = params.defaults
    made.__kwdefaults__ = {**params.kwdefaults, **dict.fromkeys(missing, UNSET)}
    return made, namespace


_KIND_FLAGS: Final = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _code_flags(fn: Callable[..., Any]) -> int:
    code = getattr(fn, "__code__", None)  # functions, and bound methods through __func__
    return code.co_flags if isinstance(code, types.CodeType) else 0


def is_coroutine_or_generator(fn: Callable[..., Any]) -> bool:
    """True for an ``async def``, generator or async generator function (or method)."""
    return bool(_code_flags(fn) & _KIND_FLAGS)


def same_kind(
    fn: Callable[..., Any], slow: Callable[[tuple[Any, ...], dict[str, Any]], Any], missing: frozenset[str]
) -> Callable[..., Any]:
    """A wrapper that ``inspect`` (and asyncio, pytest...) sees as what ``fn`` is.

    An ``async def``, generator or async generator kernel gets a wrapper of its own kind:
    a generated forwarder is a plain function, which ``inspect.iscoroutinefunction``
    and the frameworks that ask it would take for a synchronous kernel. ``slow(args,
    kwargs)`` handles a call passing one of ``missing``; its policy applies when the
    wrapper's body starts (at ``await``, or at the first ``next()``).
    """

    def start(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs and not missing.isdisjoint(kwargs):
            return slow(args, kwargs)
        return fn(*args, **kwargs)

    flags = _code_flags(fn)
    if flags & inspect.CO_COROUTINE:

        async def coroutine(*args: Any, **kwargs: Any) -> Any:
            return await start(args, kwargs)

        return coroutine
    if flags & inspect.CO_GENERATOR:

        def generator(*args: Any, **kwargs: Any) -> Any:
            return (yield from start(args, kwargs))

        return generator

    async def async_generator(*args: Any, **kwargs: Any) -> Any:
        async for item in start(args, kwargs):
            yield item

    return async_generator
