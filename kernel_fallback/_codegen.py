"""Functions compiled from generated source: the forwarders and the chains' fast paths.

Both are made once, at decoration or activation, from the wrapped kernel's own parameter
names; the names they add for themselves start with :data:`PREFIX`.
"""

from __future__ import annotations

import linecache
import os
import types
from typing import Any, Final, cast

__all__ = ["PREFIX", "define"]

#: Prefix of every name generated code adds (a kernel parameter with it is not forwarded).
PREFIX: Final = "_kf_"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def define(
    source: str, entry: str, label: str, namespace: dict[str, Any], *, name: str, qualname: str
) -> types.FunctionType:
    """Compile ``source`` in ``namespace`` and return its function ``entry``, renamed.

    The file name is ``<label>`` inside the package: events recorded below the function
    skip its frame for ``where``, and tracebacks show its source through linecache.
    ``name``/``qualname`` are what tracebacks, profilers and CPython's own argument
    errors ("f() got an unexpected keyword argument") show.
    """
    filename = os.path.join(_PACKAGE_DIR, f"<{label}>")
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)  # source made of the kernel's own names
    made: types.FunctionType = namespace.pop(entry)
    renamed = made.__code__.replace(co_name=name)
    if hasattr(renamed, "co_qualname"):  # Python 3.11+
        renamed = cast(Any, renamed).replace(co_qualname=qualname)
    made.__code__ = renamed
    return made
