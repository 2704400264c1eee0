"""What a kernel chain decided, as data and as a table for people.

This module reads plain data (a :class:`Selection`, the declared providers and their
load results) and knows nothing of the chain object, so the layering is one-way:
``_chain_state`` imports it, never the reverse.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, final

from kernel_fallback._providers import Loaded, Provider, Unavailable

__all__ = ["Selection", "describe_chain", "render_table"]


@final
@dataclass(frozen=True, slots=True)
class Selection:
    """Which providers a chain tries, in order, and what decided it."""

    order: tuple[str, ...]
    explicit: str | None
    source: str
    strict: bool
    excluded: Mapping[str, str]


#: Provider states, in the words describe() uses.
ACTIVE = "active"
AVAILABLE = "available"
UNAVAILABLE = "unavailable"
NOT_TRIED = "not tried"
NOT_SELECTED = "not selected"
NOT_LOADED = "not loaded"


def describe_chain(
    *,
    kernel: str,
    env_var: str,
    selection: Selection | None,
    active: str | None,
    providers: Mapping[str, Provider],
    loads: Mapping[str, Loaded | Unavailable],
    error: str | None,
) -> dict[str, Any]:
    """A chain's state as plain data (the caller holds the chain's lock while reading it)."""
    order = selection.order if selection is not None else ()
    rows: list[dict[str, Any]] = []
    for name, spec in providers.items():
        got = loads.get(name)
        reason: str | None = None
        if name == active:
            status = ACTIVE
        elif isinstance(got, Unavailable):
            status, reason = UNAVAILABLE, got.reason
        elif isinstance(got, Loaded):
            status = AVAILABLE
        elif selection is not None and name not in order:
            status, reason = NOT_SELECTED, selection.excluded.get(name)
        elif selection is not None:
            status = NOT_TRIED
        else:
            status = NOT_LOADED
        row: dict[str, Any] = {
            "name": name,
            "position": order.index(name) + 1 if name in order else None,
            "source": spec.source,
            "gates": [gate.description for gate in spec.gates],
            "status": status,
            "reason": reason,
            "signature": None,
            "lacks": None,
            "on_drop": None,
            "backend": None,
            "ignores": None,
        }
        if isinstance(got, Loaded):
            # A provider may say which backend its last call took (the torch attention does).
            backend = getattr(inspect.unwrap(got.impl), "kernel_fallback_backend", None)
            row["backend"] = backend() if callable(backend) else None
            row["signature"] = got.signature_source
            row["lacks"] = sorted(got.lacking)
            row["ignores"] = sorted(got.hints_lacking)
            if got.tolerant is not None:  # the policy each lacked keyword gets when passed
                row["on_drop"] = {k: got.tolerant.policies[k][0] for k in row["lacks"]}
        rows.append(row)
    rows.sort(key=lambda row: (row["position"] is None, row["position"] or 0))
    return {
        "kernel": kernel,
        "active": active,
        "mode": None if selection is None else ("explicit" if selection.explicit else "automatic"),
        "selected_by": selection.source if selection is not None else None,
        "order": list(order),
        "strict": selection.strict if selection is not None else None,
        "env_var": env_var,
        "error": error,
        "providers": rows,
    }


def _detail(row: dict[str, Any]) -> str:
    if row["reason"]:
        return str(row["reason"])
    if row["lacks"] is not None:
        lacks = ", ".join(row["lacks"]) or "nothing"
        backend = f"; last call: {row['backend']}" if row.get("backend") else ""
        return f"{row['source']} ({row['signature']}); lacks {lacks}{backend}"
    return str(row["source"])


def render_table(described: Sequence[dict[str, Any]]) -> str:
    """Chains as returned by ``describe()``, one block each, aligned columns."""
    blocks: list[str] = []
    for chain in described:
        head = f"{chain['kernel']}: active {chain['active'] or '-'}"
        if chain["mode"]:
            head += f" ({chain['mode']}: {chain['selected_by']})"
        lines = [head]
        if chain["error"]:
            lines.append(f"  error: {chain['error']}")
        rows = [("#", "provider", "status", "detail")]
        for row in chain["providers"]:
            position = str(row["position"]) if row["position"] is not None else "-"
            rows.append((position, row["name"], row["status"], _detail(row)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            lines.append(
                "  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
            )
        blocks.append("\n".join(line.rstrip() for line in lines))
    return "\n\n".join(blocks)
