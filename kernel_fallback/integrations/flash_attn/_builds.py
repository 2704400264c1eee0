"""What each published build of ``sgl_kernel`` does with FlashAttention-3's keywords.

Both distributions install the module ``sgl_kernel``: ``sgl-kernel`` up to 0.3.21, then
``sglang-kernel`` from 0.4 (sglang 0.5.23 pins ``sglang-kernel==0.4.10``). A keyword a
build's signature accepts but that never reaches its kernel is *ignored*; the chain
treats it like a keyword the signature lacks (the call is routed elsewhere or refused),
so it is never sent there and silently lost. Keywords a build's signature lacks (0.3.21:
``out``, ``only_qv``) need no entry: the chain reads the signature itself.

Read from the published wheels' ``sgl_kernel/flash_attn.py``:

- 0.3.21 (``sgl-kernel``, torch 2.9.1): ``flash_attn_varlen_func`` accepts ``page_table``
  but passes None to the kernel; both entry points use ``score_mod``/``aux_tensors``
  only with ``ver=4`` (the chain never passes ``ver``: see ``flash_attn``'s selectors).
- 0.4.10 (``sglang-kernel``, torch 2.14.1): the ``ver=4`` branch is gone, so
  ``score_mod``/``aux_tensors`` (and ``ver``) are accepted and never used; varlen still
  drops ``page_table``. Adds ``out`` and ``only_qv``.

A version not listed is looked up as the newest listed build of the same distribution
at or below it (``sglang-kernel`` 0.4.11 as 0.4.10), else as the union of what every
listed build ignores: a build nobody has read is not trusted with a keyword any
published one drops. The same union applies without metadata, or when both
distributions' metadata is present (which one installed the module is then unknown).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, final

from kernel_fallback._gates import version_key

__all__ = ["BUILDS", "DISTRIBUTIONS", "Build", "build_for", "ignored_by_installed", "installed"]

#: The distributions that install the module ``sgl_kernel``, newest name first.
DISTRIBUTIONS: Final = ("sglang-kernel", "sgl-kernel")

_VARLEN = "flash_attn_varlen_func"
_KVCACHE = "flash_attn_with_kvcache"


@final
@dataclass(frozen=True, slots=True)
class Build:
    """One published build: its distribution, version, torch pin, and what it ignores."""

    distribution: str
    version: str
    torch: str
    #: entry point -> keywords its signature accepts but its kernel never receives.
    ignores: Mapping[str, frozenset[str]]
    #: Keywords its signature lacks (for the docs; the chain reads the signature).
    lacks: frozenset[str]


BUILDS: Final = (
    Build(
        "sgl-kernel",
        "0.3.21",
        torch="2.9.1",
        ignores={
            _VARLEN: frozenset({"page_table", "score_mod", "aux_tensors"}),
            _KVCACHE: frozenset({"score_mod", "aux_tensors"}),
        },
        lacks=frozenset({"out", "only_qv"}),
    ),
    Build(
        "sglang-kernel",
        "0.4.10",
        torch="2.14.1",
        ignores={
            _VARLEN: frozenset({"page_table", "score_mod", "aux_tensors"}),
            _KVCACHE: frozenset({"score_mod", "aux_tensors"}),
        },
        lacks=frozenset(),
    ),
)


def _key(version: str) -> tuple[int, ...]:
    return version_key(version) or ()  # no number: below every listed build


def installed() -> tuple[str, str] | None:
    """(distribution, version) of the installed ``sgl_kernel``, None when no metadata names it.

    With both distributions' metadata present (an upgrade that left the old one
    behind), the newer name wins here; :func:`ignored_by_installed` trusts neither.
    """
    found = _all_installed()
    return found[0] if found else None


def _all_installed() -> list[tuple[str, str]]:
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def build_for(distribution: str, version: str) -> Build | None:
    """The listed build that describes ``distribution`` ``version``, None when none does."""
    want = _key(version)
    same = [b for b in BUILDS if b.distribution == distribution and _key(b.version) <= want]
    return max(same, key=lambda b: _key(b.version)) if same else None


def ignored_by_installed(entry_point: str) -> Callable[[Any], frozenset[str]]:
    """For ``provider(unsupported=...)``: what the installed build ignores in ``entry_point``.

    Called once when the provider is loaded; the kernel argument is not needed, the
    version comes from the distribution metadata.
    """

    def ignored(kernel: Any) -> frozenset[str]:
        del kernel
        found = [build_for(*dist) for dist in _all_installed()]
        # One known build: its row. None, an unlisted one, or two distributions that both
        # claim the module: every listed build's, so no keyword any of them drops is sent.
        known = found[0] if len(found) == 1 else None
        if known is not None:
            return known.ignores.get(entry_point, frozenset())
        return frozenset().union(*(b.ignores.get(entry_point, frozenset()) for b in BUILDS))

    ignored.__qualname__ = f"ignored_by_installed[{entry_point}]"
    return ignored
