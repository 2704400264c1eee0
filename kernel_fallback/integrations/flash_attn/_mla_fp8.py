"""MLA's ``qv`` and fp8 ``*_descale`` for the reference and the torch provider.

FlashAttention-3's math (hopper mainloop), which both providers follow::

    S = (q @ k^T + qv @ v^T) * softmax_scale * q_descale[b, hkv] * k_descale[b, hkv]
    O = softmax(S) @ v * v_descale[b, hkv]

* ``qv`` (absorbed multi-head latent attention, as sglang runs DeepSeek-V2/V3): shaped like
  ``q`` with ``v``'s head dim; its product with the values is added to the scores. The
  default ``softmax_scale`` becomes ``(D + Dv) ** -0.5``. FA3 itself takes ``qv`` only
  for fp16/bf16 and ``D <= 64`` on Hopper; these providers take any shape and dtype.
* fp8 (``float8_e4m3fn``, and ``float8_e5m2``, which FA3 lacks): q, k and v share the
  fp8 dtype; the output is bfloat16, as FA3's; descales are (batch, Hkv) float32 of any
  strides (sglang passes a 0-d scale ``.expand(batch, Hkv)``), one absent means 1. Query
  head ``h`` reads the descales of its kv head ``h // (Hq // Hkv)``. softcap applies to
  the descaled scores, the lse is that of ``S``.
* As in FA3, descales are read only for fp8 inputs: with fp16/bf16/fp32 inputs their
  shapes are still checked, their values are not used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DESCALES",
    "FP8_DTYPES",
    "check_descales",
    "check_qv",
    "compute_dtype",
    "default_scale",
    "is_fp8",
    "joint_view",
    "fold",
    "result_dtype",
    "row_factors",
    "scale_out",
]

#: The fp8 dtypes whose inputs are dequantized (e4m3 is FA3's; e5m2 where torch has it).
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)
#: The descale keywords, in FA3's order.
DESCALES = ("q_descale", "k_descale", "v_descale")


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is an fp8 dtype these providers dequantize."""
    return dtype in FP8_DTYPES


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The output dtype FA3 gives for inputs of ``dtype``: bfloat16 for fp8, else ``dtype``."""
    return torch.bfloat16 if is_fp8(dtype) else dtype


def default_scale(q: Tensor, qv: Tensor | None) -> float:
    """FA3's default ``softmax_scale``: ``(D + Dv) ** -0.5`` with ``qv``, else ``D ** -0.5``."""
    width = q.shape[-1] + (qv.shape[-1] if qv is not None else 0)
    return float(width**-0.5)


def check_qv(q: Tensor, qv: Tensor | None, dv: int) -> None:
    """``qv`` must have q's dtype, device and shape with the value head dim ``dv``."""
    if qv is None:
        return
    if not isinstance(qv, Tensor):
        raise ValueError(f"qv must be a tensor or None, got {type(qv).__name__}")
    want = (*q.shape[:-1], dv)
    if tuple(qv.shape) != want:
        raise ValueError(
            f"qv must have shape {want} (q's shape with the value head dim {dv}), got {tuple(qv.shape)}"
        )
    if qv.dtype != q.dtype or qv.device != q.device:
        raise ValueError(
            f"qv must have q's dtype and device ({q.dtype}, {q.device}), got {qv.dtype} on {qv.device}"
        )


