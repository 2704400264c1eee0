"""Keyword detection for every kind of callable a serving stack wraps.

Each case is checked against reality: where detection says a keyword is missing,
calling the kernel with it really fails (TypeError or, for torch ops, RuntimeError),
and where it says the keyword is accepted, the call really works.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kernel_fallback import kwarg_support
from kernel_fallback._signature import _from_pybind11_doc


@torch.library.custom_op("kf_test_sig::scale", mutates_args=())
def scale_op(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    return x * factor


def py_kernel(q: torch.Tensor, k: torch.Tensor, *, softcap: float = 0.0) -> torch.Tensor:
    return q + k + softcap


@functools.wraps(py_kernel)
def forwarding_wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
    return py_kernel(*args, **kwargs)


@functools.wraps(forwarding_wrapper)
def two_level_wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
    return forwarding_wrapper(*args, **kwargs)


class Attention:
    def forward(self, q: torch.Tensor, k: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        result = q + k
        if out is not None:
            out.copy_(result)
            return out
        return result

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, window: int = -1) -> torch.Tensor:
        return q + k


def opaque(*args: Any, **kwargs: Any) -> torch.Tensor:
    return py_kernel(*args)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(0))


CASES: list[tuple[str, Callable[..., Any], Callable[[Callable[..., Any], dict[str, Any]], Any], str, str]] = [
    # id, kernel, how to call it with kwargs, a keyword it lacks, a keyword it accepts
    ("function", py_kernel, lambda f, kw: f(_x(), _x(), **kw), "out", "softcap"),
    ("wraps-chain", two_level_wrapper, lambda f, kw: f(_x(), _x(), **kw), "out", "softcap"),
    (
        "partial",
        functools.partial(py_kernel, softcap=1.0),
        lambda f, kw: f(_x(), _x(), **kw),
        "out",
        "softcap",
    ),
    ("bound-method", Attention().forward, lambda f, kw: f(_x(), _x(), **kw), "softcap", "out"),
    ("callable-object", Attention(), lambda f, kw: f(_x(), _x(), **kw), "out", "window"),
    ("torch.add", torch.add, lambda f, kw: f(_x(), _x(), **kw), "softcap", "out"),
    (
        "sdpa",
        F.scaled_dot_product_attention,
        lambda f, kw: f(_x()[None], _x()[None], _x()[None], **kw),
        "out",
        "scale",
    ),
    ("tensor-method", torch.Tensor.add, lambda f, kw: f(_x(), _x(), **kw), "softcap", "alpha"),
    ("op-overload", torch.ops.aten.add.Tensor, lambda f, kw: f(_x(), _x(), **kw), "out", "alpha"),
    ("op-packet", torch.ops.aten.mm, lambda f, kw: f(_x(), _x().T, **kw), "softcap", "out"),
    ("custom-op", scale_op, lambda f, kw: f(_x(), **kw), "out", "factor"),
    ("custom-op-packet", torch.ops.kf_test_sig.scale, lambda f, kw: f(_x(), **kw), "out", "factor"),
]


def _value_for(kwarg: str) -> Any:
    return torch.empty(2, 2) if kwarg == "out" else 1.0


@pytest.mark.parametrize(
    ("kernel", "call", "lacks", "accepts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_detection_matches_what_the_kernel_really_does(
    kernel: Callable[..., Any],
    call: Callable[[Callable[..., Any], dict[str, Any]], Any],
    lacks: str,
    accepts: str,
) -> None:
    support = kwarg_support(kernel)
    assert support.known
    assert not support.accepts(lacks)
    assert support.accepts(accepts)
    # Reality agrees: the missing keyword fails the call, the accepted one does not.
    # (An overload may count the stray keyword as one argument too many.)
    with pytest.raises((TypeError, RuntimeError), match=rf"'{lacks}'|expected at most"):
        call(kernel, {lacks: _value_for(lacks)})
    if accepts == "out":
        return  # out= needs a matching buffer; acceptance is shown by the schema cases below
    call(kernel, {accepts: 0.5 if accepts != "window" else 3})


def test_torch_ops_reject_unknown_keywords_with_runtime_error() -> None:
    # Why schema reading matters: a TypeError-matching retry never sees this.
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'out'"):
        scale_op(_x(), out=_x())


def test_packet_accepts_out_through_its_out_overload() -> None:
    a, b = _x(), _x().T
    buf = torch.empty(2, 2)
    assert kwarg_support(torch.ops.aten.mm).accepts("out")
    torch.ops.aten.mm(a, b, out=buf)
    torch.testing.assert_close(buf, a @ b)


def test_torch_builtin_binding_only_keywords_are_accepted() -> None:
    # requires_grad is in the Python binding of torch.zeros, in no aten schema.
    support = kwarg_support(torch.zeros)
    assert support.accepts("requires_grad")
    assert torch.zeros(2, requires_grad=True).requires_grad


def test_torch_builtin_spells_self_as_input() -> None:
    support = kwarg_support(torch.add)
    assert support.accepts("input")
    torch.testing.assert_close(torch.add(input=_x(), other=_x()), 2 * _x())


def test_opaque_kwargs_function_is_unknown_and_accepts_everything() -> None:
    support = kwarg_support(opaque)
    assert support.open
    assert support.accepts("anything")
    assert support.source == "signature"


def test_wrapper_names_plus_inner_names() -> None:
    def outer(*args: Any, extra: int = 0, **kwargs: Any) -> torch.Tensor:
        return py_kernel(*args, **kwargs)

    outer.__wrapped__ = py_kernel  # type: ignore[attr-defined]
    support = kwarg_support(outer)
    assert support.names >= {"extra", "softcap", "q", "k"}
    assert not support.open


def test_positional_only_parameters_are_not_keywords() -> None:
    def kernel(q: torch.Tensor, /, k: torch.Tensor) -> torch.Tensor:
        return q + k

    assert not kwarg_support(kernel).accepts("q")
    assert kwarg_support(kernel).accepts("k")


def test_c_builtin_with_text_signature() -> None:
    support = kwarg_support(sorted)
    assert support.accepts("key")
    assert not support.accepts("out")


def test_wrapped_cycle_does_not_hang() -> None:
    def a(**kwargs: Any) -> None: ...

    def b(**kwargs: Any) -> None: ...

    a.__wrapped__ = b  # type: ignore[attr-defined]
    b.__wrapped__ = a  # type: ignore[attr-defined]
    assert not kwarg_support(a).known


def test_real_pybind11_function_doc() -> None:
    # torch._C functions are real pybind11 bindings with generated signature lines.
    fn = torch._C._jit_get_schemas_for_operator
    assert type(fn).__name__ == "builtin_function_or_method"
    support = kwarg_support(fn)
    assert support.source == "pybind11-doc"
    assert support.names == {"arg0"}


@pytest.mark.parametrize(
    ("doc", "names", "open_kw"),
    [
        (
            "f(q: torch.Tensor, k: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor\n",
            {"q", "k", "out"},
            False,
        ),
        (
            "f(*args, **kwargs)\nOverloaded function.\n\n1. f(x: int) -> int\n\n2. f(x: int, y: Dict[str, int] = {'a': 1}) -> int\n",
            {"x", "y"},
            False,
        ),
        ("f(a: Tuple[int, int] = (1, 2), b: str = 'x,y') -> None", {"a", "b"}, False),
    ],
    ids=["single", "overloads", "nested-defaults"],
)
def test_pybind11_doc_parsing(doc: str, names: set[str], open_kw: bool) -> None:
    support = _from_pybind11_doc("f", doc)
    assert support.names == names
    assert support.open is open_kw


def test_builtin_without_any_signature_is_unknown() -> None:
    # A C builtin without __text_signature__ and not from torch: nothing to read.
    support = _from_pybind11_doc("g", "does something useful")
    assert not support.known
    assert support.accepts("out")


def _cached_kernel(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    return q


class _Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        return q


@pytest.mark.parametrize(
    "kernel",
    [functools.cache(_cached_kernel), functools.lru_cache(maxsize=8)(_cached_kernel), _Attention()],
    ids=["functools.cache", "lru_cache", "nn.Module"],
)
def test_cache_wrappers_and_modules_are_read_from_what_they_call(kernel: Any) -> None:
    support = kwarg_support(kernel)
    assert not support.open, "read as accepting every keyword"
    assert {"q", "k", "causal"} <= support.names
    assert not support.accepts("out")
    # The oracle: the call itself refuses the keyword kwarg_support says it lacks.
    with pytest.raises(TypeError, match="out"):
        kernel(torch.ones(1), torch.ones(1), out=torch.ones(1))
