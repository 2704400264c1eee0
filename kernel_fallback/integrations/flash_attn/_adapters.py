"""Adapters that give FlashAttention-2 and FlashAttention-4 FA3's argument names.

Each ``load_*`` function is a provider loader for :mod:`kernel_fallback.integrations.flash_attn`:
it imports the package (ImportError when absent: the provider is then unavailable) and
returns a function that takes FA3's names and declares in its signature exactly what the
installed package can honour, so the chain routes the rest away instead of losing it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import torch
from torch import Tensor

from kernel_fallback._gates import device_capability
from kernel_fallback._providers import import_target
from kernel_fallback._signature import kwarg_support

__all__ = [
    "FA4_TARGET",
    "FA4_TARGETS",
    "load_fa2_kvcache",
    "load_fa2_varlen",
    "load_fa4_kvcache",
    "load_fa4_varlen",
]

#: Where the ``fa4`` provider (``ver=4``) loads FlashAttention-4 from, the first that
#: imports: the CuTe build sgl-kernel 0.3.x ships (0.4.x dropped it), then the
#: flash-attn-4 package's ``flash_attn.cute``.
FA4_TARGETS: Final = (
    "sgl_kernel._fa4_interface:flash_attn_varlen_func",
    "flash_attn.cute.interface:flash_attn_varlen_func",
)
#: The first of :data:`FA4_TARGETS` (sgl-kernel's build).
FA4_TARGET: Final = FA4_TARGETS[0]


def _declare_signature(fn: Callable[..., Any], options: Mapping[str, object]) -> None:
    """Give ``fn`` (which forwards ``**kwargs``) the signature naming exactly ``options``.

    kwarg_support() then reads which optional keywords this FA2 install takes, so the
    chain routes the others away instead of passing them to a kernel that would fail.
    """
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in options.items()]
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]


def _max_seqlen(cu_seqlens: Tensor) -> int:
    # FA2 needs the value; reading it synchronises with the device (pass it to avoid that).
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def load_fa2_varlen() -> Callable[..., Any]:
    """FA2's ``flash_attn_varlen_func`` under FA3's argument names."""
    fa2 = import_target("flash_attn:flash_attn_varlen_func")
    accepts = kwarg_support(fa2).accepts
    options = {k: v for k, v in {"window_size": (-1, -1), "softcap": 0.0}.items() if accepts(k)}

    def flash_attn_varlen_func(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        *,
        softmax_scale: float | None = None,
        causal: bool = False,
        return_softmax_lse: bool = False,
        **kwargs: Any,
    ) -> Any:
        result = fa2(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            _max_seqlen(cu_seqlens_q) if max_seqlen_q is None else max_seqlen_q,
            _max_seqlen(cu_seqlens_k) if max_seqlen_k is None else max_seqlen_k,
            softmax_scale=softmax_scale,
            causal=causal,
            return_attn_probs=return_softmax_lse,
            **kwargs,
        )
        # FA2 returns (out, lse, S_dmask) when asked; FA3 callers expect (out, lse).
        return (result[0], result[1]) if return_softmax_lse else result

    _declare_signature(flash_attn_varlen_func, options)
    return flash_attn_varlen_func


_FA2_KVCACHE_OPTIONS: Final[Mapping[str, object]] = {
    "rotary_cos": None,
    "rotary_sin": None,
    "rotary_interleaved": True,
    "cache_batch_idx": None,
    "cache_leftpad": None,
    "window_size": (-1, -1),
    "softcap": 0.0,
    "num_splits": 0,
    "return_softmax_lse": False,
}


def load_fa2_kvcache() -> Callable[..., Any]:
    """FA2's ``flash_attn_with_kvcache``; the keywords FA2 shares with FA3 pass through."""
    fa2 = import_target("flash_attn:flash_attn_with_kvcache")
    accepts = kwarg_support(fa2).accepts
    options = {k: v for k, v in _FA2_KVCACHE_OPTIONS.items() if accepts(k)}

    def flash_attn_with_kvcache(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        k: Tensor | None = None,
        v: Tensor | None = None,
        *,
        cache_seqlens: Tensor | int | None = None,
        max_seqlen_q: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        **kwargs: Any,
    ) -> Any:
        del max_seqlen_q  # a hint for packed queries (cu_seqlens_q), which FA2 lacks
        return fa2(
            q,
            k_cache,
            v_cache,
            k,
            v,
            cache_seqlens=cache_seqlens,
            softmax_scale=softmax_scale,
            causal=causal,
            **kwargs,
        )

    _declare_signature(flash_attn_with_kvcache, options)
    return flash_attn_with_kvcache


def _fa4_window(window_size: Sequence[int]) -> tuple[int | None, int | None]:
    # FA4 says "unbounded" with None where FA3 says -1.
    left, right = (int(w) for w in window_size)
    return (None if left < 0 else left, None if right < 0 else right)


