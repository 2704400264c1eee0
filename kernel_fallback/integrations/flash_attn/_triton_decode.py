"""Split-K ("flash-decoding") attention over a paged or contiguous KV cache, in Triton.

The decode path of the ``torch`` provider on CUDA. Two launches, no host read of any
value (``cache_seqlens``, ``page_table``, descales), so a call can be captured in a CUDA
graph:

1. grid (kv_head x row_tile, batch, split): each program takes a tile of up to
   ``BLOCK_M`` query rows of its kv group (GQA/MQA packed into the rows of one tile:
   row r is query head ``h * G + r // Sq`` at position ``r % Sq``), walks its share of the
   cache keys, following ``page_table`` key by key (any page size; a contiguous cache is
   one page per sequence), and writes an fp32 partial output and log-sum-exp. The row
   tiles of one kv head are neighbours in the launch order, so a cache block read by
   one is in L2 for the others (MLA: 128 heads read the one latent cache).
2. grid (batch, q_head, q_row): merges the splits by their log-sum-exp, folds in the
   sink logit and ``v_descale``, writes ``out`` and, when asked, the float32 lse in
   FA3's (B, Hq, Sq) layout.

MLA (FA3's ``qv``): scores are ``q . k + qv . v`` -- the rope part against ``k_cache``,
the latent part against ``v_cache`` -- and one loaded ``v`` tile serves both the scores
and the output, so the latent is read once per row tile.

fp8 (e4m3/e5m2) q/k/v are loaded as bytes and widened to fp16 in registers (exact for
both formats); ``q_descale * k_descale`` scale the scores before softcap and masking,
``v_descale`` the output, as FA3 does. The output of fp8 input is bf16.

Splits depend only on shapes (capacity, programs per split, SM count). Masks:
bottom-right causal / sliding window (left and right bounds), cache lengths; softcap;
sinks. ``attention_chunk`` and packed q are not here (the caller keeps them on
flex_attention). fp32 accumulation.

Host side: the first call of a layout (shapes, strides, dtypes, pointer alignment) builds
a plan and compiles through ``JITFunction.run``; later calls launch the compiled kernels
directly. Split counts, lengths and windows are runtime arguments, so new batch sizes and
cache capacities compile nothing.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU
tensors; the tests use that.
"""

# Triton kernels take untyped pointer and scalar arguments (their annotations drive
# Triton's specialization), so mypy's strict def checks are off for this module only.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl
from torch import Tensor

from kernel_fallback.integrations.flash_attn._triton_plan import (
    _INTERPRET,
    FP8_DTYPES,
    MAX_ROWS,
    DecodeConfig,
    _launch,
    _Plan,
    arguments,
    num_splits,
    pick_config,
    prepare,
)

__all__ = [
    "FP8_DTYPES",
    "MAX_ROWS",
    "DecodeConfig",
    "decode_attention",
    "num_splits",
    "arguments",
    "launch",
    "pick_config",
    "prepare",
]

_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # kernels read constexpr globals only


@triton.jit
def _attend_block(
    n0, stop, q, qv, m_i, l_i, acc, lo, hi, b, h, qk_scale_log2, softcap,
    k_ptr, v_ptr, pt_ptr, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_ptb,
    offs_d, offs_dv,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_QV: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < stop
    if PAGED:
        page = tl.load(pt_ptr + b.to(tl.int64) * s_ptb + keys // PAGE_SIZE, mask=key_ok, other=0)
        page = page.to(tl.int64)
        slot = keys % PAGE_SIZE
    else:
        page = tl.zeros([BLOCK_N], dtype=tl.int64) + b
        slot = keys
    k = tl.load(
        k_ptr + page[:, None] * s_kp + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
        mask=key_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    ).to(CDT)  # fp8 widens here, in registers; 16-bit is unchanged
    vt = tl.load(
        v_ptr + page[:, None] * s_vp + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
        mask=key_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    ).to(CDT)
    s = tl.dot(q, tl.trans(k))  # fp32
    if HAS_QV:  # MLA: the latent scores reuse the value tile the output needs anyway
        s += tl.dot(qv, tl.trans(vt))
    if SOFTCAP:
        # softcap * tanh(x / softcap) of the scaled (descaled) score; tanh written with exp
        x = s * (qk_scale_log2 * _LN2) / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) / _LN2
    else:
        s = s * qk_scale_log2
    allowed = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None]) & key_ok[None, :]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(CDT), vt)
    m_i = m_new
    return m_i, l_i, acc


# Values that change from call to call, or with the batch size and cache capacity, are
# runtime arguments not specialized on: one compiled kernel per model layout serves them
# all (a constexpr split count would compile again for every new capacity).
_VARYING = [
    "lens_scalar",
    "lens_add",
    "window_left",
    "window_right",
    "splits",
    "keys_per_split",
    "lse_offset",
]


