"""FlashAttention-3 entry points on PyTorch's fused attention: the ``torch`` provider.

Same arguments and results as the exact reference in
:mod:`kernel_fallback.integrations.flash_attn._reference` (which documents the semantics),
computed without a Python loop over sequences, without reading ``cu_seqlens``,
``seqused_*``, ``cache_seqlens`` or ``page_table`` on the host, and without an
Lq x Lk score matrix on CUDA:

* Packed varlen batches, prefill and anything with softcap, sinks or a requested
  log-sum-exp go to ``torch.nn.attention.flex_attention``, with a block-sparse mask
  built on the device from per-query key intervals (document, causal, window,
  ``attention_chunk``, ``seqused_*``) and cached per batch layout, so the layers of a
  forward pass share it (while a CUDA graph is captured it is rebuilt inside the
  capture instead). On CUDA flex is compiled (Triton); on CPU it runs eagerly
  (``torch.compile`` of flex on CPU cannot return the log-sum-exp), which materializes
  the scores (Hq x total_q x total_k for a packed batch): correct, not fast, and
  O(L^2) memory on CPU only.
* Decode over a KV cache (at most 64 query rows per kv head, no softcap, sinks or lse)
  goes to ``scaled_dot_product_attention`` with the query heads of a kv head folded into
  the query length (no kv head replication) and a small boolean mask of cache lengths.
* On CUDA, decode and short appends over a (paged) cache (q not packed, no
  ``attention_chunk``, bf16/fp16 or fp8) go to the Triton split-K kernel of
  :mod:`~kernel_fallback.integrations.flash_attn._triton_decode`, which follows
  ``page_table`` itself (softcap, sinks, windows, the lse, MLA's wide latent and fp8
  widened in registers included);
  ``KERNEL_FALLBACK_TRITON=0`` opts out.
* Otherwise a paged cache is gathered through ``page_table`` into a (B, capacity) layout first.
* Sinks fold in through the log-sum-exp: ``out *= sigmoid(lse - sink)``.
* FA3's kvcache extras (rotary, ``cache_batch_idx``, ``cache_leftpad``, packed appends)
  first become a plain call (:mod:`~kernel_fallback.integrations.flash_attn._kv_prep`).
* float64 calls, and calls autograd records on a device without flex's backward (CPU),
  go to the exact reference (:mod:`~kernel_fallback.integrations.flash_attn._reference`,
  float64 arithmetic, differentiable, reads lengths on the host). Recorded calls on CUDA
  stay on flex with a block mask that carries the q-block indices its backward needs
  (never on the SDPA or Triton decode paths).
* No keys or no queries at all: zeros (lse ``-inf``, or the sink) without a kernel.
* MLA's ``qv`` and fp8 descales become one plain attention (``[q, qv]`` against
  ``[k, v]``, descales folded into query and output rows) on the paths above, Triton
  excepted: :mod:`~kernel_fallback.integrations.flash_attn._mla_fp8`.

Values are not validated (that would read them on the host): ``cu_seqlens`` must be
well formed, ``cache_seqlens + Sk_new`` within capacity and ``page_table`` entries
within ``num_blocks``, as for FA3; the reference checks them all.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import Tensor

from kernel_fallback._options import stream_capturing
from kernel_fallback.integrations.flash_attn import _mla_fp8, _reference
from kernel_fallback.integrations.flash_attn._checks import (
    WindowSize,
    check_cache_args,
    check_chunk,
    check_common,
    check_cu,
    check_int32_shape,
    check_varlen_layout,
    check_window,
)
from kernel_fallback.integrations.flash_attn._decode import (
    SDPA_DECODE_MAX_ROWS,
    TRITON_DECODE,
    TRITON_DECODE_ENV,
    decode_key,
    one_query_per_sequence,
    remembered,
    sdpa_decode,
    triton_decode,
    triton_decode_enabled,
    triton_decode_fits,
)
from kernel_fallback.integrations.flash_attn._exact import (
    NO_KEYS,
    REFERENCE_AUTOGRAD,
    REFERENCE_FLOAT64,
    attached,
    exact_when_needed,
    wants_grad,
    without_keys,
)
from kernel_fallback.integrations.flash_attn._flex import flex_attend
from kernel_fallback.integrations.flash_attn._kv_prep import (
    KvExtras,
    append_in_place,
    cache_rows,
    packed_rows,
    plain_call,
)
from kernel_fallback.integrations.flash_attn._masks import MaskSpec, block_mask_for, row_intervals

__all__ = [
    "NO_KEYS",
    "REFERENCE_AUTOGRAD",
    "REFERENCE_FLOAT64",
    "TRITON_DECODE",
    "TRITON_DECODE_ENV",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "last_backend",
    "triton_decode_enabled",
]

_last: dict[str, str] = {}


def last_backend(entry: str) -> str | None:
    """Which backend the last call of ``entry`` (an entry point's name) took, or None."""
    return _last.get(entry)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and stream_capturing()


def _spec(window_size: WindowSize, causal: bool, attention_chunk: int | None) -> MaskSpec:
    # Plain ints (every caller in practice) are checked once per value; tensors every call.
    if (
        type(window_size) is tuple
        and all(type(w) is int for w in window_size)
        and (attention_chunk is None or type(attention_chunk) is int)
    ):
        return _spec_of_ints(window_size, bool(causal), attention_chunk)
    left, right = check_window(window_size, causal)
    return MaskSpec(left, right, check_chunk(attention_chunk))


@functools.lru_cache(maxsize=64)
def _spec_of_ints(window_size: tuple[int, ...], causal: bool, attention_chunk: int | None) -> MaskSpec:
    left, right = check_window(window_size, causal)
    return MaskSpec(left, right, check_chunk(attention_chunk))


def _row_seqs(cu_q: Tensor | None, rows: int, device: torch.device) -> Tensor:
    """Each query row's sequence: by ``cu_q`` for ``rows`` packed rows, else (rows, 1) for (B, Sq)."""
    if cu_q is None:
        return torch.arange(rows, device=device).view(rows, 1)
    cu = cu_q.to(device=device, dtype=torch.long)
    return packed_rows(cu, rows)[0]


def _rows_used(cu_seqlens_q: Tensor, seqused_q: Tensor | None, total_q: int, device: torch.device) -> Tensor:
    """Which packed query rows belong to a sequence (within ``seqused_q``), on the device."""
    cu_q = cu_seqlens_q.to(device=device, dtype=torch.long)
    lens_q = cu_q[1:] - cu_q[:-1] if seqused_q is None else seqused_q.to(cu_q)
    return packed_rows(cu_q, total_q, lens_q)[2]


@exact_when_needed(_reference.flash_attn_varlen_func, _last)
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
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_softmax_lse: bool = False,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Variable-length (packed) attention through flex_attention; FA3's arguments.

    q (total_q, Hq, D), k/v (total_k, Hkv, D[v]), ``cu_seqlens_q/k`` int32 (batch + 1,).
    Returns ``out`` (total_q, Hq, Dv) in q's dtype (bfloat16 for fp8), or ``(out, lse)``
    with lse float32 (Hq, total_q). Rows outside every sequence (or past ``seqused_q``) get
    zeros and lse ``-inf``. ``qv`` and fp8 descales as in
    :mod:`~kernel_fallback.integrations.flash_attn._mla_fp8`. See the module docstring for
    what is not validated.
    """
    del max_seqlen_q, max_seqlen_k  # launch hints of the CUDA kernel
    check_varlen_layout(q, k, v)
    check_common(q, k, v, softcap, sinks)
    spec = _spec(window_size, causal, attention_chunk)
    batch = check_cu("cu_seqlens_q", cu_seqlens_q)
    if check_cu("cu_seqlens_k", cu_seqlens_k) != batch:
        raise ValueError(
            f"cu_seqlens_k has {cu_seqlens_k.shape[0]} entries but cu_seqlens_q has "
            f"{cu_seqlens_q.shape[0]}; both must be batch_size + 1"
        )
    for name, used in (("seqused_q", seqused_q), ("seqused_k", seqused_k)):
        if used is not None:
            check_int32_shape(name, used, batch)
    total_q, total_k = q.shape[0], k.shape[0]
    _mla_fp8.check_qv(q, qv, v.shape[-1])
    descales = _mla_fp8.check_descales(q, (q_descale, k_descale, v_descale), batch, k.shape[1])
    scale = softmax_scale if softmax_scale is not None else _mla_fp8.default_scale(q, qv)
    dtype, dev = _mla_fp8.result_dtype(q.dtype), q.device
    if total_q == 0 or total_k == 0:  # flex needs rows and keys; nothing to attend
        zeros, no_lse = without_keys(
            q, v.shape[-1], sinks, _rows_used(cu_seqlens_q, seqused_q, total_q, q.device)
        )
        _last["flash_attn_varlen_func"] = NO_KEYS
        zeros = attached(zeros.to(dtype), q, k, v, sinks, qv)
        return (zeros, no_lse) if return_softmax_lse else zeros
    q, k, v, v_factor = _mla_fp8.fold(q, k, v, qv, descales, lambda: _row_seqs(cu_seqlens_q, total_q, dev))

    def intervals() -> tuple[Tensor, Tensor]:
        cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.long)
        cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.long)
        lens_q = cu_q[1:] - cu_q[:-1] if seqused_q is None else seqused_q.to(cu_q)
        lens_k = cu_k[1:] - cu_k[:-1] if seqused_k is None else seqused_k.to(cu_k)
        doc, pos, valid = packed_rows(cu_q, total_q, lens_q)
        lo, hi = row_intervals(pos, lens_q[doc], lens_k[doc], valid, spec)
        return (lo + cu_k[doc]).unsqueeze(0), (hi + cu_k[doc]).unsqueeze(0)

    mask = block_mask_for(
        (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
        ("varlen", total_q, total_k, spec, q.device),
        intervals,
        total_k,
        reuse=not _capturing(q.device),
        q_blocks=wants_grad(q, k, v, sinks),
    )
    out, lse, backend = flex_attend(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        mask,
        scale,
        softcap,
        sinks,
        return_softmax_lse,
    )
    _last["flash_attn_varlen_func"] = backend
    out = _mla_fp8.scale_out(out[0].transpose(0, 1), v_factor, dtype).contiguous()
    if not return_softmax_lse or lse is None:
        return out
    if sinks is not None:  # the fold gave every row the sink; rows of no sequence keep -inf
        return out, lse[0].masked_fill(~_rows_used(cu_seqlens_q, seqused_q, q.shape[0], q.device), -math.inf)
    return out, lse[0]


@exact_when_needed(_reference.flash_attn_with_kvcache, _last)
def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_softmax_lse: bool = False,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    rotary_seqlens: Tensor | None = None,
    rotary_interleaved: bool = True,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a (paged) KV cache through SDPA (decode) or flex_attention; FA3's arguments.

    Layouts and results as the reference's ``flash_attn_with_kvcache``: q (B, Sq, Hq, D)
    or packed (total_q, Hq, D) with ``cu_seqlens_q``; ``k``/``v`` appended in place at
    ``cache_seqlens``; lse (B, Hq, Sq), or (Hq, total_q) for packed q. Rotary,
    ``cache_batch_idx``, ``cache_leftpad`` and packed appends (``cu_seqlens_k_new``) first
    become a plain call (:mod:`~kernel_fallback.integrations.flash_attn._kv_prep`); a batch
    index is a page table then, so only ``cache_leftpad`` keeps a call off the Triton kernel.
    ``qv`` and fp8 descales as in :mod:`~kernel_fallback.integrations.flash_attn._mla_fp8`
    (output bfloat16 for fp8). One packed query per sequence (``max_seqlen_q=1``, as
    sglang's MLA decode calls it) is served as the (B, 1) decode it is.
    """
    remember = None
    descales = (q_descale, k_descale, v_descale)
    if (
        isinstance(q, Tensor)
        and q.is_cuda
        and k is None
        and v is None
        and cu_seqlens_q is None
        and rotary_cos is None
        and rotary_sin is None
        and cache_batch_idx is None
        and cache_leftpad is None
    ):
        remember = decode_key(
            q, k_cache, v_cache, cache_seqlens, page_table, softmax_scale, causal, window_size,
            attention_chunk, softcap, sinks, return_softmax_lse, qv, descales,
        )  # fmt: skip
        served = remembered(remember)
        if served is not None:  # this layout was checked and served before (_decode)
            _last["flash_attn_with_kvcache"] = TRITON_DECODE
            return served(q, k_cache, v_cache, cache_seqlens, page_table, sinks, qv, descales)
    if one_query_per_sequence(q, k, cu_seqlens_q, max_seqlen_q, cache_seqlens):
        result = flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=cache_seqlens, page_table=page_table,
            softmax_scale=softmax_scale, causal=causal, window_size=window_size,
            attention_chunk=attention_chunk, softcap=softcap, sinks=sinks,
            return_softmax_lse=return_softmax_lse, cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad, qv=qv.unsqueeze(1) if qv is not None else None,
            q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        )  # fmt: skip
        if isinstance(result, tuple):  # lse (B, Hq, 1) -> packed (Hq, total_q)
            return result[0].squeeze(1), result[1][:, :, 0].t().contiguous()
        return result.squeeze(1)
    spec = _spec(window_size, causal, attention_chunk)
    extras = KvExtras(
        rotary_cos,
        rotary_sin,
        rotary_seqlens,
        rotary_interleaved,
        cache_batch_idx,
        cache_leftpad,
        cu_seqlens_k_new,
    )
    plain = plain_call(
        q, k_cache, v_cache, k, v, cache_seqlens, page_table, cu_seqlens_q, max_seqlen_q, causal,
        (spec.left, spec.right), spec.chunk, extras, check_values=False,
    )  # fmt: skip
    q, k, v, cache_seqlens, page_table = plain.q, plain.k, plain.v, plain.cache_seqlens, plain.page_table
    batch, s_new = check_cache_args(q, k_cache, v_cache, k, v, page_table, cu_seqlens_q, cache_seqlens)
    check_common(q, k_cache, v_cache, softcap, sinks, "k_cache and v_cache")
    _mla_fp8.check_qv(q, qv, v_cache.shape[-1])
    descales = _mla_fp8.check_descales(q, descales, batch, k_cache.shape[2])
    dev = k_cache.device
    hkv = k_cache.shape[2]
    page = k_cache.shape[1]
    capacity = page_table.shape[1] * page if page_table is not None else page
    scale = softmax_scale if softmax_scale is not None else _mla_fp8.default_scale(q, qv)
    # Autograd will differentiate this call: flex only (the Triton kernel has no backward,
    # SDPA's NaN rows of empty caches would poison dK/dV), with the q blocks flex's backward reads.
    grad = wants_grad(q, k_cache, v_cache, k, v, sinks, qv)
    use_triton = (
        cu_seqlens_q is None
        and plain.key_start is None  # left padding shifts the key interval: the flex/SDPA paths
        and not grad
        and capacity > 0
        and q.shape[0] * q.shape[1] > 0
        and triton_decode_fits(q, k_cache, v_cache, spec)
    )
    if use_triton:
        # The kernel takes lengths and the page table as they are; only an append needs
        # them as long tensors, so a plain decode launches no cast kernels.
        if k is not None and v is not None and s_new > 0:
            append_in_place(
                k_cache, v_cache, k, v, *cache_rows(cache_seqlens, page_table, batch, capacity, dev)
            )
        _last["flash_attn_with_kvcache"] = TRITON_DECODE
        lens_arg = cache_seqlens if cache_seqlens is not None else capacity
        return triton_decode(
            q, k_cache, v_cache, lens_arg, s_new, page_table, scale, spec, softcap, sinks, return_softmax_lse,
            qv, descales, remember=remember,
        )  # fmt: skip
    cached, blocks = cache_rows(cache_seqlens, page_table, batch, capacity, dev)
    if k is not None and v is not None and s_new > 0:
        append_in_place(k_cache, v_cache, k, v, cached, blocks)
    lens_k = cached + s_new
    # Left padding: keys [first, end) of the cache row, masks over them alone (FA3's offset_k).
    first = plain.key_start.to(device=dev, dtype=torch.long) if plain.key_start is not None else None
    if first is not None:
        lens_k = lens_k - first
    q_rows = q if cu_seqlens_q is not None else q.reshape(-1, *q.shape[2:])
    if capacity == 0 or q_rows.shape[0] == 0:  # flex needs rows and keys; nothing to attend
        used = (
            _rows_used(cu_seqlens_q, None, q_rows.shape[0], q.device)
            if cu_seqlens_q is not None
            else torch.ones(q_rows.shape[0], dtype=torch.bool, device=q.device)
        )
        zeros, no_lse = without_keys(q_rows, v_cache.shape[-1], sinks, used)
        _last["flash_attn_with_kvcache"] = NO_KEYS
        zeros = attached(zeros.to(_mla_fp8.result_dtype(q.dtype)), q, k_cache, v_cache, k, v, sinks, qv)
        if cu_seqlens_q is None:  # explicit sizes: with Sq == 0 a -1 would be ambiguous
            zeros = zeros.reshape(*q.shape[:3], v_cache.shape[-1])
            no_lse = no_lse.reshape(no_lse.shape[0], batch, q.shape[1]).permute(1, 0, 2)
        return (zeros, no_lse) if return_softmax_lse else zeros
    joint = _mla_fp8.joint_view(k_cache, v_cache) if qv is not None else None
    if blocks is not None and joint is not None:  # sglang's MLA buffer: one gather, two views
        kv_log = joint[blocks].flatten(1, 2)
        k_log, v_log = kv_log[..., v_cache.shape[-1] :], kv_log[..., : v_cache.shape[-1]]
    elif blocks is not None:  # the logical cache, (B, capacity, Hkv, D)
        k_log = k_cache[blocks].flatten(1, 2)
        v_log = v_cache[blocks].flatten(1, 2)
    else:
        k_log, v_log = k_cache, v_cache
    dtype, rows, q_dev = _mla_fp8.result_dtype(q.dtype), q.shape[0], q.device
    q, k_log, v_log, v_factor = _mla_fp8.fold(
        q, k_log, v_log, qv, descales, lambda: _row_seqs(cu_seqlens_q, rows, q_dev)
    )
    layout = (cache_seqlens if isinstance(cache_seqlens, Tensor) else None, cu_seqlens_q, plain.key_start)
    params = (
        "kvcache",
        tuple(q.shape),
        capacity,
        s_new,
        spec,
        dev,
        cache_seqlens if isinstance(cache_seqlens, int) else None,
    )
    hq = q.shape[-2]

    if cu_seqlens_q is None:
        sq = q.shape[1]

        def intervals() -> tuple[Tensor, Tensor]:
            pos_q = torch.arange(sq, device=dev).expand(batch, sq)
            len_k = lens_k.unsqueeze(1).expand(batch, sq)
            valid = torch.ones(batch, sq, dtype=torch.bool, device=dev)
            lo, hi = row_intervals(pos_q, torch.full_like(pos_q, sq), len_k, valid, spec)
            return (lo, hi) if first is None else (lo + first.unsqueeze(1), hi + first.unsqueeze(1))

        simple = softcap == 0 and sinks is None and not return_softmax_lse
        if simple and not grad and sq * (hq // hkv) <= SDPA_DECODE_MAX_ROWS:
            lo, hi = intervals()
            _last["flash_attn_with_kvcache"] = "sdpa (decode, gqa folded into rows)"
            return _mla_fp8.scale_out(sdpa_decode(q, k_log, v_log, lo, hi, scale), v_factor, dtype)
        mask = block_mask_for(layout, params, intervals, capacity, reuse=not _capturing(dev), q_blocks=grad)
        out, lse, backend = flex_attend(
            q.transpose(1, 2),
            k_log.transpose(1, 2),
            v_log.transpose(1, 2),
            mask,
            scale,
            softcap,
            sinks,
            return_softmax_lse,
        )
        _last["flash_attn_with_kvcache"] = backend
        out = _mla_fp8.scale_out(out.transpose(1, 2), v_factor, dtype).contiguous()
        return (out, lse) if return_softmax_lse and lse is not None else out

    cu_q = cu_seqlens_q

    def packed_intervals() -> tuple[Tensor, Tensor]:
        cu = cu_q.to(device=dev, dtype=torch.long)
        lens_q = cu[1:] - cu[:-1]
        doc, pos, valid = packed_rows(cu, q.shape[0], lens_q)
        lo, hi = row_intervals(pos, lens_q[doc], lens_k[doc], valid, spec)
        base = doc * capacity if first is None else doc * capacity + first[doc]
        return (lo + base).unsqueeze(0), (hi + base).unsqueeze(0)

    mask = block_mask_for(
        layout, params, packed_intervals, batch * capacity, reuse=not _capturing(dev), q_blocks=grad
    )
    out, lse, backend = flex_attend(
        q.transpose(0, 1).unsqueeze(0),
        k_log.reshape(1, batch * capacity, hkv, -1).transpose(1, 2),
        v_log.reshape(1, batch * capacity, hkv, -1).transpose(1, 2),
        mask,
        scale,
        softcap,
        sinks,
        return_softmax_lse,
    )
    _last["flash_attn_with_kvcache"] = backend
    out = _mla_fp8.scale_out(out[0].transpose(0, 1), v_factor, dtype).contiguous()
    if not return_softmax_lse or lse is None:
        return out
    if sinks is not None:  # the fold gave every row the sink; rows of no sequence keep -inf
        return out, lse[0].masked_fill(~_rows_used(cu_q, None, q.shape[0], q.device), -math.inf)
    return out, lse[0]


flash_attn_varlen_func.kernel_fallback_backend = functools.partial(last_backend, "flash_attn_varlen_func")  # type: ignore[attr-defined]
flash_attn_with_kvcache.kernel_fallback_backend = functools.partial(last_backend, "flash_attn_with_kvcache")  # type: ignore[attr-defined]
# describe() reads it through inspect.unwrap, past the wrapper that routes to the reference.
for _entry in (flash_attn_varlen_func, flash_attn_with_kvcache):
    inspect.unwrap(_entry).kernel_fallback_backend = getattr(_entry, "kernel_fallback_backend")  # noqa: B009
