"""Host side of the Triton decode kernel: tiles, split counts, and launch plans per layout.

A plan holds what follows from a call's layout (shapes, strides, dtypes, 16-byte pointer
alignment, flags): grids, workspace and output shapes, constexpr arguments in the
kernels' parameter order and, after the first launch, the compiled kernels, which later
calls of the layout launch directly (``CompiledKernel.run``) instead of through
``JITFunction.run`` (argument binding, specialization, cache key). See
:mod:`kernel_fallback.integrations.flash_attn._triton_decode` for the kernels.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from kernel_fallback._gates import device_capability

__all__ = [
    "FP8_DTYPES",
    "MAX_ROWS",
    "DecodeConfig",
    "arguments",
    "num_splits",
    "pick_config",
    "plan_for",
    "prepare",
]

#: Most query rows per kv head (q heads per kv head x query length); larger groups are tiled.
MAX_ROWS = 1024
#: The fp8 formats the kernel widens in registers (those this torch has).
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)
_MAX_SPLITS = 128  # the merge kernel's one compiled variant covers every split count
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, as here
_LOG2E = 1.4426950408889634


class DecodeConfig(NamedTuple):
    """Tile sizes and launch options of the split kernel."""

    block_m: int  #: query rows per program (>= 16, a power of two)
    block_n: int  #: keys per step
    num_warps: int
    num_stages: int
    per_sm: int = 2  #: programs per SM the key splits aim for


def pick_config(
    rows: int,
    dv: int,
    fp8: bool = False,
    hopper: bool = False,
    *,
    page: int = 1,
    d: int = 128,
    busy: bool = False,
) -> DecodeConfig:
    """The split kernel's tiles for ``rows`` packed query rows per kv head and value dim ``dv``.

    ``page`` is the cache's page size (1 for a contiguous cache), ``d`` the q/k head dim,
    ``busy`` whether batch x kv heads alone give every SM a program (before any split).
    Measured on an H100 (CUDA-graph replay, 32/8 heads, d=128, sweeps of tiles and splits
    beside the previous choice, in ``docs/performance.md``):

    * Wide values (MLA's 512 latent) on Hopper with >= 64 rows: 64-row tiles (wgmma; the
      latent read by a quarter as many tiles), 64 keys a step, 8 warps, 2 stages: 1.9x-2.6x
      faster at 128 heads than the 16 keys chosen from register counts before. Elsewhere
      16-row tiles (the 144 KiB of shared memory is more than sm_86/89 have).
    * Hopper, at most 16 rows and head dims <= 128, pages > 1, ``busy``: 128 keys a step
      (fewer, larger page-table gathers): 1.18x faster than 64 at B=64 x 4k with pages of
      16/64, slower with pages of 1, which keep 64. Not when the batch is small: its
      192 KiB of stages leave one program per SM, and B=8 x 32k (64 programs before the
      split) ran 1.2x slower with it (0.446 vs 0.370 ms).
    * Hopper fp8 at those shapes: 128 keys, 4 warps and twice the splits (half the bytes a
      key: more keys in flight per program and more programs), 1.3x-1.45x faster.
    * Otherwise 64 keys, 4 warps (8 for fp8: widening costs registers), 3 stages.
    """
    if dv > 256:
        return DecodeConfig(64, 64, 8, 2) if rows >= 64 and hopper else DecodeConfig(16, 32, 4, 2)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if hopper and block_m == 16 and max(d, dv) <= 128:
        if fp8 and page > 1:
            return DecodeConfig(16, 128, 4, 3, per_sm=4)
        if page > 1 and busy:
            return DecodeConfig(16, 128, 4, 3)
    return DecodeConfig(block_m, 64, 8 if fp8 else 4, 3)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 8  # the interpreter: a few splits, so the tests exercise the merge


def num_splits(
    batch: int,
    hkv: int,
    capacity: int,
    device: torch.device,
    block_n: int = 64,
    row_tiles: int = 1,
    per_sm: int = 2,
) -> int:
    """Splits over the keys, from shapes only: about ``per_sm`` programs per SM, >= 1 key block each."""
    blocks = max(1, math.ceil(capacity / block_n))
    want = math.ceil(per_sm * _sm_count(device) / max(1, batch * hkv * row_tiles))
    return max(1, min(blocks, want, _MAX_SPLITS))


def _check_descale(name: str, t: Tensor, batch: int, hkv: int, device: torch.device) -> None:
    if tuple(t.shape) != (batch, hkv) or t.dtype != torch.float32 or t.device != device:
        raise ValueError(
            f"{name} must be a float32 tensor of shape ({batch}, {hkv}) (batch, kv heads) on "
            f"{device}, got dtype {t.dtype}, shape {tuple(t.shape)} on {t.device}"
        )


def _compute_dtype(q: Tensor) -> tl.dtype:
    """The dot operand dtype: q's 16-bit dtype, or fp16 for fp8 q (exact for e4m3 and e5m2).

    An fp8 cache under 16-bit q widens to q's dtype, also exactly.
    """
    return tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16


class _Plan:
    """Everything about a call that follows from its layout, worked out once per layout.

    Holds the grids, the workspace and output shapes, the constexpr arguments (in the
    kernels' parameter order) and, after the first launch, the compiled kernels, which
    later calls launch directly (``CompiledKernel.run``), skipping ``JITFunction.run``'s
    binding, specialization and cache-key work.
    """

    __slots__ = (
        "merge", "merge_consts", "merge_grid", "merge_tail", "out_dtype", "out_shape", "out_strides", "split",
        "split_consts", "split_grid", "split_tail", "stages", "strides", "warps", "ws_numel",
    )  # fmt: skip

    def __init__(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor | None, key: tuple[Any, ...]
    ) -> None:
        (_, _, _, qv_l, _, qd_l, kd_l, vd_l, lens_l, softcap_on, sinks_l, want_lse, cfg) = key[1:]
        batch, sq, hq, d = q.shape
        hkv, dv = k_cache.shape[2], v_cache.shape[3]
        g = hq // hkv
        page_size = k_cache.shape[1]
        capacity = page_table.shape[1] * page_size if page_table is not None else page_size
        if cfg is None:
            hopper = device_capability(q.device)[0] == 9
            page = page_size if page_table is not None else 1
            busy = batch * hkv >= _sm_count(q.device)
            fp8 = k_cache.dtype in FP8_DTYPES
            cfg = pick_config(g * sq, dv, fp8, hopper, page=page, d=d, busy=busy)
        m_tiles = math.ceil(g * sq / cfg.block_m)
        block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
        splits = num_splits(batch, hkv, capacity, q.device, cfg.block_n, m_tiles, cfg.per_sm)
        keys_per_split = math.ceil(math.ceil(capacity / cfg.block_n) / splits) * cfg.block_n
        rows_pad = m_tiles * cfg.block_m
        lse_offset = batch * hkv * splits * rows_pad * block_dv
        self.ws_numel = lse_offset + batch * hkv * splits * rows_pad
        self.out_shape = (batch, sq, hq, dv)
        self.out_strides = (sq * hq * dv, hq * dv, dv)  # out is allocated contiguous
        self.out_dtype = torch.bfloat16 if q.dtype in FP8_DTYPES else q.dtype
        self.split_grid = (hkv * m_tiles, batch, splits)
        self.merge_grid = (batch, hq, sq)
        self.warps, self.stages = cfg.num_warps, cfg.num_stages
        qv_s = qv_l[1] if qv_l is not None else q.stride()
        self.strides = (
            *q.stride()[:3], *qv_s[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
            page_table.stride(0) if page_table is not None else 0,
            *(qd_l[1] if qd_l is not None else (0, 0)), *(kd_l[1] if kd_l is not None else (0, 0)),
        )  # fmt: skip
        self.split_tail = (splits, keys_per_split, lse_offset)  # runtime, after the window
        self.split_consts = (
            sq, g, hkv, m_tiles, keys_per_split if _INTERPRET else 0, d, dv, cfg.block_m, cfg.block_n,
            block_d, block_dv, page_size if page_table is not None else 1, page_table is not None,
            softcap_on, qv_l is not None, qd_l is not None, kd_l is not None, lens_l is None,
            _compute_dtype(q), _INTERPRET,
        )  # fmt: skip
        self.merge_tail = (splits, lse_offset)
        self.merge_consts = (
            sq, g, hkv, _MAX_SPLITS, rows_pad, dv, block_dv, sinks_l is not None, vd_l is not None,
            want_lse, _INTERPRET,
        )  # fmt: skip
        self.split: Any = None
        self.merge: Any = None


_PLANS: dict[tuple[Any, ...], _Plan] = {}
_MAX_PLANS = 256  # layouts seen; a server sees a handful per model, tests many


def _layout(t: Tensor | None) -> tuple[Any, ...] | None:
    """What a compiled kernel and a plan depend on: shape, strides, dtype, 16-byte alignment."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def _launch(kernel: Any, grid: tuple[int, int, int], args: tuple[Any, ...]) -> None:
    """Launch a compiled kernel on the current stream, as ``JITFunction.run`` would."""
    stream = torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())
    enter = knobs.runtime.launch_enter_hook
    meta = kernel.launch_metadata(grid, stream, *args) if enter is not None else None
    kernel.run(
        grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, meta,
        enter, knobs.runtime.launch_exit_hook, *args,
    )  # fmt: skip


