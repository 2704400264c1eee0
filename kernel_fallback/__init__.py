"""kernel_fallback: kernel calls that survive version skew, and say so.

Decorate a kernel with :func:`tolerant_kwargs` to decide once, from its real
signature or schema, which keywords it lacks and what to do when a caller passes
one (``warn``, ``copy`` into the caller's buffer, or ``raise``). Every fallback is
counted exactly (:func:`stats`) and logged once through structlog.
"""

from __future__ import annotations

from kernel_fallback._config import reload_config
from kernel_fallback._events import FallbackEvent, flush, reset_stats, stats
from kernel_fallback._logging import configure_logging
from kernel_fallback._signature import KwargSupport, kwarg_support
from kernel_fallback._tolerant import TolerantFunction, TolerantKernel, kernels, tolerant_kwargs
from kernel_fallback.exceptions import (
    KernelFallbackError,
    PolicyConfigError,
    ProviderUnavailableError,
    UnsupportedKwargError,
)

__all__ = [
    "FallbackEvent",
    "KernelFallbackError",
    "KwargSupport",
    "PolicyConfigError",
    "ProviderUnavailableError",
    "TolerantFunction",
    "TolerantKernel",
    "UnsupportedKwargError",
    "configure_logging",
    "flush",
    "kernels",
    "kwarg_support",
    "reload_config",
    "reset_stats",
    "stats",
    "tolerant_kwargs",
]
