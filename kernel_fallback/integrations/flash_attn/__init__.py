"""FlashAttention-3 entry points as provider chains, chosen the way sglang chooses.

>>> from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func
>>> flash_attn_varlen_func.chain.active  # doctest: +SKIP
'torch'

The modules of this package, from the top layer down:

- ``_chains``: the two chain declarations (providers, their order, gates, routes, hints)
  and sglang's ``SGLANG_USE_SGL_FA3_KERNEL`` switch. Start reading here.
- ``_builds``: what each published ``sgl_kernel`` build accepts but silently ignores.
- ``_adapters``: loaders that map FA3's arguments onto FlashAttention-2 and -4.
- ``_fast``: the ``torch`` provider; per call it picks one of the paths below.
- ``_exact``: which calls go to the exact reference instead (float64, CPU autograd) and
  the results of calls with nothing to attend.
- ``_kv_prep``: FA3's kvcache extras (rotary, ``cache_batch_idx``, ``cache_leftpad``,
  packed appends) turned into a plain call.
- ``_mla_fp8``: MLA's ``qv`` and fp8 descales folded into one plain attention.
- ``_flex``: flex_attention as the provider calls it (compiled on CUDA, tiles, softcap).
- ``_masks``: FA3's masks as one key interval per query row, and the block-sparse
  flex_attention masks built from them on the device.
- ``_decode``: decode over a cache on CUDA: the Triton path's dispatch, or SDPA.
- ``_triton_plan`` and ``_triton_decode``: the split-K paged decode kernels (MLA and fp8
  included) and their launch plans cached per layout.
- ``_checks``: the argument checks both providers share (shapes, dtypes, options).
- ``_reference``: the exact, looping oracle (the ``reference`` provider) that defines the
  semantics everything above is tested against.
"""

from __future__ import annotations

from kernel_fallback.integrations.flash_attn._chains import (
    FA3_FLAG,
    FA4_TARGET,
    HUB_REPO,
    HUB_REVISION,
    VER_SELECTOR,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "FA3_FLAG",
    "FA4_TARGET",
    "HUB_REPO",
    "HUB_REVISION",
    "VER_SELECTOR",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]
