"""FlashAttention-3 entry points as provider chains, chosen the way sglang chooses.

>>> from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func
>>> flash_attn_varlen_func.chain.active  # doctest: +SKIP
'torch'

Both :func:`flash_attn_varlen_func` and :func:`flash_attn_with_kvcache` take FA3's
arguments (sgl-kernel 0.3.21, plus sglang's ``out`` and ``only_qv``) and are served by
the first provider that can be used, in the order ``SGLANG_USE_SGL_FA3_KERNEL`` picks:

======  ===================================================================
true    ``sgl_kernel``, ``flash_attn``, ``torch`` (the default)
false   ``hub``, ``sgl_kernel``, ``flash_attn``, ``torch``
======  ===================================================================

- ``hub``: the kernels-hub FA3 build sglang loads (``kernels.get_kernel("kernels-
  community/sgl-flash-attn3", revision="v1")``; this downloads it unless cached).
  Gated like ``sgl_kernel``.
- ``sgl_kernel``: ``sgl_kernel.flash_attn``, gated on a CUDA device of compute
  capability 8.x or 9.x and torch built for CUDA 12.3 or newer (sglang's rule).
- ``flash_attn``: the FlashAttention-2 package through an adapter that maps FA3 names
  (``return_softmax_lse`` -> ``return_attn_probs``) and declares what FA2 lacks
  (``page_table``, ``seqused_*``, ``qv``, ``*_descale``, ``sinks``, ...; ``softcap`` and
  ``window_size`` too when the installed FA2 predates them), so calls that need them are
  routed on instead of silently computing something else.
- ``torch``: :mod:`kernel_fallback.integrations._torch_fast_attention`, PyTorch's
  fused attention (flex_attention / SDPA, CPU or GPU) for the arguments its signature
  lists; ``describe_table()`` says which backend its last call took.
- ``reference``: :mod:`kernel_fallback.integrations._torch_attention`, the exact
  (slow, looping) oracle; in no automatic order, name it explicitly to use it.

``KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC`` (and ``..._WITH_KVCACHE``) name a
provider explicitly; one that cannot be used then raises ``ProviderUnavailableError``.

Per call: a keyword that changes the result (``sinks``, ``softcap``, ``page_table``...)
with a non-neutral value goes to the first provider of the order that takes it when the
active one lacks it (a ``dispatch`` event), and raises ``UnsupportedKwargError`` when
none does. ``out=`` is honoured by copying into the caller's buffer when the provider
lacks it; tuning hints (``num_splits``, ``pack_gqa``, ``sm_margin``, ...) are dropped
with a warning. Pass everything after the leading positional arguments by keyword.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final

from torch import Tensor

from kernel_fallback._chain import kernel_chain
from kernel_fallback._gates import BoolFlag, cuda_capability, cuda_version
from kernel_fallback._providers import import_target
from kernel_fallback._signature import kwarg_support

__all__ = ["FA3_FLAG", "HUB_REPO", "HUB_REVISION", "flash_attn_varlen_func", "flash_attn_with_kvcache"]

#: The kernels-hub repository and revision sglang loads its FA3 build from.
HUB_REPO: Final = "kernels-community/sgl-flash-attn3"
HUB_REVISION: Final = "v1"

#: sglang's switch: true prefers sgl-kernel, false the hub build (then sgl-kernel).
FA3_FLAG: Final = BoolFlag(
    "SGLANG_USE_SGL_FA3_KERNEL",
    default=True,
    when_true=("sgl_kernel", "flash_attn", "torch"),
    when_false=("hub", "sgl_kernel", "flash_attn", "torch"),
)
# sglang's FA3 rule: compute capability 8.x or 9.x and CUDA >= 12.3.
_FA3_GATES: Final = (cuda_capability(8, 9), cuda_version(at_least="12.3"))
_HINTS_POLICY: Final = {"num_splits": "warn", "pack_gqa": "warn", "sm_margin": "warn", "out": "copy"}


def _hub_loader(attr: str) -> Callable[[], Callable[..., Any]]:
    """A loader of ``attr`` from the kernels-hub FA3 build (needs the ``kernels`` package)."""

    def load_from_hub() -> Callable[..., Any]:
        kernels = importlib.import_module("kernels")
        try:
            ops = kernels.get_kernel(HUB_REPO, revision=HUB_REVISION)
        except ValueError as exc:  # e.g. no build or lock for this torch: a load failure too
            raise ImportError(f"kernels hub cannot provide {HUB_REPO}@{HUB_REVISION}: {exc}") from exc
        kernel = getattr(ops, attr, None)
        if kernel is None:
            raise ImportError(f"{HUB_REPO}@{HUB_REVISION} has no {attr!r}")
        return kernel  # type: ignore[no-any-return]

    load_from_hub.__qualname__ = f"load_from_hub[{attr}]"
    return load_from_hub


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


def _load_fa2_varlen() -> Callable[..., Any]:
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


def _load_fa2_kvcache() -> Callable[..., Any]:
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


@kernel_chain(
    flags=[FA3_FLAG],
    route=[
        "seqused_q",
        "seqused_k",
        "page_table",
        "qv",
        "q_descale",
        "k_descale",
        "v_descale",
        "window_size",
        "attention_chunk",
        "softcap",
        "only_qv",
        "return_softmax_lse",
        "sinks",
        "score_mod",
        "aux_tensors",
    ],
    drop=["num_splits", "pack_gqa", "sm_margin", "out"],
    on_drop=_HINTS_POLICY,
)
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
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int | None = None,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    only_qv: bool = False,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    sinks: Tensor | None = None,
    score_mod: Callable[..., Any] | None = None,
    aux_tensors: list[Tensor] | None = None,
    out: Tensor | None = None,
) -> Any:
    """Variable-length attention over packed sequences (FlashAttention-3's entry point).

    q (total_q, Hq, D), k and v (total_k, Hkv, D[v]), ``cu_seqlens_q/k`` the int32 row
    offsets of each sequence. Returns ``out`` (total_q, Hq, Dv), or ``(out, lse)`` with
    ``return_softmax_lse=True`` (lse float32, (Hq, total_q)). With ``out=`` the result is
    written into that buffer, which is returned in its place.
    """
    raise NotImplementedError  # never called: the chain calls its providers


flash_attn_varlen_func.provider("hub", loader=_hub_loader("flash_attn_varlen_func"), gate=_FA3_GATES)
flash_attn_varlen_func.provider("sgl_kernel", "sgl_kernel.flash_attn:flash_attn_varlen_func", gate=_FA3_GATES)
flash_attn_varlen_func.provider("flash_attn", loader=_load_fa2_varlen)
flash_attn_varlen_func.provider(
    "torch", "kernel_fallback.integrations._torch_fast_attention:flash_attn_varlen_func"
)
flash_attn_varlen_func.provider(
    "reference", "kernel_fallback.integrations._torch_attention:flash_attn_varlen_func"
)


@kernel_chain(
    flags=[FA3_FLAG],
    route=[
        "qv",
        "rotary_cos",
        "rotary_sin",
        "rotary_seqlens",
        "cache_batch_idx",
        "cache_leftpad",
        "page_table",
        "cu_seqlens_q",
        "cu_seqlens_k_new",
        "q_descale",
        "k_descale",
        "v_descale",
        "window_size",
        "attention_chunk",
        "softcap",
        "only_qv",
        "return_softmax_lse",
        "sinks",
    ],
    drop=["rotary_interleaved", "scheduler_metadata", "num_splits", "pack_gqa", "sm_margin", "out"],
    on_drop={**_HINTS_POLICY, "rotary_interleaved": "warn", "scheduler_metadata": "warn"},
)
def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    qv: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    max_seqlen_q: int | None = None,
    rotary_seqlens: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int | None = None,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: Tensor | None = None,
    num_splits: int = 0,
    pack_gqa: bool | None = None,
    only_qv: bool = False,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    sinks: Tensor | None = None,
    out: Tensor | None = None,
) -> Any:
    """Attention of new queries over a (paged) KV cache (FlashAttention-3's entry point).

    q (B, Sq, Hq, D) or packed (total_q, Hq, D) with ``cu_seqlens_q``; ``k_cache`` and
    ``v_cache`` (B, S_cache, Hkv, D[v]) or paged (num_blocks, page_size, Hkv, D[v]) with
    ``page_table``. ``k``/``v`` are appended in place at ``cache_seqlens``. Returns
    ``out`` shaped like q with head dim Dv, or ``(out, lse)`` with ``return_softmax_lse``.
    The ``torch`` provider implements ``attention_chunk``; None and 0 both mean off. None
    is the neutral value (sglang's default), so an explicit 0 on a provider that lacks the
    keyword (FA2) is routed to one that has it.
    """
    raise NotImplementedError  # never called: the chain calls its providers


flash_attn_with_kvcache.provider("hub", loader=_hub_loader("flash_attn_with_kvcache"), gate=_FA3_GATES)
flash_attn_with_kvcache.provider(
    "sgl_kernel", "sgl_kernel.flash_attn:flash_attn_with_kvcache", gate=_FA3_GATES
)
flash_attn_with_kvcache.provider("flash_attn", loader=_load_fa2_kvcache)
flash_attn_with_kvcache.provider(
    "torch", "kernel_fallback.integrations._torch_fast_attention:flash_attn_with_kvcache"
)
flash_attn_with_kvcache.provider(
    "reference", "kernel_fallback.integrations._torch_attention:flash_attn_with_kvcache"
)
