"""Decode over a KV cache on CUDA: the Triton split-K kernel, or SDPA for small row counts.

:func:`triton_decode_fits` says whether the Triton kernel of
:mod:`~kernel_fallback.integrations.flash_attn._triton_decode` serves a (non-packed) cache
call, :func:`triton_decode` runs it without a host sync, :func:`sdpa_decode` is the SDPA
path with the query heads of a kv head folded into rows. ``KERNEL_FALLBACK_TRITON=0``
turns the Triton path off.

Eager decode pays the provider's checks on the host every call. A plain decode call
(no appended keys, packed q, rotary, batch index or left padding) that the Triton kernel
served is remembered by everything those checks and the routing read: each tensor's
shape, strides, dtype, device and 16-byte alignment, the scalar options and
``KERNEL_FALLBACK_TRITON``. A later call with the same key (:func:`decode_key`,
:func:`remembered`) launches the remembered kernel plan directly. Values are never read,
so a key can only repeat a check that passed; calls autograd would record are never
remembered.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any, Final, final

import torch
from torch import Tensor

from kernel_fallback import _config
from kernel_fallback._gates import device_capability
from kernel_fallback.integrations.flash_attn._masks import MaskSpec

__all__ = [
    "SDPA_DECODE_MAX_ROWS",
    "TRITON_DECODE",
    "TRITON_DECODE_ENV",
    "decode_key",
    "one_query_per_sequence",
    "remembered",
    "sdpa_decode",
    "triton_decode",
    "triton_decode_enabled",
    "triton_decode_fits",
]

#: Environment variable: false (``0``) keeps CUDA decode off the Triton kernel (SDPA/flex instead).
TRITON_DECODE_ENV = _config.ENV_TRITON
#: The backend name of the Triton split-K decode path in ``describe_table()``.
TRITON_DECODE = "triton split-k decode (paged)"
#: Most query rows per kv head the SDPA decode path takes (its mask is rows x capacity).
SDPA_DECODE_MAX_ROWS = 64


def triton_decode_enabled() -> bool:
    """``KERNEL_FALLBACK_TRITON`` as a boolean: unset or blank means on."""
    return _triton_decode_flag(os.environ.get(TRITON_DECODE_ENV))


@functools.lru_cache(maxsize=8)
def _triton_decode_flag(raw_value: str | None) -> bool:
    # Parsed once per value, as `kernel-fallback config` parses it (one registry,
    # _config.VARIABLES); an invalid value raises every time: errors are not cached.
    return _config.parse_flag(TRITON_DECODE_ENV, raw_value, default=True)


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_decode_fits(q: Tensor, k_cache: Tensor, v_cache: Tensor, spec: MaskSpec) -> bool:
    """Whether the Triton split-K decode kernel serves this (non-packed) cache call.

    CUDA tensors (compute capability 8.0+) of one dtype: fp16/bf16, or fp8 (e4m3/e5m2,
    8.9+); at most ``MAX_ROWS`` query rows per kv head (tiled), head dims up to 256 and
    value dims up to 512 (MLA's latent), unit stride in the head dim of the cache (any
    other strides), no ``attention_chunk``; ``KERNEL_FALLBACK_TRITON=0`` opts out.
    """
    if not triton_decode_enabled() or not _has_triton():
        return False
    if q.device.type != "cuda" or k_cache.device != q.device or device_capability(q.device) < (8, 0):
        return False
    kernel = _triton_decode_module()
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        return False
    if q.dtype in kernel.FP8_DTYPES:
        if device_capability(q.device) < (8, 9):  # Triton widens fp8 in registers from sm_89 on
            return False
    elif q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:  # the kernel reads head dims contiguously
        return False
    rows = q.shape[1] * (q.shape[2] // k_cache.shape[2])
    return spec.chunk == 0 and rows <= kernel.MAX_ROWS and q.shape[-1] <= 256 and v_cache.shape[-1] <= 512


@functools.cache
def _triton_decode_module() -> ModuleType:
    # Imported on first use: importing triton is slow, and CPU-only users never need it.
    from kernel_fallback.integrations.flash_attn import _triton_decode

    return _triton_decode


class _Unkeyed(Exception):
    """An argument of a type the decode key does not cover: the call is not remembered."""


def _layout(t: object) -> tuple[Any, ...] | None:
    # Everything about a tensor the provider's checks and the kernel's plan depend on.
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise _Unkeyed
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


def decode_key(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor | int | None,
    page_table: Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    window_size: Any,
    attention_chunk: int | None,
    softcap: float,
    sinks: Tensor | None,
    want_lse: bool,
    qv: Tensor | None,
    descales: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> tuple[Any, ...] | None:
    """The key a plain decode call is remembered by (module docstring), or None if never.

    The caller has checked that the call is on CUDA, appends nothing and has no packed q,
    rotary, batch index or left padding.
    """
    if not (
        q.stride(-1) == 1
        and (not isinstance(qv, Tensor) or qv.stride(-1) == 1)  # the kernel's plan is of unit strides
        and type(window_size) is tuple
        and len(window_size) == 2
        and type(window_size[0]) is int
        and type(window_size[1]) is int
        and type(causal) is bool
        and type(softcap) in (float, int)
        and type(softmax_scale) in (float, int, type(None))
        and type(attention_chunk) in (int, type(None))
        and (type(cache_seqlens) in (int, type(None)) or isinstance(cache_seqlens, Tensor))
    ):
        return None
    if torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (q, k_cache, v_cache, sinks, qv)
    ):
        return None  # autograd records it: flex serves it, never the kernel
    try:
        return (
            _layout(q), _layout(k_cache), _layout(v_cache), _layout(page_table), _layout(sinks),
            _layout(qv), *map(_layout, descales),
            _layout(cache_seqlens) if isinstance(cache_seqlens, Tensor) else cache_seqlens is None,
            softmax_scale, causal, window_size, attention_chunk, softcap, bool(want_lse),
            os.environ.get(TRITON_DECODE_ENV),
        )  # fmt: skip
    except _Unkeyed:
        return None


@final
class _Served:
    """A remembered decode layout: the kernel plan and what the checks worked out for it."""

    __slots__ = ("descaled", "lens", "plan", "scale", "softcap", "want_lse", "window")

    def __init__(
        self, plan: Any, lens: int, scale: float, spec: MaskSpec, softcap: float, lse: bool, descaled: bool
    ) -> None:
        self.plan, self.lens, self.scale = plan, lens, scale  # lens: the capacity, for calls without lengths
        self.window = (spec.left, spec.right)
        self.softcap, self.want_lse = softcap, lse
        self.descaled = descaled  # fp8: the descales are read (FA3 ignores them otherwise)

    def __call__(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        cache_seqlens: Tensor | int | None,
        page_table: Tensor | None,
        sinks: Tensor | None,
        qv: Tensor | None,
        descales: tuple[Tensor | None, Tensor | None, Tensor | None],
    ) -> Tensor | tuple[Tensor, Tensor]:
        kernel = _triton_decode_module()
        split_args, merge_args, out, lse = kernel.arguments(
            self.plan, q, k_cache, v_cache, self.lens if cache_seqlens is None else cache_seqlens,
            page_table, self.scale, self.window, self.softcap, sinks, self.want_lse, 0, qv,
            descales if self.descaled else (None, None, None),
        )  # fmt: skip
        kernel.launch(self.plan, split_args, merge_args)
        return (out, lse) if self.want_lse and lse is not None else out


_SERVED: dict[tuple[Any, ...], _Served] = {}
_MAX_SERVED: Final = 256  # layouts; a server has a handful per model


def remembered(key: tuple[Any, ...] | None) -> _Served | None:
    """The remembered plan of a :func:`decode_key`, callable like the call it serves; or None."""
    return _SERVED.get(key) if key is not None else None


def triton_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor | int,
    s_new: int,
    page_table: Tensor | None,
    scale: float,
    spec: MaskSpec,
    softcap: float,
    sinks: Tensor | None,
    want_lse: bool,
    qv: Tensor | None = None,
    descales: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
    *,
    remember: tuple[Any, ...] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The Triton kernel over ``cache_seqlens + s_new`` keys: no cast, add or sync on the host side.

    ``remember``: the call's :func:`decode_key` (a plain decode), under which its plan is
    kept for the next call of the layout.
    """
    if isinstance(cache_seqlens, Tensor) and cache_seqlens.device != q.device:
        cache_seqlens = cache_seqlens.to(q.device)
    kernel = _triton_decode_module()
    q_d, k_d, v_d = descales
    plan, split_args, merge_args, out, lse = kernel.prepare(
        q, k_cache, v_cache, cache_seqlens, page_table, scale, (spec.left, spec.right), softcap, sinks,
        want_lse, lens_add=s_new, qv=qv, q_descale=q_d, k_descale=k_d, v_descale=v_d,
    )  # fmt: skip
    kernel.launch(plan, split_args, merge_args)
    # Remembered once compiled and launched (never under the interpreter), and only for a
    # call whose q/qv the plan took as they are (decode_key refuses other strides).
    if remember is not None and s_new == 0 and plan.split is not None:
        if len(_SERVED) >= _MAX_SERVED:
            _SERVED.clear()
        lens = cache_seqlens if isinstance(cache_seqlens, int) else 0
        descaled = any(t is not None for t in descales)
        _SERVED[remember] = _Served(plan, lens, scale, spec, softcap, want_lse, descaled)
    return (out, lse) if want_lse and lse is not None else out


