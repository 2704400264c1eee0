"""Which keywords does a kernel accept? Read once from its real signature or schema.

Kinds of callables and where their keywords are written:
- Python functions, bound methods, callable objects, ``functools.partial``:
  ``inspect.signature``; a ``**kwargs`` wrapper is followed through ``__wrapped__``
  (what ``functools.wraps`` sets) to the function it forwards to, and so is a
  wrapper with no signature at all (``functools.cache``, ``lru_cache``). An
  ``nn.Module`` instance is read from its ``forward``.
- ``torch.ops`` overloads and packets, ``torch.library.custom_op`` objects: the
  operator schema (``_schema.arguments``); they show only ``(*args, **kwargs)`` to
  ``inspect`` and reject an unknown keyword with RuntimeError, not TypeError.
- torch builtins (``torch.add``, ``F.scaled_dot_product_attention``, tensor
  methods): no ``inspect.signature``; their Python arguments are the union of the
  ``aten::<name>`` overload schemas (``self`` is spelled ``input``).
- pybind11 functions: the signature lines pybind11 writes at the top of ``__doc__``.
When none of these says anything, the support is *unknown* and listed keywords are
passed through untouched, so the kernel behaves exactly as if undecorated.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from dataclasses import dataclass
from typing import Any, final

import torch

__all__ = ["KwargSupport", "kwarg_support"]


@final
@dataclass(frozen=True, slots=True)
class KwargSupport:
    """Keywords a kernel accepts, and where that was read.

    ``names`` are the parameters that may be passed by keyword; ``open`` is true when
    the kernel also takes arbitrary keywords we cannot see into (``**kwargs`` with
    nothing behind it), in which case every keyword counts as accepted.
    """

    names: frozenset[str]
    open: bool
    source: str

    def accepts(self, kwarg: str) -> bool:
        """True when passing ``kwarg`` cannot fail for being unknown to the kernel."""
        return self.open or kwarg in self.names

    @property
    def known(self) -> bool:
        """False when no signature or schema could be read at all."""
        return self.source != "unknown"


_UNKNOWN = KwargSupport(frozenset(), True, "unknown")
_BINDING_ONLY = frozenset(
    {"dtype", "layout", "device", "pin_memory", "requires_grad", "memory_format", "non_blocking", "names"}
)
_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def kwarg_support(fn: Any) -> KwargSupport:
    """Read which keywords ``fn`` accepts, without calling it."""
    return _support(fn, depth=0)


def _support(fn: Any, depth: int) -> KwargSupport:
    if depth > 64:  # a __wrapped__ cycle; treat as unreadable rather than loop
        return _UNKNOWN
    if isinstance(fn, torch._ops.OpOverload):
        return _from_schemas([fn._schema], f"schema:{fn._schema.name}.{fn._overloadname}")
    if isinstance(fn, torch._ops.OpOverloadPacket):
        schemas = [getattr(fn, name)._schema for name in fn.overloads()]  # type: ignore[no-untyped-call]
        return _from_schemas(schemas, f"schema:{fn._qualified_op_name}")
    opoverload = getattr(fn, "_opoverload", None)  # torch.library.custom_op objects
    if isinstance(opoverload, torch._ops.OpOverload):
        return _support(opoverload, depth + 1)
    if isinstance(fn, functools.partial):
        # Keywords bound in the partial may still be overridden, so all stay accepted.
        return _support(fn.func, depth + 1)
    if isinstance(fn, types.MethodType):
        return _support(fn.__func__, depth + 1)
    if isinstance(fn, torch.nn.Module):
        # Module.__call__ is (*args, **kwargs) around `forward`, which says what it takes.
        return _support(fn.forward, depth + 1)
    try:
        sig = inspect.signature(fn, follow_wrapped=False)
    except (ValueError, TypeError):
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:  # functools.cache / lru_cache: C wrappers with no signature
            return _support(wrapped, depth + 1)
        return _from_builtin(fn)
    names = frozenset(p.name for p in sig.parameters.values() if p.kind in _KEYWORD_KINDS)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if not has_var_kw:
        return KwargSupport(names, False, "signature")
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is None:
        return KwargSupport(names, True, "signature")
    inner = _support(wrapped, depth + 1)
    return KwargSupport(names | inner.names, inner.open, inner.source)


def _from_schemas(schemas: list[Any], source: str) -> KwargSupport:
    names = {arg.name for schema in schemas for arg in schema.arguments}
    return KwargSupport(frozenset(names), False, source)


def _from_builtin(fn: Any) -> KwargSupport:
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        return _UNKNOWN
    if _is_torch_builtin(fn):
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
        if schemas:
            names = {arg.name for schema in schemas for arg in schema.arguments}
            if "self" in names:
                names.add("input")  # the Python binding's spelling of aten's `self`
            # The Python binding also takes tensor options no aten schema lists
            # (torch.zeros(..., requires_grad=True)); counting them as accepted errs on
            # the side of passing a keyword through, never of dropping a real one.
            return KwargSupport(frozenset(names | _BINDING_ONLY), False, f"schema:aten::{name}")
    return _from_pybind11_doc(name, getattr(fn, "__doc__", None))


def _is_torch_builtin(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or ""
    owner = getattr(fn, "__objclass__", None)  # tensor methods: method descriptors
    return module.startswith("torch") or (owner is not None and issubclass(owner, torch._C.TensorBase))


def _from_pybind11_doc(name: str, doc: str | None) -> KwargSupport:
    """Keyword names from pybind11's generated signature lines, one per overload."""
    if not doc:
        return _UNKNOWN
    line = re.compile(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\)(?: -> .*)?$")
    names: set[str] = set()
    open_kw = False
    matched = False
    lines = [text.strip() for text in doc.splitlines()]
    if "Overloaded function." in lines:
        # pybind11 heads an overload set with `f(*args, **kwargs)`; the numbered lines
        # below it are the real signatures.
        lines = [text for text in lines if re.match(r"^\d+\. ", text)]
    for text in lines:
        m = line.match(text)
        if m is None:
            continue
        matched = True
        for param in _split_top_level(m.group(1)):
            param_name = param.split(":", 1)[0].split("=", 1)[0].strip()
            if param_name.startswith("**"):
                open_kw = True
            elif param_name and not param_name.startswith("*") and param_name != "/":
                names.add(param_name)
    if not matched:
        return _UNKNOWN
    return KwargSupport(frozenset(names), open_kw, "pybind11-doc")


def _split_top_level(params: str) -> list[str]:
    """Split a parameter list at commas that are not inside brackets or quotes."""
    parts: list[str] = []
    depth = 0
    quote = ""
    current: list[str] = []
    for ch in params:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if current:
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]
