"""The FlashAttention-3 chains: providers, their order, gates, routes and hints.

Both :func:`flash_attn_varlen_func` and :func:`flash_attn_with_kvcache` take FA3's
arguments as sgl-kernel defines them (0.3.21 and 0.4.10, with ``out`` and ``only_qv``),
by keyword or in FA3's positional order (sglang 0.5.23 passes 28 by position), and are
served by the first provider that can be used, in the order ``SGLANG_USE_SGL_FA3_KERNEL``
picks:

======  ===================================================================
true    ``sgl_kernel``, ``flash_attn``, ``torch`` (the default)
false   ``hub``, ``sgl_kernel``, ``flash_attn``, ``torch``
======  ===================================================================

- ``hub``: the kernels-hub FA3 build sglang loads (``kernels.get_kernel("kernels-
  community/sgl-flash-attn3", revision="v1")``; this downloads it unless cached).
  Gated like ``sgl_kernel``.
- ``sgl_kernel``: ``sgl_kernel.flash_attn``, gated on a CUDA device of compute
  capability 8.x or 9.x and torch built for CUDA 12.3 or newer (sglang's rule). What
  the installed build accepts but ignores (0.3.21 and 0.4.10: varlen ``page_table``,
  ``score_mod``, ``aux_tensors``) is read from its version
  (:mod:`~kernel_fallback.integrations.flash_attn._builds`) and treated as lacking.
- ``flash_attn``: the FlashAttention-2 package through an adapter that maps FA3 names
  (``return_softmax_lse`` -> ``return_attn_probs``) and declares what FA2 lacks
  (``page_table``, ``seqused_*``, ``qv``, ``*_descale``, ``sinks``, ...; ``softcap`` and
  ``window_size`` too when the installed FA2 predates them), so calls that need them are
  routed on instead of silently computing something else.
- ``torch``: :mod:`kernel_fallback.integrations.flash_attn._fast`, PyTorch's
  fused attention (flex_attention / SDPA, CPU or GPU) for the arguments its signature
  lists; ``describe_table()`` says which backend its last call took.
- ``reference``: :mod:`kernel_fallback.integrations.flash_attn._reference`, the exact
  (slow, looping) oracle; in no automatic order, name it explicitly to use it.
- ``fa4``: FlashAttention-4 (``sgl_kernel._fa4_interface``, else the flash-attn-4
  package's ``flash_attn.cute``; split-KV capped to 1 on SM 9.x), never in the automatic
  order: only ``ver=4`` sends a call there.

``KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC`` (and ``..._WITH_KVCACHE``) name a
provider explicitly; one that cannot be used then raises ``ProviderUnavailableError``.

Per call: a keyword that changes the result (``sinks``, ``softcap``, ``page_table``...)
with a non-neutral value goes to the first provider of the order that takes it when the
active one lacks it (a ``dispatch`` event), and raises ``UnsupportedKwargError`` when
none does. Neutral values follow FA3: ``attention_chunk`` 0 or None,
``cu_seqlens_k_new`` without ``k``/``v``, ``rotary_interleaved`` without ``rotary_cos``,
``only_qv=False``. ``out=`` is honoured by copying into the caller's buffer when the
provider lacks it. Tuning hints (``num_splits``, ``pack_gqa``, ``sm_margin``,
``scheduler_metadata``) go to providers that take them and are removed silently for the
others: they never change the result. ``ver`` is the chain's: 3 (FA3) is this chain, 4
is the ``fa4`` provider or a ``ProviderUnavailableError``; anything else raises
``PolicyConfigError``; no provider receives ``ver``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from torch import Tensor

from kernel_fallback._chain import ChainFunction, kernel_chain
from kernel_fallback._gates import BoolFlag, Gate, cuda_capability, cuda_version
from kernel_fallback.integrations.flash_attn._adapters import (
    FA4_TARGET,
    load_fa2_kvcache,
    load_fa2_varlen,
    load_fa4_kvcache,
    load_fa4_varlen,
)
from kernel_fallback.integrations.flash_attn._builds import ignored_by_installed

__all__ = [
    "FA3_FLAG",
    "FA4_TARGET",
    "HUB_REPO",
    "HUB_REVISION",
    "VER_SELECTOR",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]

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
# FA4 (CuTe DSL) targets Hopper and Blackwell.
_FA4_GATES: Final = (cuda_capability(9, 10),)


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


_VARLEN_ROUTE: Final = (
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
)
_KVCACHE_ROUTE: Final = (
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
    "rotary_interleaved",
    "only_qv",
    "return_softmax_lse",
    "sinks",
    "score_mod",
    "aux_tensors",
)
#: ``ver``: 3 is this chain; 4 sends the call to the FlashAttention-4 provider (or refuses).
VER_SELECTOR: Final[Mapping[object, str | None]] = {3: None, 4: "fa4"}


def _declare_providers(
    chain: ChainFunction[..., Any], entry: str, gates: Sequence[Gate], fa4_gates: Sequence[Gate]
) -> None:
    """The providers both entry points share, in declaration order."""
    chain.provider("hub", loader=_hub_loader(entry), gate=gates)
    chain.provider(
        "sgl_kernel",
        f"sgl_kernel.flash_attn:{entry}",
        gate=gates,
        unsupported=ignored_by_installed(entry),
    )
    chain.provider(
        "flash_attn", loader=load_fa2_varlen if entry == "flash_attn_varlen_func" else load_fa2_kvcache
    )
    chain.provider("torch", f"kernel_fallback.integrations.flash_attn._fast:{entry}")
    chain.provider("reference", f"kernel_fallback.integrations.flash_attn._reference:{entry}")
    chain.provider(
        "fa4",
        loader=load_fa4_varlen if entry == "flash_attn_varlen_func" else load_fa4_kvcache,
        gate=fa4_gates,
    )


def _varlen_chain(
    *,
    name: str = "flash_attn_varlen_func",
    gates: Sequence[Gate] = _FA3_GATES,
    fa4_gates: Sequence[Gate] = _FA4_GATES,
) -> ChainFunction[..., Any]:
    """Declare the varlen chain; ``gates``/``fa4_gates`` replace the capability gates.

    The module's chain uses sglang's gates. Tests build a second chain with ``gates=()``
    to run stub ``sgl_kernel`` builds on a CPU machine: the gates themselves are checked
    elsewhere, and the module's own chain stays gated.
    """

    @kernel_chain(
        name=name,
        flags=[FA3_FLAG],
        route=_VARLEN_ROUTE,
        also_neutral={"attention_chunk": [None]},
        hints=["num_splits", "pack_gqa", "sm_margin"],
        selectors={"ver": VER_SELECTOR},
        drop=["out"],
        on_drop={"out": "copy"},
    )
    def flash_attn_varlen_func(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
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
        attention_chunk: int | None = 0,
        softcap: float = 0.0,
        num_splits: int = 1,
        pack_gqa: bool | None = None,
        *,
        only_qv: bool = False,
        sm_margin: int = 0,
        return_softmax_lse: bool = False,
        sinks: Tensor | None = None,
        score_mod: Callable[..., Any] | None = None,
        aux_tensors: list[Tensor] | None = None,
        ver: int = 3,
        out: Tensor | None = None,
    ) -> Any:
        """Variable-length attention over packed sequences (FlashAttention-3's entry point).

        q (total_q, Hq, D), k and v (total_k, Hkv, D[v]), ``cu_seqlens_q/k`` the int32 row
        offsets of each sequence. Returns ``out`` (total_q, Hq, Dv), or ``(out, lse)`` with
        ``return_softmax_lse=True`` (lse float32, (Hq, total_q)). With ``out=`` the result is
        written into that buffer, which is returned in its place.

        Positional order: sgl-kernel's, through ``pack_gqa`` (0.3.21 and 0.4.10 agree up to
        there; 0.4.10 then inserts ``only_qv``, so the rest is keyword-only). Upstream
        hopper's order differs from position 9 (it has no ``page_table``).
        """
        raise NotImplementedError  # never called: the chain calls its providers

    _declare_providers(flash_attn_varlen_func, "flash_attn_varlen_func", gates, fa4_gates)
    return flash_attn_varlen_func


def _kvcache_chain(
    *,
    name: str = "flash_attn_with_kvcache",
    gates: Sequence[Gate] = _FA3_GATES,
    fa4_gates: Sequence[Gate] = _FA4_GATES,
) -> ChainFunction[..., Any]:
    """Declare the kvcache chain (see :func:`_varlen_chain` for the gates)."""

    @kernel_chain(
        name=name,
        flags=[FA3_FLAG],
        route=_KVCACHE_ROUTE,
        also_neutral={"attention_chunk": [0]},
        meaningful_with={"cu_seqlens_k_new": ["k", "v"], "rotary_interleaved": ["rotary_cos"]},
        hints=["scheduler_metadata", "num_splits", "pack_gqa", "sm_margin"],
        selectors={"ver": VER_SELECTOR},
        drop=["out"],
        on_drop={"out": "copy"},
    )
    def flash_attn_with_kvcache(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        k: Tensor | None = None,
        v: Tensor | None = None,
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
        *,
        only_qv: bool = False,
        sm_margin: int = 0,
        return_softmax_lse: bool = False,
        sinks: Tensor | None = None,
        score_mod: Callable[..., Any] | None = None,
        aux_tensors: list[Tensor] | None = None,
        ver: int = 3,
        out: Tensor | None = None,
    ) -> Any:
        """Attention of new queries over a (paged) KV cache (FlashAttention-3's entry point).

        q (B, Sq, Hq, D) or packed (total_q, Hq, D) with ``cu_seqlens_q``; ``k_cache`` and
        ``v_cache`` (B, S_cache, Hkv, D[v]) or paged (num_blocks, page_size, Hkv, D[v]) with
        ``page_table``. ``k``/``v`` are appended in place at ``cache_seqlens``. Returns
        ``out`` shaped like q with head dim Dv, or ``(out, lse)`` with ``return_softmax_lse``.

        The first 28 parameters (through ``pack_gqa``) take FA3's positional order, which
        upstream hopper, sgl-kernel 0.3.21 and 0.4.10 share; the rest are keyword-only.
        ``cu_seqlens_k_new`` means something only with ``k``/``v`` and ``rotary_interleaved``
        only with ``rotary_cos``; ``attention_chunk`` 0 and None both mean off.
        """
        raise NotImplementedError  # never called: the chain calls its providers

    _declare_providers(flash_attn_with_kvcache, "flash_attn_with_kvcache", gates, fa4_gates)
    return flash_attn_with_kvcache


flash_attn_varlen_func: Final = _varlen_chain()
flash_attn_with_kvcache: Final = _kvcache_chain()
