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

_SKIPPED: Final = frozenset({"CACHE", "EXTENDED_ARG", "NOP"})


def stored_as(frame: types.FrameType) -> tuple[str, str] | None:
    """``(module, qualname)`` under which the call running in ``frame`` stores its result.

    None when the result is not stored in a module-level name or a module-level class
    body (a local variable, a list, an argument...): such objects cannot be pickled by
    reference anyway.
    """
    module = frame.f_globals.get("__name__")
    if not isinstance(module, str):
        return None
    code = frame.f_code
    following = next(
        (i for i in dis.get_instructions(code) if i.offset > frame.f_lasti and i.opname not in _SKIPPED), None
    )
    if following is None or not isinstance(following.argval, str):
        return None
    name = following.argval
    at_module_level = following.opname == "STORE_NAME" and code.co_name == "<module>"
    if following.opname == "STORE_GLOBAL" or at_module_level:
        return module, name
    if following.opname == "STORE_NAME":  # a class body: its __qualname__ is set before it runs
        owner = frame.f_locals.get("__qualname__")
        if isinstance(owner, str) and "<locals>" not in owner:
            return module, f"{owner}.{name}"
    return None
