"""kernel_fallback: kernel calls that survive version skew, and say so.

Decorate a kernel with :func:`tolerant_kwargs` to decide once, from its real
signature or schema, which keywords it lacks and what to do when a caller passes
one (``warn``, ``copy`` into the caller's buffer, or ``raise``). Declare a chain of
providers with :func:`kernel_chain` to pick an implementation from environment flags
and fall back, or re-route a call, when one cannot serve. Every fallback is counted
exactly (:func:`stats`) and logged once through structlog.
"""

from __future__ import annotations

from kernel_fallback._chain import ChainFunction, KernelChain, chains, describe, describe_table, kernel_chain
from kernel_fallback._config import reload_config
from kernel_fallback._events import FallbackEvent, flush, reset_stats, stats
from kernel_fallback._gates import (
    BoolFlag,
    Gate,
    cuda_available,
    cuda_capability,
    cuda_version,
    platform_is,
    torch_version,
)
from kernel_fallback._logging import configure_logging
from kernel_fallback._signature import KwargSupport, kwarg_support
from kernel_fallback._tolerant import TolerantFunction, TolerantKernel, kernels, tolerant_kwargs
from kernel_fallback.exceptions import (
    KernelFallbackError,
    LogFileError,
    PolicyConfigError,
    ProviderUnavailableError,
    UnsupportedKwargError,
)

__all__ = [
    "BoolFlag",
    "ChainFunction",
    "FallbackEvent",
    "Gate",
    "KernelChain",
    "KernelFallbackError",
    "KwargSupport",
    "LogFileError",
    "PolicyConfigError",
    "ProviderUnavailableError",
    "TolerantFunction",
    "TolerantKernel",
    "UnsupportedKwargError",
    "chains",
    "configure_logging",
    "cuda_available",
    "cuda_capability",
    "cuda_version",
    "describe",
    "describe_table",
    "flush",
    "kernel_chain",
    "kernels",
    "kwarg_support",
    "platform_is",
    "reload_config",
    "reset_stats",
    "stats",
    "tolerant_kwargs",
    "torch_version",
]
