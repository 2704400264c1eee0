"""FlashAttention-3 entry points as provider chains, chosen the way sglang chooses.

>>> from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func
>>> flash_attn_varlen_func.chain.active  # doctest: +SKIP
'torch'

The modules of this package, from the top layer down:

- ``_chains``: the two chain declarations (providers, their order, gates, routes, hints)
  and sglang's ``SGLANG_USE_SGL_FA3_KERNEL`` switch. Start reading here.
- ``_builds``: what each published ``sgl_kernel`` build accepts but silently ignores.
- ``_adapters``: loaders that map FA3's arguments onto FlashAttention-2 and -4.
- ``_fast``: the ``torch`` provider, PyTorch's fused attention (flex_attention, SDPA) and
  the Triton decode kernel, chosen per call.
- ``_masks``: FA3's masks as one key interval per query row, and the block-sparse
  flex_attention masks built from them on the device.
- ``_triton_decode``: a split-K paged decode kernel that follows ``page_table`` itself.
- ``_kv_prep``: FA3's kvcache extras (rotary, ``cache_batch_idx``, ``cache_leftpad``,
  packed appends) turned into a plain cache call, for ``_fast`` and ``_reference``.
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
