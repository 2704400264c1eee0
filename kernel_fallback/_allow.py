"""Allow-lists of accepted fallbacks: ``kernel:kwarg`` patterns, as in ``KERNEL_FALLBACK_ALLOW``.

Shared by ``kernel-fallback check``, the strict test helpers of
:mod:`kernel_fallback.testing` and the pytest plugin, so a pattern means the same
everywhere. A pattern is ``KERNEL:SUBJECT`` where SUBJECT is the dropped keyword or the
provider fallen back to; both halves are shell-style patterns (``fnmatch``, case
sensitive): ``flash_attn_varlen_func:out``, ``flash_attn_*:*``, ``*:num_splits``. The
split is at the last ``:``, so kernel names such as ``ns::op`` work.

Inside a character class (``[...]``) a comma, a space or a ``:`` is part of the
pattern, not a separator: ``[,]`` matches a comma, ``[ ]`` a space, ``[:]`` a colon.
:func:`allow_pattern` writes the pattern that matches a given kernel and subject
exactly that way, whatever characters their names hold; ``kernel-fallback check``
suggests it.
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

__all__ = ["AllowList", "allow_pattern", "parse_allow"]

_SEPARATOR = re.compile(r"[,\s]")
#: Characters a pattern spells as a one-character class: fnmatch's own, and the
#: separators of a list of patterns.
_BRACKETED = frozenset("[]*?,: ")


def _class_end(text: str, start: int) -> int:
    """Index of the ``]`` closing the class that opens at ``text[start]``, or -1 (``[`` is literal).

    As fnmatch reads it: a ``!`` and then a ``]`` right after the ``[`` belong to the class.
    """
    end = start + 1
    if end < len(text) and text[end] == "!":
        end += 1
    if end < len(text) and text[end] == "]":
        end += 1
    end = text.find("]", end)
    return end


def _outside_classes(text: str) -> list[int]:
    """Indices of the characters of ``text`` that are not inside a ``[...]`` class."""
    indices: list[int] = []
    i = 0
    while i < len(text):
        end = _class_end(text, i) if text[i] == "[" else -1
        if end < 0:
            indices.append(i)
            i += 1
        else:
            i = end + 1
    return indices


def _split(item: str) -> list[str]:
    """``item`` cut at commas and white space that are not inside a class."""
    pieces, start = [], 0
    for i in _outside_classes(item):
        if _SEPARATOR.match(item[i]):
            pieces.append(item[start:i])
            start = i + 1
    pieces.append(item[start:])
    return [p for p in pieces if p]


def _partition(pattern: str) -> tuple[str, str, str]:
    """``pattern`` split at its last ``:`` outside a class: (kernel, ":", subject) or ("", "", pattern)."""
    colons = [i for i in _outside_classes(pattern) if pattern[i] == ":"]
    if not colons:
        return "", "", pattern
    return pattern[: colons[-1]], ":", pattern[colons[-1] + 1 :]


def _literal(name: str, *, colon: bool) -> str:
    """A pattern matching ``name``; a character that cannot be shown is matched by ``?``."""
    out = []
    for char in name:
        if not char.isprintable():
            out.append("?")  # printed escaped it could not be typed back; any one character will do
        elif char in _BRACKETED and (colon or char != ":"):
            out.append(f"[{char}]")
        else:
            out.append(char)
    return "".join(out)


def allow_pattern(kernel: str, subject: str) -> str:
    """The pattern that allows ``kernel``'s fallback on ``subject``, and (nearly) nothing else.

    Characters fnmatch would read as wildcards, and commas, spaces and ``:`` in the
    subject, are written as one-character classes, so the pattern is taken back as
    given. A character that is not printable (a control character, say) becomes ``?``,
    which matches it among others. An empty subject (the overflow row) becomes ``*``.
    """
    return f"{_literal(kernel, colon=False)}:{_literal(subject, colon=True) or '*'}"


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
        for pattern in _split(item):
            kernel, sep, subject = _partition(pattern)
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
            kernel_pattern, _, subject_pattern = _partition(pattern)
            if fnmatch.fnmatchcase(kernel, kernel_pattern) and fnmatch.fnmatchcase(subject, subject_pattern):
                return pattern
        return None

    def allows(self, kernel: str, subject: str) -> bool:
        """True when some pattern allows ``kernel``'s fallback on ``subject``."""
        return self.match(kernel, subject) is not None
