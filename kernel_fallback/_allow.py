"""Allow-lists of accepted fallbacks: ``kernel:kwarg`` patterns, as in ``KERNEL_FALLBACK_ALLOW``.

Shared by ``kernel-fallback check``, the strict test helpers of
:mod:`kernel_fallback.testing` and the pytest plugin, so a pattern means the same
everywhere. A pattern is ``KERNEL:SUBJECT`` where SUBJECT is the dropped keyword or the
provider fallen back to; both halves are shell-style patterns (``fnmatch``, case
sensitive): ``flash_attn_varlen_func:out``, ``flash_attn_*:*``, ``*:num_splits``. The
split is at the last ``:``, so kernel names such as ``ns::op`` work.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import final

from kernel_fallback._config import ENV_ALLOW
from kernel_fallback.exceptions import PolicyConfigError

__all__ = ["AllowList", "parse_allow"]

_SEPARATORS = re.compile(r"[,\s]+")


def parse_allow(name: str, specs: str | Iterable[str]) -> tuple[str, ...]:
    """Split ``specs`` (comma or whitespace separated, or a list of such) into checked patterns.

    ``name`` is what the patterns came from (a variable, an option), used in errors.
    """
    items = [specs] if isinstance(specs, str) else list(specs)
    patterns: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise PolicyConfigError(
                f"{name}: {item!r} is not a 'kernel:kwarg' pattern (a string).", name=name, value=item
            )
        for pattern in _SEPARATORS.split(item.strip()):
            if not pattern:
                continue
            kernel, sep, subject = pattern.rpartition(":")
            if not sep or not kernel or not subject:
                raise PolicyConfigError(
                    f"{name}: {pattern!r} is not a 'kernel:kwarg' pattern; write e.g. "
                    f"'{pattern.strip(':') or 'my_kernel'}:out' for one keyword or "
                    f"'{pattern.strip(':') or 'my_kernel'}:*' for all of a kernel's fallbacks.",
                    name=name,
                    value=pattern,
                    allowed=("kernel:kwarg", "kernel:*", "*:kwarg"),
                )
            patterns.append(pattern)
    return tuple(patterns)


@final
@dataclass(frozen=True, slots=True)
class AllowList:
    """Fallbacks accepted as known: a tuple of ``kernel:subject`` patterns."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, name: str, specs: str | Iterable[str]) -> AllowList:
        """An allow-list from ``specs`` (see :func:`parse_allow`)."""
        return cls(parse_allow(name, specs))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AllowList:
        """The allow-list in ``KERNEL_FALLBACK_ALLOW`` (empty when unset)."""
        raw = (os.environ if environ is None else environ).get(ENV_ALLOW, "")
        return cls(parse_allow(ENV_ALLOW, raw))

    def __add__(self, other: AllowList) -> AllowList:
        return AllowList(self.patterns + tuple(p for p in other.patterns if p not in self.patterns))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def match(self, kernel: str, subject: str) -> str | None:
        """The first pattern that allows ``kernel``'s fallback on ``subject``, or None."""
        for pattern in self.patterns:
            kernel_pattern, _, subject_pattern = pattern.rpartition(":")
            if fnmatch.fnmatchcase(kernel, kernel_pattern) and fnmatch.fnmatchcase(subject, subject_pattern):
                return pattern
        return None

    def allows(self, kernel: str, subject: str) -> bool:
        """True when some pattern allows ``kernel``'s fallback on ``subject``."""
        return self.match(kernel, subject) is not None
