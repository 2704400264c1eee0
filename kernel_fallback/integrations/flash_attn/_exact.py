"""Which calls of the ``torch`` provider the exact reference serves, and results without keys.

The fast paths of :mod:`~kernel_fallback.integrations.flash_attn._fast` hand two kinds of
call to the exact reference (:mod:`~kernel_fallback.integrations.flash_attn._reference`,
same signature):

* float64: FA3 has no float64, and a fallback that takes it must be exact. The fast paths
  fold sinks in float32 and some float64 shapes do not compile for CUDA; the reference
  computes in float64 throughout (its lse is float32, as FA3's).
* Calls autograd records off CUDA: flex_attention has a backward on CUDA only. The
  reference is plain differentiable torch on every device.

Calls with no keys or no queries at all never reach a kernel (flex cannot take them):
:func:`without_keys` gives their result and :func:`attached` keeps it on autograd's graph.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

from kernel_fallback._options import stream_capturing

__all__ = [
    "NO_KEYS",
    "REFERENCE_AUTOGRAD",
    "REFERENCE_FLOAT64",
    "attached",
    "exact_route",
    "exact_when_needed",
    "wants_grad",
    "without_keys",
]

#: ``last_backend`` of a float64 call: the exact reference serves it.
REFERENCE_FLOAT64 = "reference (float64)"
#: ``last_backend`` of a call autograd records off CUDA (flex has no backward there).
REFERENCE_AUTOGRAD = "reference (autograd)"
#: ``last_backend`` of a call with no keys or no queries: zeros, no kernel.
NO_KEYS = "none (no keys or no queries)"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def wants_grad(*values: object) -> bool:
    """Whether autograd records this call: grad mode on and a tensor argument requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in values)


def exact_route(args: tuple[object, ...], kwargs: dict[str, object]) -> str | None:
    """The reference's backend name when it must serve this call (module docstring), else None.

    Raises ValueError for a float64 call on CUDA while a CUDA graph is captured: the
    reference reads sequence lengths on the host, which a capture forbids.
    """
    q = args[0] if args else kwargs.get("q")
    if not isinstance(q, Tensor):
        return None  # the entry point's own checks name the problem
    if q.dtype == torch.float64:
        route = REFERENCE_FLOAT64
    elif q.device.type != "cuda" and wants_grad(*args, *kwargs.values()):
        route = REFERENCE_AUTOGRAD
    else:
        return None
    if q.device.type == "cuda" and stream_capturing():
        raise ValueError(
            "float64 attention is served by the exact reference, which reads sequence lengths "
            "on the host and cannot run while a CUDA graph is captured; capture in "
            "bfloat16/float16/float32 or call it outside the capture"
        )
    return route


def exact_when_needed(
    reference: Callable[_P, _R], last: dict[str, str]
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Send the calls :func:`exact_route` picks to ``reference`` (same signature), the rest on.

    ``last`` records the route under the decorated function's name (``last_backend``).
    With grad mode off, tensors that require grad reach the fast path detached.
    """

    def decorate(fast: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fast)
        def entry(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            q = args[0] if args else kwargs.get("q")
            if isinstance(q, Tensor) and q.is_cuda and q.dtype is not torch.float64:
                # The serving case, decided from q alone: CUDA keeps autograd on flex and has
                # no eager-flex refusal to detach for, so nothing else is looked at per call.
                return fast(*args, **kwargs)
            route = exact_route(args, kwargs)
            if route is None and not torch.is_grad_enabled():
                # Nothing is recorded, but eager flex on CPU refuses any input that requires
                # grad: detached views (same storage, so appends still land in the caches).
                call: Callable[..., _R] = fast
                return call(*(_detached(a) for a in args), **{n: _detached(a) for n, a in kwargs.items()})
            if route is None:
                return fast(*args, **kwargs)
            result = reference(*args, **kwargs)
            last[fast.__name__] = route
            return result

        return entry

    return decorate


def _detached(value: object) -> object:
    return value.detach() if isinstance(value, Tensor) and value.requires_grad else value


def attached(result: Tensor, *inputs: Tensor | None) -> Tensor:
    """``result`` (computed without reading ``inputs``) with zero gradients flowing to them.

    A call with no keys or no queries returns constants; autograd must still reach the
    inputs (zero gradients) rather than report them unused.
    """
    used = [t for t in inputs if t is not None and t.requires_grad]
    if not used or not torch.is_grad_enabled():
        return result
    # The sum of an empty slice: exactly 0 whatever the values, and a zero gradient.
    zero = sum((t.reshape(-1)[:0].sum().to(result.dtype) for t in used), result.new_zeros(()))
    return result + zero


def without_keys(q_rows: Tensor, dv: int, sinks: Tensor | None, used: Tensor) -> tuple[Tensor, Tensor]:
    """Result of packed rows ``q_rows`` (rows, Hq, D) that see no key: zeros, lse (Hq, rows).

    The lse is ``-inf``, or the sink for rows of a sequence (``used``; the sink is then
    the only softmax column), as the reference gives.
    """
    rows, hq = q_rows.shape[0], q_rows.shape[1]
    out = q_rows.new_zeros(rows, hq, dv)
    lse = torch.full((hq, rows), -math.inf, dtype=torch.float32, device=q_rows.device)
    if sinks is not None:
        sink = sinks.to(device=lse.device, dtype=torch.float32).unsqueeze(1)
        lse = torch.where(used.unsqueeze(0), sink, lse)
    return out, lse