@triton.jit(do_not_specialize=_VARYING)
def _decode_split_kernel(
    q_ptr, qv_ptr, k_ptr, v_ptr, pt_ptr, lens_ptr, qd_ptr, kd_ptr, ws_ptr,
    s_qb, s_qs, s_qh, s_qvb, s_qvs, s_qvh,
    s_kp, s_ks, s_kh,
    s_vp, s_vs, s_vh,
    s_ptb, s_qdb, s_qdh, s_kdb, s_kdh,
    lens_scalar, lens_add, sm_scale_log2, softcap,
    window_left, window_right, splits, keys_per_split, lse_offset,
    SQ: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, M_TILES: tl.constexpr,
    KPS_STATIC: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_QV: tl.constexpr,
    Q_DESCALE: tl.constexpr, K_DESCALE: tl.constexpr, LENS_SCALAR: tl.constexpr,
    CDT: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    # ws_ptr: the fp32 partial outputs (B, Hkv, splits, rows, BLOCK_DV), then from
    # lse_offset the partial lse (B, Hkv, splits, rows): one allocation per call.
    tile = tl.program_id(0)
    h = tile // M_TILES
    b = tl.program_id(1)
    split = tl.program_id(2)
    rows = (tile % M_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * SQ
    q_head = h * G + rows // SQ
    q_pos = rows % SQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + b.to(tl.int64) * s_qb + q_pos[:, None] * s_qs + q_head[:, None] * s_qh + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    ).to(CDT)
    if HAS_QV:
        qv_rows = qv_ptr + b.to(tl.int64) * s_qvb + q_pos * s_qvs + q_head * s_qvh
        qv = tl.load(
            qv_rows[:, None] + offs_dv[None, :],
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        ).to(CDT)
    else:
        qv = q
    qk_scale_log2 = sm_scale_log2
    if Q_DESCALE:
        qk_scale_log2 = qk_scale_log2 * tl.load(qd_ptr + b * s_qdb + h * s_qdh).to(tl.float32)
    if K_DESCALE:
        qk_scale_log2 = qk_scale_log2 * tl.load(kd_ptr + b * s_kdb + h * s_kdh).to(tl.float32)
    if LENS_SCALAR:  # noqa: SIM108 (constexpr branch)
        len_k = lens_scalar + lens_add
    else:
        len_k = tl.load(lens_ptr + b).to(tl.int32) + lens_add
    # Bottom-right alignment: row at position p sees keys up to p + len_k - SQ (+ right).
    diag = q_pos + len_k - SQ
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    hi = tl.zeros([BLOCK_M], dtype=tl.int32) + len_k
    if window_right >= 0:
        hi = tl.minimum(hi, diag + window_right + 1)
    if window_left >= 0:
        lo = tl.maximum(lo, diag - window_left)
    lo = tl.where(row_ok, lo, len_k)
    hi = tl.where(row_ok, hi, 0)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, tl.max(hi, axis=0))
    first = tl.maximum(start, tl.min(lo, axis=0))
    first = start + ((first - start) // BLOCK_N) * BLOCK_N  # first >= start, so // is exact
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if INTERPRET:
        # numpy >= 2.4 cannot turn the interpreter's loop bounds into ints: a static trip
        # count (KPS_STATIC = keys_per_split, given only to the interpreter) with a guard
        # computes the same blocks.
        for i in range(0, KPS_STATIC // BLOCK_N):
            n0 = start + i * BLOCK_N
            if (n0 >= first) & (n0 < stop):
                m_i, l_i, acc = _attend_block(
                    n0, stop, q, qv, m_i, l_i, acc, lo, hi, b, h, qk_scale_log2, softcap,
                    k_ptr, v_ptr, pt_ptr, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_ptb, offs_d, offs_dv,
                    D, DV, BLOCK_N, PAGE_SIZE, PAGED, SOFTCAP, HAS_QV, CDT,
                )  # fmt: skip
    else:
        for n0 in range(first, stop, BLOCK_N):
            m_i, l_i, acc = _attend_block(
                n0, stop, q, qv, m_i, l_i, acc, lo, hi, b, h, qk_scale_log2, softcap,
                k_ptr, v_ptr, pt_ptr, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_ptb, offs_d, offs_dv,
                D, DV, BLOCK_N, PAGE_SIZE, PAGED, SOFTCAP, HAS_QV, CDT,
            )  # fmt: skip
    # Partial lse in log2 units; -inf where this split saw no key of the row.
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    base = ((b * HKV + h) * splits + split).to(tl.int64) * (M_TILES * BLOCK_M)
    tl.store(ws_ptr + lse_offset + base + rows, lse)
    tl.store(ws_ptr + (base + rows[:, None]) * BLOCK_DV + offs_dv[None, :], out)


@triton.jit(do_not_specialize=["splits", "lse_offset"])
def _decode_merge_kernel(
    ws_ptr, sinks_ptr, vd_ptr, out_ptr, lse_ptr,
    s_ob, s_os, s_oh, s_vdb, s_vdh, splits, lse_offset,
    SQ: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr,
    MAX_SPLITS: tl.constexpr, ROWS_PAD: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr, V_DESCALE: tl.constexpr, WRITE_LSE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    qh = tl.program_id(1)
    pos = tl.program_id(2)
    h = qh // G
    row = (qh % G) * SQ + pos
    each = tl.arange(0, MAX_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    base0 = (b * HKV + h).to(tl.int64) * splits * ROWS_PAD + row
    lse_part_ptr = ws_ptr + lse_offset
    lse_s = tl.load(lse_part_ptr + base0 + each * ROWS_PAD, mask=each < splits, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_s - m_safe), axis=0)
    out = tl.zeros([BLOCK_DV], dtype=tl.float32)
    if INTERPRET:  # static trip count and a guard, as in the split kernel
        for s in range(MAX_SPLITS):
            if s < splits:
                w = tl.exp2(tl.load(lse_part_ptr + base0 + s * ROWS_PAD) - m_safe)
                out += w * tl.load(ws_ptr + (base0 + s * ROWS_PAD) * BLOCK_DV + offs_dv)
    else:
        for s in range(splits):  # one row of DV at a time: a (splits x 512) tile would not fit
            w = tl.exp2(tl.load(lse_part_ptr + base0 + s * ROWS_PAD) - m_safe)
            out += w * tl.load(ws_ptr + (base0 + s * ROWS_PAD) * BLOCK_DV + offs_dv)
    out = out / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, (m_safe + tl.log2(total)) * _LN2, float("-inf"))  # natural log
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + qh).to(tl.float32)
        both = tl.maximum(lse, sink)
        with_sink = both + tl.log(tl.exp(lse - both) + tl.exp(sink - both))
        out = out * tl.exp(lse - with_sink)
        lse = with_sink
    if V_DESCALE:
        out = out * tl.load(vd_ptr + b * s_vdb + h * s_vdh).to(tl.float32)
    dst = out_ptr + b.to(tl.int64) * s_ob + pos * s_os + qh * s_oh + offs_dv
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)
    if WRITE_LSE:
        tl.store(lse_ptr + (b * G * HKV + qh) * SQ + pos, lse)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lens_k: Tensor | int,
    page_table: Tensor | None,
    scale: float,
    window: tuple[int, int],
    softcap: float,
    sinks: Tensor | None,
    want_lse: bool,
    *,
    lens_add: int = 0,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    config: DecodeConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attention of q (B, Sq, Hq, D) over a cache; returns out (B, Sq, Hq, Dv) and lse or None.

    ``k_cache``/``v_cache`` are (num_pages, page_size, Hkv, D[v]) with ``page_table``
    (B, pages_per_seq) int32, or (B, capacity, Hkv, D[v]) without; any strides but a unit
    one in the head dim (MLA's rope and latent caches may be views of one buffer).
    Each sequence sees ``lens_k + lens_add`` keys: ``lens_k`` a (B,) int32/int64 tensor
    on the device (never read on the host) or one int for all. ``window`` is (left,
    right), -1 for unbounded, causal already folded in as right = 0. ``qv`` (B, Sq, Hq,
    Dv) adds ``qv . v`` to the scores (FA3's MLA). ``q/k/v_descale`` (B, Hkv) float32, any
    strides, dequantise fp8 inputs. lse is float32 (B, Hq, Sq). ``config`` overrides
    :func:`pick_config` (benchmarks). Out is q's dtype, or bf16 for fp8 q. The caller
    checks the other shapes and that ``Hq // Hkv * Sq <= MAX_ROWS``.

    The first call of a layout checks it and builds a plan; later calls of that layout
    allocate the workspace and outputs and launch the two compiled kernels directly.
    """
    plan, split_args, merge_args, out, lse = prepare(
        q, k_cache, v_cache, lens_k, page_table, scale, window, softcap, sinks, want_lse,
        lens_add=lens_add, qv=qv, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        config=config,
    )  # fmt: skip
    launch(plan, split_args, merge_args)
    return out, lse


def launch(plan: _Plan, split_args: tuple[Any, ...], merge_args: tuple[Any, ...]) -> None:
    """Launch the two kernels of ``plan`` with arguments from :func:`prepare` or :func:`arguments`.

    The first call of a plan compiles through ``JITFunction.run`` and keeps the compiled
    kernels on the plan; later calls launch them directly.
    """
    if plan.split is None:  # first call of this layout (or the interpreter): through the JIT
        names = _decode_split_kernel.arg_names
        n_run = len(split_args) - len(plan.split_consts)
        kern = _decode_split_kernel[plan.split_grid](
            *split_args[:n_run], **dict(zip(names[n_run:], plan.split_consts, strict=True)),
            num_warps=plan.warps, num_stages=plan.stages,
        )  # fmt: skip
        names = _decode_merge_kernel.arg_names
        n_run = len(merge_args) - len(plan.merge_consts)
        merge = _decode_merge_kernel[plan.merge_grid](
            *merge_args[:n_run], **dict(zip(names[n_run:], plan.merge_consts, strict=True))
        )
        if not _INTERPRET and split_args[0].device.type == "cuda":  # split_args[0] is q
            plan.split, plan.merge = kern, merge
    else:
        _launch(plan.split, plan.split_grid, split_args)
        _launch(plan.merge, plan.merge_grid, merge_args)
