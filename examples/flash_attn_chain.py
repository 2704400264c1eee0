"""The FlashAttention-3 chain choosing a provider and falling back, on this machine.

Run: ``python examples/flash_attn_chain.py`` (no GPU needed). It shows, in order:

1. which provider serves ``flash_attn_varlen_func`` here and why the others were skipped
   (``describe_table``), and the one structured event the fallback recorded;
2. ``out=`` honoured by copying into the caller's buffer when the provider lacks it;
3. a keyword no provider here takes (``score_mod``) refused instead of silently dropped;
4. an explicit request that cannot be honoured raising ``ProviderUnavailableError``;
5. ``SGLANG_USE_SGL_FA3_KERNEL=false`` putting the kernels-hub build first.
"""

from __future__ import annotations

import os

import torch

import kernel_fallback
from kernel_fallback import ProviderUnavailableError, UnsupportedKwargError
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func
from kernel_fallback.testing import capture_fallbacks


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, 8, 64, generator=gen)  # two sequences of 3 and 4 tokens, 8 heads
    k = torch.randn(7, 2, 64, generator=gen)  # 2 KV heads: grouped-query attention
    v = torch.randn(7, 2, 64, generator=gen)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)

    print("== 1. choosing a provider")
    with capture_fallbacks() as events:
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen_q=4, max_seqlen_k=4, causal=True)
    print(flash_attn_varlen_func.describe_table())
    for event in events:
        fields = {key: event.fields[key] for key in ("kernel", "wanted", "chosen", "reason")}
        print(f"event {event.fields['event']}: {fields}")
    print(f"output {tuple(out.shape)}, active provider: {flash_attn_varlen_func.chain.active}")

    print("\n== 2. out= is honoured")
    buf = torch.empty_like(out)
    result = flash_attn_varlen_func(q, k, v, cu, cu, causal=True, out=buf)
    print(f"returned the caller's buffer: {result is buf}; same values: {torch.equal(buf, out)}")

    print("\n== 3. a keyword no provider here takes is refused, not dropped")
    try:
        flash_attn_varlen_func(q, k, v, cu, cu, causal=True, score_mod=lambda score, *_: score * 2)
    except UnsupportedKwargError as exc:
        print(f"UnsupportedKwargError: {str(exc)[:100]}...")

    print("\n== 4. an explicit request that cannot be honoured")
    flash_attn_varlen_func.use("sgl_kernel")
    try:
        flash_attn_varlen_func(q, k, v, cu, cu)
    except ProviderUnavailableError as exc:
        print(f"ProviderUnavailableError: {str(exc)[:120]}...")
    flash_attn_varlen_func.use(None)

    print("\n== 5. SGLANG_USE_SGL_FA3_KERNEL=false tries the hub build first")
    os.environ["SGLANG_USE_SGL_FA3_KERNEL"] = "false"
    kernel_fallback.reload_config()
    print(flash_attn_varlen_func.describe_table())


if __name__ == "__main__":
    main()
