"""Where a decorated kernel is stored, so that pickle can find it by name.

pickle saves a function as a reference ``module.qualname`` and refuses one that
reference does not lead back to. The README pattern
``fa3 = tolerant_kwargs(["out"])(flash_attn_varlen_func)`` makes a wrapper stored as
``myapp.fa3`` while its copied ``__qualname__`` names ``flash_attn_varlen_func``, which
leads to the original kernel: ``PicklingError``, and ``multiprocessing`` with ``spawn``
fails. Pickle's handling of functions cannot be customised (it never asks the object),
so the wrapper takes the name it is stored under instead: read, at decoration, from
the instruction that follows the decorating call in the caller's code (a
``STORE_NAME`` in a module or class body, a ``STORE_GLOBAL``). The decorator syntax
stores the wrapper under the kernel's own name, so nothing changes there.
"""

from __future__ import annotations

import dis
import types
from typing import Final

__all__ = ["stored_as"]

_CACHE: Final = dis.opmap.get("CACHE", -1)  # inline cache entries of 3.11+, after a call
_EXTENDED_ARG: Final = dis.EXTENDED_ARG
_STORE_NAME: Final = dis.opmap["STORE_NAME"]
_STORE_GLOBAL: Final = dis.opmap["STORE_GLOBAL"]


def _next_store(code: types.CodeType, lasti: int) -> tuple[int, str] | None:
    """The instruction after the one at ``lasti``, when it stores a name: (opcode, name).

    Reads the bytecode from ``lasti`` on (two bytes an instruction since 3.6) instead of
    disassembling the whole module, which a module decorating many kernels would pay
    for each one.
    """
    raw = code.co_code
    offset, arg = lasti + 2, 0
    while offset + 1 < len(raw):
        op, value = raw[offset], raw[offset + 1]
        offset += 2
        if op == _CACHE:
            continue
        if op == _EXTENDED_ARG:
            arg = (arg | value) << 8
            continue
        if op in (_STORE_NAME, _STORE_GLOBAL):
            return op, code.co_names[arg | value]
        return None
    return None


def stored_as(frame: types.FrameType) -> tuple[str, str] | None:
    """``(module, qualname)`` under which the call running in ``frame`` stores its result.

    None when the result is not stored in a module-level name or a module-level class
    body (a local variable, a list, an argument...): such objects cannot be pickled by
    reference anyway.
    """
    module = frame.f_globals.get("__name__")
    if not isinstance(module, str):
        return None
    store = _next_store(frame.f_code, frame.f_lasti)
    if store is None:
        return None
    op, name = store
    if op == _STORE_GLOBAL or frame.f_code.co_name == "<module>":
        return module, name
    owner = frame.f_locals.get("__qualname__")  # a class body: set before it runs
    if isinstance(owner, str) and "<locals>" not in owner:
        return module, f"{owner}.{name}"
    return None
