"""Capability gates and host flags for kernel chains.

A :class:`Gate` is checked before a provider is loaded and says, in a sentence, why the
provider cannot be used here (no CUDA, wrong compute capability, old CUDA or torch, other
platform). A :class:`BoolFlag` is a host project's boolean environment variable (such as
sglang's ``SGLANG_USE_SGL_FA3_KERNEL``) that picks the order in which a chain tries its
providers.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from typing import Final, final

import torch

from kernel_fallback._config import Snapshot, is_env_name, parse_bool
from kernel_fallback.exceptions import PolicyConfigError

__all__ = [
    "LOAD_ERRORS",
    "BoolFlag",
    "Gate",
    "cuda_available",
    "cuda_capability",
    "cuda_version",
    "device_capability",
    "is_load_error",
    "platform_is",
    "torch_version",
    "version_key",
]

#: What a provider that cannot be used here raises while being gated or loaded: a
#: missing package or name (ImportError), a missing shared object (OSError), a failed
#: CUDA initialisation (RuntimeError). RecursionError, a RuntimeError, is a bug.
LOAD_ERRORS: Final = (ImportError, OSError, RuntimeError)


def is_load_error(exc: BaseException) -> bool:
    """True when ``exc`` means "cannot be used here" rather than a bug."""
    return isinstance(exc, LOAD_ERRORS) and not isinstance(exc, RecursionError)


@final
class Gate:
    """A capability check run before a provider is loaded.

    ``check`` returns None when the provider may be used here, else a sentence saying
    why not. Build gates with :func:`cuda_available`, :func:`cuda_capability`,
    :func:`cuda_version`, :func:`torch_version`, :func:`platform_is`, or directly.
    """

    __slots__ = ("_check", "description")

    def __init__(self, description: str, check: Callable[[], str | None]) -> None:
        if not isinstance(description, str) or not description.strip():
            raise PolicyConfigError(
                f"Gate(description={description!r}): give a non-empty description.",
                name="description",
                value=description,
            )
        if not callable(check):
            raise TypeError(f"Gate({description!r}, check={check!r}): check must be callable.")
        self.description = description
        self._check = check

    def reason(self) -> str | None:
        """Why the gate is closed, or None when open; a load error while checking closes it."""
        try:
            result = self._check()
        except Exception as exc:
            if not is_load_error(exc):
                raise
            return f"checking {self.description} raised {type(exc).__name__}: {exc}"
        if result is not None and not isinstance(result, str):
            raise TypeError(f"Gate {self.description!r} returned {result!r}; return None or a reason (str).")
        return result

    def __repr__(self) -> str:
        return f"<Gate {self.description}>"


def _no_cuda() -> str | None:
    """Why CUDA cannot be used, or None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return "torch.cuda.is_available() is False (no CUDA device visible or the driver failed)"


def cuda_available() -> Gate:
    """Open when torch can use a CUDA device."""
    return Gate("CUDA available", _no_cuda)


def cuda_capability(*majors: int) -> Gate:
    """Open when the current CUDA device's compute capability major is one of ``majors``.

    ``cuda_capability(8, 9)`` admits 8.x (Ampere, Ada) and 9.x (Hopper). Checked once,
    on the device current when the provider is first opened.
    """
    if not majors or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in majors):
        raise PolicyConfigError(
            f"cuda_capability{majors!r}: give one or more major versions as positive ints, "
            "e.g. cuda_capability(8, 9).",
            name="cuda_capability",
            value=majors,
        )
    wanted = tuple(sorted(set(majors)))
    text = " or ".join(f"{m}.x" for m in wanted)

    def check() -> str | None:
        closed = _no_cuda()
        if closed is not None:
            return closed
        major, minor = torch.cuda.get_device_capability()
        if major in wanted:
            return None
        device = torch.cuda.current_device()
        return (
            f"device {device} ({torch.cuda.get_device_name(device)}) has compute capability "
            f"{major}.{minor}, not {text}"
        )

    return Gate(f"compute capability {text}", check)


@functools.cache
def device_capability(device: torch.device) -> tuple[int, int]:
    """A device's CUDA compute capability ``(major, minor)``; ``(0, 0)`` off CUDA.

    Read once per device: kernel paths ask on every call, and the driver query is not free.
    """
    if device.type != "cuda":
        return (0, 0)
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor)


def version_key(text: object) -> tuple[int, ...] | None:
    """The leading dotted numbers of a version (``'2.4.1+cu121'`` -> ``(2, 4, 1)``), None if none."""
    match = re.match(r"^\s*(\d+(?:\.\d+)*)", text) if isinstance(text, str) else None
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _version(option: str, text: str) -> tuple[int, ...]:
    key = version_key(text)
    if key is None:
        raise PolicyConfigError(
            f"{option}={text!r} is not a version; write it like '12.3' or '2.4.1'.", name=option, value=text
        )
    return key