def _import_fa4() -> Callable[..., Any]:
    """The first FlashAttention-4 of :data:`FA4_TARGETS` that imports; ImportError naming all."""
    failures = []
    for target in FA4_TARGETS:
        try:
            return import_target(target)  # type: ignore[no-any-return]
        except ImportError as exc:
            failures.append(f"{target}: {exc}")
    raise ImportError("no FlashAttention-4 build could be imported (" + "; ".join(failures) + ")")


def _lse_keyword(fa4: Callable[..., Any]) -> str:
    # sgl-kernel's build names it return_softmax_lse, flash-attn-4's return_lse.
    params = inspect.signature(fa4).parameters
    return "return_lse" if "return_lse" in params else "return_softmax_lse"


def _fa4_splits(num_splits: int, device: torch.device) -> int:
    # num_splits is a tuning hint (0 = FA4's heuristic): it never changes the result. FA4's
    # forward has no split-KV on SM 9.x and asserts on anything but 1, so capping it there
    # keeps sglang's num_splits=0 calls working.
    return 1 if device_capability(device)[0] == 9 else num_splits


def _fa4_options(
    device: torch.device,
    lse_keyword: str,
    softmax_scale: float | None,
    causal: bool,
    window_size: Sequence[int],
    sinks: Tensor | None,
    softcap: float,
    num_splits: int,
    pack_gqa: bool | None,
    return_softmax_lse: bool,
    score_mod: Callable[..., Any] | None,
    aux_tensors: list[Tensor] | None,
) -> dict[str, Any]:
    """FA3's options under FA4's names and conventions, shared by both FA4 adapters."""
    return {
        "softmax_scale": softmax_scale,
        "causal": causal,
        "window_size": _fa4_window(window_size),
        "learnable_sink": sinks,
        "softcap": softcap,
        "num_splits": _fa4_splits(num_splits, device),
        "pack_gqa": pack_gqa,
        lse_keyword: return_softmax_lse,
        "score_mod": score_mod,
        "aux_tensors": aux_tensors,
    }


def load_fa4_varlen() -> Callable[..., Any]:
    """FlashAttention-4 (the CuTe build shipped in sgl-kernel 0.3.x) under FA3's names."""
    fa4 = _import_fa4()
    return_lse = _lse_keyword(fa4)

    def flash_attn_varlen_func(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        *,
        seqused_q: Tensor | None = None,
        seqused_k: Tensor | None = None,
        page_table: Tensor | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        window_size: Sequence[int] = (-1, -1),
        softcap: float = 0.0,
        num_splits: int = 1,
        pack_gqa: bool | None = None,
        return_softmax_lse: bool = False,
        sinks: Tensor | None = None,
        score_mod: Callable[..., Any] | None = None,
        aux_tensors: list[Tensor] | None = None,
    ) -> Any:
        del max_seqlen_q, max_seqlen_k  # FA4 reads the lengths from cu_seqlens
        out, lse = fa4(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seqused_q=seqused_q,
            seqused_k=seqused_k,
            page_table=page_table,
            **_fa4_options(
                q.device, return_lse, softmax_scale, causal, window_size, sinks, softcap, num_splits,
                pack_gqa, return_softmax_lse, score_mod, aux_tensors,
            ),
        )  # fmt: skip
        return (out, lse) if return_softmax_lse else out

    return flash_attn_varlen_func


def load_fa4_kvcache() -> Callable[..., Any]:
    """FA4 over a (paged) cache, as sgl-kernel 0.3.21 maps it: no in-place append."""
    fa4 = _import_fa4()
    return_lse = _lse_keyword(fa4)

    def flash_attn_with_kvcache(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        k: Tensor | None = None,
        v: Tensor | None = None,
        *,
        cache_seqlens: Tensor | int | None = None,
        page_table: Tensor | None = None,
        cu_seqlens_q: Tensor | None = None,
        max_seqlen_q: int | None = None,
        softmax_scale: float | None = None,
        causal: bool = False,
        window_size: Sequence[int] = (-1, -1),
        softcap: float = 0.0,
        num_splits: int = 0,
        pack_gqa: bool | None = None,
        return_softmax_lse: bool = False,
        sinks: Tensor | None = None,
        score_mod: Callable[..., Any] | None = None,
        aux_tensors: list[Tensor] | None = None,
    ) -> Any:
        del max_seqlen_q
        if k is not None or v is not None:
            raise ValueError(
                "flash_attn_with_kvcache(ver=4): FlashAttention-4 cannot append k/v to the cache in "
                "place; write them into k_cache/v_cache first, or use ver=3."
            )
        if isinstance(cache_seqlens, int):
            cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
        out, lse = fa4(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=cu_seqlens_q,
            seqused_k=cache_seqlens,
            page_table=page_table,
            **_fa4_options(
                q.device, return_lse, softmax_scale, causal, window_size, sinks, softcap, num_splits,
                pack_gqa, return_softmax_lse, score_mod, aux_tensors,
            ),
        )  # fmt: skip
        return (out, lse) if return_softmax_lse else out

    return flash_attn_with_kvcache