def check_descales(
    q: Tensor, descales: tuple[Tensor | None, Tensor | None, Tensor | None], batch: int, hkv: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Check ``(q_descale, k_descale, v_descale)`` and return those FA3 would read.

    Each must be None or a float32 tensor of shape ``(batch, hkv)`` (any strides). For
    inputs that are not fp8 all three are returned as None: FA3 ignores them there.
    """
    for name, t in zip(DESCALES, descales, strict=True):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != torch.float32 or tuple(t.shape) != (batch, hkv):
            raise ValueError(
                f"{name} must be a float32 tensor of shape ({batch}, {hkv}) (batch, kv heads), "
                f"got {t.dtype} of shape {tuple(t.shape)}"
            )
    if not is_fp8(q.dtype):
        return None, None, None
    return descales


def row_factors(
    descales: tuple[Tensor | None, Tensor | None, Tensor | None], seq_of_row: Tensor, group: int
) -> tuple[Tensor | None, Tensor | None]:
    """Per query row and head, ``q_descale * k_descale`` and ``v_descale`` (None when absent).

    ``seq_of_row`` holds each query row's sequence (any shape, on q's device); the
    factors are float32 shaped ``(*seq_of_row.shape, Hq, 1)`` with ``Hq = Hkv * group``.
    """
    q_d, k_d, v_d = descales

    def per_row(t: Tensor) -> Tensor:
        per_kv_head = t.to(device=seq_of_row.device, dtype=torch.float32)[seq_of_row]
        return per_kv_head.repeat_interleave(group, -1)[..., None]

    scores = None
    for t in (q_d, k_d):
        if t is not None:
            scores = per_row(t) if scores is None else scores * per_row(t)
    return scores, per_row(v_d) if v_d is not None else None


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the torch provider attends in: fp8 runs as bfloat16 on CUDA (tensor cores),
    float32 elsewhere (CPU attention in bfloat16 rounds the scores); others as given."""
    if not is_fp8(dtype):
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def joint_view(k: Tensor, v: Tensor) -> Tensor | None:
    """``[v | k]`` along the head dim as one view, when ``v`` and ``k`` are adjacent views of one buffer.

    sglang keeps MLA's cache as one (tokens, 1, 512 + 64) buffer and passes ``c_kv`` (its
    first 512) as ``v_cache`` and ``k_rope`` (the last 64) as ``k_cache``; attending over
    that buffer directly saves the copy a concatenation makes. None when they are not so.
    """
    if k.dtype != v.dtype or k.device != v.device or k.shape[:-1] != v.shape[:-1] or k.stride() != v.stride():
        return None
    if k.stride(-1) != 1 or k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
        return None
    if k.storage_offset() != v.storage_offset() + v.shape[-1]:
        return None
    return v.as_strided((*v.shape[:-1], v.shape[-1] + k.shape[-1]), v.stride(), v.storage_offset())


def fold(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qv: Tensor | None,
    descales: tuple[Tensor | None, Tensor | None, Tensor | None],
    seq_of_row: Callable[[], Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(q, k, v)`` of one plain attention with FA3's scores, and the output's ``v_descale``.

    The scores ``(q @ k^T + qv @ v^T) * q_descale * k_descale`` are those of
    ``[q, qv] * q_descale * k_descale`` against ``[k, v]``, so MLA runs as ordinary
    attention with head dims ``D + Dv`` (scores) and ``Dv`` (values); the descales are
    folded into the (few) query rows instead of the (many) keys. ``seq_of_row()`` gives
    each query row's sequence (see :func:`row_factors`), asked only with descales. The
    tensors come in :func:`compute_dtype` (fp8 values cast exactly); the output factor is
    for :func:`scale_out`.
    """
    q_factor = v_factor = None
    if any(t is not None for t in descales):
        q_factor, v_factor = row_factors(descales, seq_of_row(), q.shape[-2] // k.shape[-2])
    dtype = compute_dtype(q.dtype, q.device)
    parts = [q] if qv is None else [q, qv]
    if q_factor is not None:
        parts = [(p.to(torch.float32) * q_factor).to(dtype) for p in parts]
    else:
        parts = [p.to(dtype) for p in parts]
    if qv is None:
        return parts[0], k.to(dtype), v.to(dtype), v_factor
    joint = joint_view(k, v) if k.dtype == dtype else None
    if joint is not None:  # [qv, q] against the buffer [v | k]: the same scores, no copy
        return torch.cat(parts[::-1], -1), joint, v, v_factor
    k, v = k.to(dtype), v.to(dtype)
    return torch.cat(parts, -1), torch.cat([k, v], -1), v, v_factor


def scale_out(out: Tensor, v_factor: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``out * v_descale`` per row and head, in ``dtype``."""
    if v_factor is None:
        return out.to(dtype)
    return (out.to(torch.float32) * v_factor).to(dtype)