def plan_for(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lens_k: Tensor | int,
    page_table: Tensor | None,
    softcap: float,
    sinks: Tensor | None,
    want_lse: bool,
    *,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    config: DecodeConfig | None = None,
) -> _Plan:
    """The plan of this call's layout, checked and built on its first call.

    ``q`` and ``qv`` must have a unit stride in the head dim (:func:`prepare` makes them so).
    """
    lens_t = lens_k if isinstance(lens_k, Tensor) else None
    key = (
        q.device, _layout(q), _layout(k_cache), _layout(v_cache), _layout(qv), _layout(page_table),
        _layout(q_descale), _layout(k_descale), _layout(v_descale), _layout(lens_t),
        softcap > 0, _layout(sinks), want_lse, config,
    )  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        batch, hkv = q.shape[0], k_cache.shape[2]
        if qv is not None and (tuple(qv.shape) != (*q.shape[:3], v_cache.shape[3]) or qv.dtype != q.dtype):
            raise ValueError(
                f"qv must have shape {(*q.shape[:3], v_cache.shape[3])} and q's dtype {q.dtype}, "
                f"got {tuple(qv.shape)} and {qv.dtype}"
            )
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("k_cache and v_cache must have a unit stride in the head dim")
        for name, t in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
            if t is not None:
                _check_descale(name, t, batch, hkv, q.device)
        if lens_t is not None and (
            lens_t.dtype not in (torch.int32, torch.int64) or lens_t.device != q.device
        ):
            raise ValueError(
                f"lens_k must be an int32/int64 tensor on {q.device}, got {lens_t.dtype} on {lens_t.device}"
            )
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(q, k_cache, v_cache, page_table, key)
    return plan


