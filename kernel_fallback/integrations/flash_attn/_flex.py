"""flex_attention as the ``torch`` provider calls it: one call, compiled on CUDA.

:func:`flex_attend` runs flex over (B, H, L, D) tensors with a block mask, FA3's softcap
as a ``score_mod`` and sinks folded in through the log-sum-exp, and picks the tiles that
were measured to help (Hopper, 16-bit) or are needed (head dims over 256, MLA).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Final

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as _flex_mod

from kernel_fallback._gates import device_capability

__all__ = ["flex_attend", "softcap_mod"]


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    return torch.compile(_flex_mod.flex_attention)


def softcap_mod(softcap: float, device: torch.device, *, via_sigmoid: bool) -> Callable[..., Tensor]:
    """FA3's softcap, ``cap * tanh(score / cap)``, as a flex ``score_mod``.

    ``via_sigmoid`` computes tanh through the identity ``tanh(x) = 2 * sigmoid(2x) - 1``:
    Inductor lowers sigmoid to exp2 but tanh to libdevice's slower tanh, and that
    difference made softcap prefill 1.6x slower on an H100 (5.8 vs 3.5-3.9 ms, 2 x 8192).
    The identity is exact; in float32 it adds an absolute error of about 1e-7 * cap
    near zero, below bf16/fp16 resolution, so it is used for 16-bit inputs only.
    """
    # Device scalars: a Python float would be lifted to a CPU tensor the CUDA kernel cannot read.
    cap = torch.full((), softcap, dtype=torch.float32, device=device)
    if via_sigmoid:
        two_over_cap = torch.full((), 2.0 / softcap, dtype=torch.float32, device=device)

        def softcap_sigmoid(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            del b, h, q_idx, kv_idx
            return cap * (2 * torch.sigmoid(score * two_over_cap) - 1)

        return softcap_sigmoid

    def softcap_score(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        del b, h, q_idx, kv_idx
        return cap * torch.tanh(score / cap)

    return softcap_score


#: flex forward tiles for Hopper, 16-bit, head dims 64/128: 128 x 128 tiles, 8 warps, 3
#: stages, TMA loads. Measured on an H100 against flex's defaults (same inputs):
#: 2 x 8192 causal 2.77 -> 2.38 ms, 8 x 2048 0.92 -> 0.88 ms, softcap 3.89 -> 3.52 ms.
_HOPPER_TILES: Final = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True}


#: flex forward tiles for head dims over 256 (MLA's 576/512): flex's default tiles asked
#: for 416 KiB of shared memory on an H100 ("out of resource ... Required: 425984"), more
#: than any GPU has; 32 x 32 tiles in one stage need about 160 KiB.
_WIDE_HEAD_TILES: Final = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "num_warps": 4}


def _kernel_options(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any] | None:
    """Tiles for this call where they were measured to help or are needed (else flex's own)."""
    if q.device.type == "cuda" and (q.shape[-1] > 256 or v.shape[-1] > 256):
        return dict(_WIDE_HEAD_TILES)
    if device_capability(q.device)[0] != 9 or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    if q.shape[-1] not in (64, 128) or v.shape[-1] not in (64, 128):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # the backward has tiles of its own: leave flex's defaults
    return dict(_HOPPER_TILES)


def flex_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: _flex_mod.BlockMask,
    scale: float,
    softcap: float,
    sinks: Tensor | None,
    want_lse: bool,
) -> tuple[Tensor, Tensor | None, str]:
    """flex over (B, H, L, D) tensors; returns out, lse (B, Hq, Lq) float32 or None, backend."""
    kwargs: dict[str, Any] = {
        "score_mod": (
            softcap_mod(softcap, q.device, via_sigmoid=q.dtype in (torch.bfloat16, torch.float16))
            if softcap > 0
            else None
        ),
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": q.shape[1] != k.shape[1],
    }
    need_lse = want_lse or sinks is not None
    if need_lse:
        kwargs["return_aux"] = _flex_mod.AuxRequest(lse=True)
    if q.device.type == "cuda":
        options = _kernel_options(q, k, v)
        if options is not None:
            kwargs["kernel_options"] = options
        result, backend = _compiled_flex()(q, k, v, **kwargs), "flex_attention (compiled)"
    else:
        with warnings.catch_warnings():  # eager flex warns that it is unfused: known, chosen
            warnings.simplefilter("ignore", UserWarning)
            result = _flex_mod.flex_attention(q, k, v, **kwargs)
        backend = f"flex_attention (eager, {q.device.type})"
    if not need_lse:
        return result, None, backend
    out, aux = result
    lse = aux.lse.float()
    if sinks is not None:
        sink = sinks.to(device=lse.device, dtype=torch.float32).view(1, -1, 1)
        with_sink = torch.logaddexp(lse, sink)
        out = (out.float() * torch.exp(lse - with_sink).unsqueeze(-1)).to(out.dtype)
        lse = with_sink
    return out, lse, backend