def _at_least(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    width = max(len(have), len(want))
    return have + (0,) * (width - len(have)) >= want + (0,) * (width - len(want))


def cuda_version(*, at_least: str) -> Gate:
    """Open when torch is built for CUDA ``at_least`` or newer (compared numerically)."""
    want = _version("cuda_version(at_least)", at_least)

    def check() -> str | None:
        built = torch.version.cuda
        if built is None:
            return f"torch {torch.__version__} is built without CUDA"
        if _at_least(_version("torch.version.cuda", built), want):
            return None
        return f"torch is built for CUDA {built}, needs {at_least} or newer"

    return Gate(f"CUDA >= {at_least}", check)


def torch_version(*, at_least: str | None = None, below: str | None = None) -> Gate:
    """Open when ``at_least <= torch.__version__ < below`` (either bound may be omitted)."""
    if at_least is None and below is None:
        raise PolicyConfigError(
            "torch_version(): give at_least=, below= or both.", name="torch_version", value=None
        )
    low = _version("torch_version(at_least)", at_least) if at_least is not None else None
    high = _version("torch_version(below)", below) if below is not None else None
    text = " and ".join(
        part for part in (f">= {at_least}" if low else "", f"< {below}" if high else "") if part
    )

    def check() -> str | None:
        have = _version("torch.__version__", torch.__version__)
        if (low is None or _at_least(have, low)) and (high is None or not _at_least(have, high)):
            return None
        return f"torch {torch.__version__} is not {text}"

    return Gate(f"torch {text}", check)


def platform_is(*platforms: str) -> Gate:
    """Open when ``sys.platform`` is one of ``platforms`` (``"linux"``, ``"darwin"``, ``"win32"``)."""
    if not platforms or any(not isinstance(p, str) or not p for p in platforms):
        raise PolicyConfigError(
            f"platform_is{platforms!r}: give sys.platform values such as 'linux'.",
            name="platform_is",
            value=platforms,
        )

    def check() -> str | None:
        if sys.platform in platforms:
            return None
        return f"platform is {sys.platform}, not {' or '.join(platforms)}"

    return Gate(f"platform {' or '.join(platforms)}", check)


@final
class BoolFlag:
    """A host project's boolean variable that picks the automatic provider order.

    ``BoolFlag("SGLANG_USE_SGL_FA3_KERNEL", default=True, when_true=("sgl_kernel", "torch"),
    when_false=("hub", "sgl_kernel", "torch"))``: the chain tries the providers of the
    order the variable's value selects, first to last. Values are parsed like every
    boolean of this library (true/false/1/0/yes/no/on/off, any case; empty is unset);
    anything else raises :class:`PolicyConfigError`.
    """

    __slots__ = ("default", "var", "when_false", "when_true")

    def __init__(
        self, var: str, *, default: bool, when_true: Sequence[str], when_false: Sequence[str]
    ) -> None:
        if not is_env_name(var):
            raise PolicyConfigError(
                f"BoolFlag({var!r}): the first argument must be an environment variable name.",
                name="var",
                value=var,
            )
        if not isinstance(default, bool):
            raise PolicyConfigError(
                f"BoolFlag({var!r}, default={default!r}): default must be True or False.",
                name="default",
                value=default,
            )
        self.var = var
        self.default = default
        self.when_true = _order(f"BoolFlag({var!r}).when_true", when_true)
        self.when_false = _order(f"BoolFlag({var!r}).when_false", when_false)

    def read(self, snap: Snapshot) -> bool | None:
        """The variable's value in ``snap``, None when unset; raises when not a boolean."""
        raw = snap.get(self.var)
        return None if raw is None else parse_bool(self.var, raw)

    def order(self, value: bool) -> tuple[str, ...]:
        """The provider order for ``value``."""
        return self.when_true if value else self.when_false

    def __repr__(self) -> str:
        return (
            f"BoolFlag({self.var!r}, default={self.default}, when_true={self.when_true}, "
            f"when_false={self.when_false})"
        )


def _order(option: str, names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise PolicyConfigError(
            f"{option}={names!r}: give a non-empty tuple of provider names, first choice first.",
            name=option,
            value=names,
        )
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or name in seen:
            raise PolicyConfigError(
                f"{option}: {name!r} is not a provider name or is listed twice.", name=option, value=names
            )
        seen.add(name)
    return tuple(names)
