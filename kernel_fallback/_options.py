"""What ``tolerant_kwargs`` is given: its options checked once, and the values passed per call.

``_check_options`` validates the decorator's arguments when it is applied;
``_is_neutral`` says whether a passed value means the same as not passing the keyword
and ``_capturing`` whether a value is a CUDA tensor of a stream being captured into a
CUDA graph. Kept apart from the decorator so that chains share them.
"""

from __future__ import annotations

import functools
import keyword
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import torch

from kernel_fallback import _config
from kernel_fallback.exceptions import PolicyConfigError

__all__ = ["stream_capturing"]

_PLAIN = (type(None), bool, int, float, str)
_NOT_PLAIN: Final = object()


def _plain(value: object) -> object:
    """``value`` with lists as tuples if it is made of plain values only, else a marker."""
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(v) for v in value)
        return _NOT_PLAIN if _NOT_PLAIN in items else items
    return value if isinstance(value, _PLAIN) else _NOT_PLAIN


def _no_capture() -> bool:
    return False


#: True while the current CUDA stream is being captured into a graph. The C check
#: itself: ``torch.cuda.is_current_stream_capturing`` first asks whether CUDA is
#: initialised, which a CUDA tensor in hand already answers.
stream_capturing: Callable[[], bool] = getattr(torch._C, "_cuda_isCurrentStreamCapturing", _no_capture)


def _capturing(value: object) -> bool:
    """True when ``value`` is a CUDA tensor and a CUDA graph is being captured (no sync)."""
    return isinstance(value, torch.Tensor) and value.is_cuda and stream_capturing()


def _is_neutral(value: object, neutral: object) -> bool:
    """True when passing ``value`` means the same as not passing the keyword."""
    if value is neutral:
        return True
    if isinstance(value, torch.Tensor):  # the common case, answered first
        return False
    # Only plain values compare safely (`tensor == x` is elementwise); a list and a tuple
    # of the same items mean the same to a kernel (window_size=[-1, -1]).
    plain = _plain(value)
    return plain is not _NOT_PLAIN and plain == _plain(neutral)


def _check_options(
    drop: object, on_drop: object, name: object, env: object
) -> tuple[dict[str, object], str | dict[str, str] | None]:
    if callable(drop) and not isinstance(drop, Mapping):
        raise TypeError(
            f"tolerant_kwargs needs the keywords to drop, got {drop!r}; "
            "write @tolerant_kwargs(drop=['out'], on_drop='copy')."
        )
    if isinstance(drop, str) or not isinstance(drop, Iterable):
        raise PolicyConfigError(
            f"tolerant_kwargs(drop={drop!r}): drop must be a list of keyword names or a "
            "mapping name -> neutral value, e.g. drop=['out'] or drop={'only_qv': False}.",
            name="drop",
            value=drop,
        )
    neutral: dict[str, object] = dict(drop) if isinstance(drop, Mapping) else dict.fromkeys(drop)
    if not neutral:
        raise PolicyConfigError(
            "tolerant_kwargs(drop=...) is empty: list at least one keyword the kernel may lack.",
            name="drop",
            value=drop,
        )
    for kwarg in neutral:
        if not isinstance(kwarg, str) or not kwarg.isidentifier() or keyword.iskeyword(kwarg):
            raise PolicyConfigError(
                f"tolerant_kwargs(drop=...): {kwarg!r} is not a keyword argument name.",
                name="drop",
                value=kwarg,
            )
    policy = _config.check_on_drop("tolerant_kwargs", on_drop, neutral)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise PolicyConfigError(
            f"tolerant_kwargs(name={name!r}): name must be a non-empty string.", name="name", value=name
        )
    if env is not None and not _config.is_env_name(env):
        raise PolicyConfigError(
            f"tolerant_kwargs(env={env!r}): env must be an environment variable name "
            "(ASCII letters, digits, underscores, not starting with a digit).",
            name="env",
            value=env,
        )
    if isinstance(env, str) and env.upper().startswith(_config.ENV_PREFIX):
        # The library's own names mean one thing each; `env=KERNEL_FALLBACK_STRICT` would
        # give a variable two meanings, and a new name there is reported as a typo.
        raise PolicyConfigError(
            f"tolerant_kwargs(env={env!r}): names under {_config.ENV_PREFIX} belong to "
            f"kernel_fallback; use a variable of your own (MYAPP_..._ON_DROP), or "
            f"{_config.ENV_ON_DROP_PREFIX}<NAME>, which every kernel reads already.",
            name="env",
            value=env,
        )
    return neutral, policy


def _default_name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    for attr in ("__name__", "_qualname"):
        value = getattr(fn, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(fn).__name__