def one_query_per_sequence(
    q: Tensor,
    k: Tensor | None,
    cu_seqlens_q: Tensor | None,
    max_seqlen_q: int | None,
    cache_seqlens: Tensor | int | None,
) -> bool:
    """Whether packed ``q`` holds exactly one query per sequence, known without a host read.

    FA3 trusts ``max_seqlen_q`` (its grid is sized by it): at most one query in each of B
    sequences and B query rows in all means one each. Without appended keys only, so the
    (B, 1) call is the same call.
    """
    return (
        cu_seqlens_q is not None
        and max_seqlen_q == 1
        and k is None
        and q.dim() == 3
        and isinstance(cache_seqlens, Tensor)
        and cache_seqlens.dim() == 1
        and cache_seqlens.shape[0] == q.shape[0]
        and cu_seqlens_q.shape == (q.shape[0] + 1,)
    )


def sdpa_decode(q: Tensor, k_log: Tensor, v_log: Tensor, lo: Tensor, hi: Tensor, scale: float) -> Tensor:
    """SDPA with the G query heads of each kv head folded into the query length.

    q (B, Sq, Hq, D), k_log/v_log (B, cap, Hkv, D[v]), lo/hi (B, Sq) -> (B, Sq, Hq, Dv).
    """
    batch, sq, hq, d = q.shape
    hkv, cap = k_log.shape[2], k_log.shape[1]
    g = hq // hkv
    qg = q.reshape(batch, sq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(batch, hkv, g * sq, d)
    cols = torch.arange(cap, device=q.device)
    allowed = (cols >= lo.unsqueeze(-1)) & (cols < hi.unsqueeze(-1))  # (B, Sq, cap)
    mask = allowed.unsqueeze(1).expand(batch, g, sq, cap).reshape(batch, 1, g * sq, cap)
    out = torch.nn.functional.scaled_dot_product_attention(
        qg, k_log.transpose(1, 2), v_log.transpose(1, 2), attn_mask=mask, scale=scale
    )
    out = out.reshape(batch, hkv, g, sq, -1).permute(0, 3, 1, 2, 4).reshape(batch, sq, hq, -1)
    # A row with no key is NaN in SDPA; FA3 gives zeros.
    return torch.where(
        (hi > lo).view(batch, sq, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device)
    )
