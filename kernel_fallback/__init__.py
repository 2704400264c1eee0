"""kernel_fallback: kernel calls that survive version skew, and say so.

Decorate a kernel with :func:`tolerant_kwargs` to decide once, from its real
signature or schema, which keywords it lacks and what to do when a caller passes
one (``warn``, ``copy`` into the caller's buffer, or ``raise``). Declare a chain of
providers with :func:`kernel_chain` to pick an implementation from environment flags
and fall back, or re-route a call, when one cannot serve. Every fallback is counted
exactly (:func:`stats`) and logged once through structlog.

``import kernel_fallback`` is cheap: each part (and torch with it) is imported at
the first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kernel_fallback.exceptions import (
    KernelFallbackError,
    LogFileError,
    PolicyConfigError,
    ProviderUnavailableError,
    UnsupportedKwargError,
)

if TYPE_CHECKING:
    from kernel_fallback._chain import (
        ChainFunction,
        KernelChain,
        chains,
        describe,
        describe_table,
        kernel_chain,
    )
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

# Imported at first use (PEP 562), not on `import kernel_fallback`: the
# `kernel-fallback report` and `check` commands read logs without importing torch
# (seconds), and a program pays for torch only where it uses a kernel.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("ChainFunction", "KernelChain", "chains", "describe", "describe_table", "kernel_chain"), "_chain"
    ),
    "reload_config": "_config",
    **dict.fromkeys(("FallbackEvent", "flush", "reset_stats", "stats"), "_events"),
    **dict.fromkeys(
        (
            "BoolFlag",
            "Gate",
            "cuda_available",
            "cuda_capability",
            "cuda_version",
            "platform_is",
            "torch_version",
        ),
        "_gates",
    ),
    "configure_logging": "_logging",
    **dict.fromkeys(("KwargSupport", "kwarg_support"), "_signature"),
    **dict.fromkeys(("TolerantFunction", "TolerantKernel", "kernels", "tolerant_kwargs"), "_tolerant"),
}


# Hidden from type checkers, which see the imports above: with a module __getattr__ in
# view they would accept any misspelt name as `Any`.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """Import the private module that defines the public ``name`` (once; it is cached)."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """The public names, imported or not yet, and the module's own attributes."""
    return sorted({*globals(), *__all__})
