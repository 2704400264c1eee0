"""Exceptions raised by kernel_fallback.

Each one subclasses the built-in exception that fits its meaning, so callers that
already catch ``TypeError`` (a keyword the kernel cannot take) or ``ValueError``
(a bad configuration value) keep working.
"""

from __future__ import annotations

__all__ = [
    "KernelFallbackError",
    "LogFileError",
    "PolicyConfigError",
    "ProviderUnavailableError",
    "UnsupportedKwargError",
]


class KernelFallbackError(Exception):
    """Base class of every error raised by kernel_fallback itself."""


class UnsupportedKwargError(KernelFallbackError, TypeError):
    """A keyword the kernel lacks was passed with a value that must not be dropped.

    Raised before the kernel runs, under the ``raise`` policy, in strict mode, or
    when ``copy`` cannot keep the keyword's meaning. The attributes name the kernel,
    the keyword and the environment variables that change the policy.
    """

    def __init__(self, message: str, *, kernel: str, kwarg: str, env_vars: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.kernel = kernel
        self.kwarg = kwarg
        self.env_vars = env_vars


class PolicyConfigError(KernelFallbackError, ValueError):
    """A policy or provider setting (argument or environment variable) is invalid.

    ``name`` is the variable or argument, ``value`` what it held and ``allowed`` the
    values it may take.
    """

    def __init__(self, message: str, *, name: str, value: object, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.value = value
        self.allowed = allowed


class LogFileError(KernelFallbackError, OSError):
    """An event log file cannot be used: not a regular file, a symbolic link, or not openable.

    ``path`` is the file (placeholders expanded) and ``reason`` says what it is or
    why it could not be opened. Raised by ``configure_logging(file=...)``; with
    ``KERNEL_FALLBACK_LOG_FILE`` it is reported once on standard error instead, and
    the events are lost, never the kernel call.
    """

    def __init__(self, message: str, *, path: str, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class ProviderUnavailableError(KernelFallbackError, RuntimeError):
    """No provider of a kernel chain can serve: the one asked for, or any of them.

    ``reasons`` maps each provider tried to why it could not be used.
    """

    def __init__(self, message: str, *, kernel: str, reasons: dict[str, str]) -> None:
        super().__init__(message)
        self.kernel = kernel
        self.reasons = reasons
