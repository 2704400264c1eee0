"""A stand-in for the flash-attn-4 package (``flash_attn.cute``), for tests without a GPU.

``flash_attn_varlen_func`` has the signature of the published flash-attn-4 4.0.0b36
(``flash_attn/cute/interface.py``: ``qv`` fourth, ``return_lse`` rather than FA3's
``return_softmax_lse``, windows with None for unbounded, always ``(out, lse)``), computed by
the reference provider. Features the stand-in cannot compute raise NotImplementedError
rather than being ignored. :func:`install` writes the package under a directory put on
sys.path.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kernel_fallback.integrations.flash_attn import _reference as ref

#: Every call the stand-in received, each argument by name.
CALLS: list[dict[str, Any]] = []
MODULES = ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface")


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qv: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    min_seqlen_k: int | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    gather_kv_indices: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    learnable_sink: torch.Tensor | None = None,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    deterministic: bool = False,
    score_mod: Callable[..., Any] | None = None,
    score_mod_bwd: Callable[..., Any] | None = None,
    mask_mod: Callable[..., Any] | None = None,
    block_sparse_tensors: Any = None,
    aux_tensors: list[Any] | None = None,
    aux_scalars: tuple[Any, ...] | None = None,
    return_lse: bool = False,
    scheduler_metadata: Any = None,
    seqlen_k_per_split: int | None = None,
    disable_scheduler_metadata: bool = False,
    gather_bwd_recompute_p: bool = False,
    gather_bwd_token_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flash-attn-4's varlen entry point (batched or packed q; paged or contiguous k/v)."""
    CALLS.append(dict(locals()))
    unsupported = {"qv": qv, "gather_kv_indices": gather_kv_indices, "score_mod": score_mod}
    given = [name for name, value in unsupported.items() if value is not None]
    if given:
        raise NotImplementedError(f"the flash-attn-4 stand-in cannot compute {', '.join(given)}")
    left, right = window_size
    window = (-1 if left is None else left, -1 if right is None else right)
    if cu_seqlens_q is not None and cu_seqlens_k is not None:
        out, lse = ref.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q=seqused_q, seqused_k=seqused_k,
            softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap,
            sinks=learnable_sink, return_softmax_lse=True,
        )  # fmt: skip
    else:  # a cache: FA4 takes its key counts as seqused_k
        out, lse = ref.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=seqused_k, page_table=page_table, cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q, softmax_scale=softmax_scale, causal=causal,
            window_size=window, softcap=softcap, sinks=learnable_sink, return_softmax_lse=True,
        )  # fmt: skip
    return out, (lse if return_lse else None)


def install(root: Path) -> None:
    """Write ``flash_attn/cute/interface.py`` (a namespace ``flash_attn``, as the wheel has)."""
    cute = root / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text("from .interface import flash_attn_varlen_func\n")
    (cute / "interface.py").write_text("from fa4_stubs import flash_attn_varlen_func\n")
    importlib.invalidate_caches()


def uninstall() -> None:
    """Forget the imported stand-in modules and the recorded calls."""
    for name in MODULES:
        sys.modules.pop(name, None)
    CALLS.clear()
