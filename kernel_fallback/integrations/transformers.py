"""HuggingFace transformers on the FlashAttention-3 chains: :func:`register_attention`.

>>> from kernel_fallback.integrations.transformers import register_attention
>>> name = register_attention()  # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)  # doctest: +SKIP

transformers' own ``attn_implementation="flash_attention_3"`` raises ``ImportError``
wherever the ``flash_attn_interface`` package is missing or built for another torch. The
implementation registered here serves the same calls through this project's chains
(:mod:`kernel_fallback.integrations.flash_attn`), so a real FA3 kernel is used where one
loads and PyTorch's fused attention (or FlashAttention-2) serves them elsewhere, with
every fallback reported as for any chain. It registers through transformers' public API
only (``AttentionInterface.register`` and ``AttentionMaskInterface.register``) and
follows transformers' own flash-attention path:

- a padded batch (the 2-D padding mask of ``masking_utils.flash_attention_mask``) is
  unpadded into packed sequences for ``flash_attn_varlen_func``, and the result padded
  back (rows of padding tokens are zeros, as with FlashAttention);
- padding-free batches (``cu_seq_lens_q/k`` and ``max_length_q/k`` from a flattening
  collator, or packed ``position_ids`` of a batch of one) go to ``flash_attn_varlen_func``;
- an unpadded batch, prefill or decode over the model's KV cache, goes to
  ``flash_attn_with_kvcache`` with the cache as ``k_cache``/``v_cache`` (nothing appended:
  transformers has already updated its cache);
- the model's ``scaling``, ``is_causal``, ``sliding_window`` (as FA's inclusive
  ``window_size``), ``softcap`` and ``s_aux`` attention sinks are passed on; grouped-query
  heads go as they are.

Attention dropout (training with ``attention_dropout > 0``) is refused: FlashAttention-3
has none, and dropping it would train something else. ``output_attentions`` returns no
weights, as with transformers' flash implementations.

transformers is an optional dependency (``pip install kernel_fallback[transformers]``);
it is imported by :func:`register_attention`, not by importing this module.
:func:`served_calls` counts the attention calls this implementation sent to each chain.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor

from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

__all__ = [
    "DEFAULT_NAME",
    "SUPPORTED_TRANSFORMERS",
    "attention_forward",
    "register_attention",
    "reset_served_calls",
    "served_calls",
]

#: The ``attn_implementation`` name :func:`register_attention` registers by default.
DEFAULT_NAME: Final = "kernel_fallback_fa3"
#: The transformers versions this integration is written and tested for.
SUPPORTED_TRANSFORMERS: Final = ">=5.0,<6"

_VARLEN: Final = "flash_attn_varlen_func"
_KVCACHE: Final = "flash_attn_with_kvcache"
_served: dict[str, int] = {_VARLEN: 0, _KVCACHE: 0}


def served_calls() -> dict[str, int]:
    """How many attention calls went to each chain (by entry point) since the last reset."""
    return dict(_served)


def reset_served_calls() -> None:
    """Set the counts of :func:`served_calls` back to zero."""
    for entry in _served:
        _served[entry] = 0


def _unpad(mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Indices of the kept tokens of a (B, L) padding mask, int32 cu_seqlens, longest length."""
    lens = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = F.pad(torch.cumsum(lens, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lens.max())  # FA3 takes the maximum as a host int


def _packed_from_positions(position_ids: Tensor | None, batch: int, q_len: int) -> Tensor | None:
    """cu_seqlens of sequences packed into one row, told by restarting ``position_ids``; else None.

    transformers' rule: a batch of one whose positions are not one increasing run.
    """
    if position_ids is None or batch != 1 or q_len == 1:
        return None
    positions = position_ids.reshape(-1)
    start = positions.min()
    if bool((positions == torch.arange(positions.shape[0], device=positions.device) + start).all()):
        return None
    starts = torch.nonzero(positions == start).flatten().to(torch.int32)
    end = torch.tensor([positions.shape[0]], dtype=torch.int32, device=positions.device)
    return torch.cat([starts, end])


def _padding_free(kwargs: dict[str, Any], batch: int, q_len: int) -> tuple[Tensor, Tensor, int, int] | None:
    """cu_seqlens and longest lengths of a padding-free batch, or None for an ordinary one.

    A flattening collator passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers'
    ``FlashAttentionKwargs``); otherwise packing is told by ``position_ids``.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    cu = _packed_from_positions(kwargs.get("position_ids"), batch, q_len)
    if cu is None:
        return None
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


def _varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, **kw: Any
) -> Tensor:
    _served[_VARLEN] += 1
    out = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, **kw
    )
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def _padded(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, **kw: Any) -> Tensor:
    """A batch with padding, as transformers' flash path does it (padding on the left)."""
    batch, q_len, hq, d = q.shape
    if k.shape[1] > mask.shape[1]:  # a static cache: only the mask's length is filled
        k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
    idx_k, cu_k, max_k = _unpad(mask)
    k_un = k.reshape(-1, *k.shape[2:])[idx_k]
    v_un = v.reshape(-1, *v.shape[2:])[idx_k]
    if q_len == k.shape[1]:
        idx_q, cu_q, max_q = idx_k, cu_k, max_k
    elif q_len == 1:  # decode: one query per sequence, whose last key is never padding
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        idx_q, max_q = cu_q[:-1].long(), 1
    else:
        idx_q, cu_q, max_q = _unpad(mask[:, -q_len:])
    out = _varlen(q.reshape(-1, hq, d)[idx_q], k_un, v_un, cu_q, cu_k, max_q, max_k, **kw)
    full = out.new_zeros(batch * q_len, *out.shape[1:])
    full[idx_q] = out
    return full.view(batch, q_len, *out.shape[1:])


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention call, served by the FA3 chains; returns ``(out, None)``.

    ``query`` (B, Hq, Lq, D), ``key``/``value`` (B, Hkv, Lk, D[v]) as transformers' models
    pass them; ``out`` is (B, Lq, Hq, Dv). ``attention_mask`` is the 2-D padding mask the
    registered mask function builds, or None.
    """
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} cannot be served: FlashAttention-3 has no dropout, and "
            f"dropping it would train something else; set the config's attention_dropout to 0.0 "
            f"or use attn_implementation='sdpa' for training with attention dropout"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be the 2-D (batch, kv_length) padding mask of the registered mask "
            f"function, got shape {tuple(attention_mask.shape)}; a custom 4-D mask needs "
            f"attn_implementation='sdpa' or 'eager'"
        )
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):
        # As transformers' flash path: autocast computes attention in its half dtype.
        half = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(half), k.to(half), v.to(half)
    kw: dict[str, Any] = {"softmax_scale": scaling, "causal": causal}
    if sliding_window is not None and k.shape[1] > sliding_window:
        # transformers' windows count the query token; FA's bounds are inclusive.
        kw["window_size"] = (sliding_window - 1, sliding_window - 1)
    if softcap:
        kw["softcap"] = float(softcap)
    if s_aux is not None:
        kw["sinks"] = s_aux
    batch, q_len = q.shape[0], q.shape[1]
    if attention_mask is not None:
        return _padded(q, k, v, attention_mask.to(torch.bool), **kw), None
    packed = _padding_free(kwargs, batch, q_len)
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        q, k, v = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
        out = _varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
        return out.view(batch, q_len, *out.shape[1:]), None
    _served[_KVCACHE] += 1
    out = flash_attn_with_kvcache(q, k, v, **kw)
    return (out[0] if isinstance(out, tuple) else out), None


def _mask_function(flash_attention_mask: Callable[..., Tensor | None]) -> Callable[..., Tensor | None]:
    """transformers' flash mask, plus the filled length of a cache longer than what it holds."""

    def kernel_fallback_fa3_mask(
        batch_size: int,
        q_length: int,
        kv_length: int,
        q_offset: int | Tensor = 0,
        kv_offset: int = 0,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor | None:
        mask = flash_attention_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            **kwargs,
        )
        if mask is not None:
            return mask
        filled = int(q_offset) + q_length  # a static cache's offset is a 0-d tensor
        if filled >= kv_length:
            return None
        # A static cache with no padding: generate() drops the all-ones mask (transformers
        # keeps it only for names containing "flash"), yet the keys are max_cache_len long.
        # A mask of the filled length makes the attention call use only those keys.
        return torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device"))

    return kernel_fallback_fa3_mask


def _transformers_api() -> tuple[Any, Any, Callable[..., Tensor | None], str]:
    """transformers' registries and its flash mask function, or an ImportError saying what is needed."""
    need = (
        f"kernel_fallback.integrations.transformers needs transformers{SUPPORTED_TRANSFORMERS} "
        f"(pip install 'kernel_fallback[transformers]')"
    )
    try:
        transformers = importlib.import_module("transformers")
        masking_utils = importlib.import_module("transformers.masking_utils")
    except ImportError as exc:
        raise ImportError(f"{need}: transformers cannot be imported ({exc})") from exc
    version = str(getattr(transformers, "__version__", "unknown"))
    attention = getattr(transformers, "AttentionInterface", None)
    masks = getattr(transformers, "AttentionMaskInterface", None)
    flash_mask = getattr(masking_utils, "flash_attention_mask", None)
    missing = [
        name
        for name, found in (
            ("transformers.AttentionInterface.register", getattr(attention, "register", None)),
            ("transformers.AttentionMaskInterface.register", getattr(masks, "register", None)),
            ("transformers.masking_utils.flash_attention_mask", flash_mask),
        )
        if not callable(found)
    ]
    if missing or flash_mask is None:
        raise ImportError(f"{need}; transformers {version} lacks {', '.join(missing)}")
    return attention, masks, flash_mask, version


_registered: dict[str, Callable[..., Tensor | None]] = {}


def register_attention(name: str = DEFAULT_NAME) -> str:
    """Register the FA3 chains as transformers attention implementation ``name``; return ``name``.

    Use it as ``from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)``. Registers the attention function and its mask
    function (transformers' ``flash_attention_mask``: a 2-D padding mask, or none) through
    ``AttentionInterface.register`` and ``AttentionMaskInterface.register``. Calling it again
    with the same name does nothing more. ``name`` must not contain ``"flash"`` (transformers
    takes such names for its own FlashAttention packages and tries to import them), nor be
    a hub kernel name (``org/repo``), nor one transformers or another library registered
    (even after this function registered it: nothing registered elsewhere is replaced).

    Raises ImportError naming the supported transformers versions when transformers or its
    registration API is missing, and ValueError for a name it cannot take.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if "flash" in name or "/" in name or ":" in name or name.startswith("paged|") or name == "eager":
        raise ValueError(
            f"name {name!r} cannot be registered: transformers treats names containing 'flash' as "
            f"its own FlashAttention packages, names with '/' or ':' as hub kernels, and 'eager' "
            f"and 'paged|' names itself; choose another, e.g. {DEFAULT_NAME!r}"
        )
    attention, masks, flash_mask, version = _transformers_api()
    ours = _registered.get(name)
    held = (attention().get(name), masks().get(name))
    if ours is not None and held[0] is attention_forward and held[1] is ours:
        return name
    if held != (None, None):
        raise ValueError(
            f"attention implementation {name!r} is already registered in transformers {version} by "
            f"something else; choose another name (default {DEFAULT_NAME!r})"
        )
    mask = _mask_function(flash_mask)
    attention.register(name, attention_forward)
    masks.register(name, mask)
    _registered[name] = mask
    return name