def arguments(
    plan: _Plan,
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
    lens_add: int,
    qv: Tensor | None,
    descales: tuple[Tensor | None, Tensor | None, Tensor | None],
) -> tuple[tuple[Any, ...], tuple[Any, ...], Tensor, Tensor | None]:
    """The two kernels' arguments for a call of ``plan``'s layout, and its fresh outputs (out, lse)."""
    dev = q.device
    ws = torch.empty(plan.ws_numel, dtype=torch.float32, device=dev)
    out = torch.empty(plan.out_shape, dtype=plan.out_dtype, device=dev)
    lse = torch.empty(plan.merge_grid, dtype=torch.float32, device=dev) if want_lse else ws
    lens_t = lens_k if isinstance(lens_k, Tensor) else None
    q_descale, k_descale, v_descale = descales
    split_args = (
        q, qv if qv is not None else q, k_cache, v_cache,
        page_table if page_table is not None else ws, lens_t if lens_t is not None else ws,
        q_descale if q_descale is not None else ws, k_descale if k_descale is not None else ws, ws,
        *plan.strides, 0 if lens_t is not None else int(lens_k), lens_add, scale * _LOG2E, float(softcap),
        window[0], window[1], *plan.split_tail, *plan.split_consts,
    )  # fmt: skip
    sink_arg = ws
    if sinks is not None:
        sink_arg = (
            sinks if sinks.dtype == torch.float32 and sinks.device == dev else sinks.to(dev, torch.float32)
        )
    vd = v_descale if v_descale is not None else ws
    merge_args = (
        ws, sink_arg, vd, out, lse, *plan.out_strides,
        vd.stride(0) if v_descale is not None else 0, vd.stride(1) if v_descale is not None else 0,
        *plan.merge_tail, *plan.merge_consts,
    )  # fmt: skip
    return split_args, merge_args, out, (lse if want_lse else None)


def prepare(
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
) -> tuple[_Plan, tuple[Any, ...], tuple[Any, ...], Tensor, Tensor | None]:
    """:func:`plan_for` and :func:`arguments` of one call: (plan, split args, merge args, out, lse)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if qv is not None and qv.stride(-1) != 1:
        qv = qv.contiguous()
    plan = plan_for(
        q, k_cache, v_cache, lens_k, page_table, softcap, sinks, want_lse,
        qv=qv, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, config=config,
    )  # fmt: skip
    descales = (q_descale, k_descale, v_descale)
    split_args, merge_args, out, lse = arguments(
        plan, q, k_cache, v_cache, lens_k, page_table, scale, window, softcap, sinks, want_lse, lens_add, qv,
        descales,
    )  # fmt: skip
    return plan, split_args, merge_args, out, lse
