"""The FlashAttention chains' ``torch`` provider against fused SDPA on the same shapes.

Used by ``gpu_bench.py --only attention`` (run that one). bf16, 32 query heads, 8 kv
heads, head dim 128, causal. Each row times the chain call and PyTorch's
``scaled_dot_product_attention`` side by side (CUDA events, interleaved, median):

* prefill over a packed varlen batch vs SDPA looped over the sequences (lens
  512/1024/77/2048; 2 x 8192; sliding window 4096 and softcap 30 on 2 x 8192, whose
  SDPA baseline is plain causal attention, the nearest thing SDPA computes). The block
  mask is cached per batch layout; ``mask build ms`` is what a new layout costs once.
* decode (1 query per sequence) over a paged cache (page size 1 and 64) vs SDPA over
  a contiguous (B, Hkv, L, D) cache, batch 8 and 64, 4k and 32k cached; one more row
  per shape asks for the lse. On CUDA both take the Triton split-K decode kernel.

Peak memory is the device's peak while the call runs, inputs included (so a paged
decode counts its pool where SDPA counts its contiguous cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

Variant = Callable[[], Any]
HQ, HKV, D = 32, 8, 128


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def peak_total(fn: Variant) -> int:
    """Peak bytes allocated on the device while ``fn`` runs, what was there before included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def _sdpa_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Fused SDPA per sequence of a packed batch: the baseline FA3 replaces."""
    outs, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def prefill(rows: list[dict[str, Any]], cuda_ms: Callable[..., dict[str, float]], repeats: int) -> None:
    from kernel_fallback.integrations.flash_attn import (
        _fast as _torch_fast_attention,
    )
    from kernel_fallback.integrations.flash_attn import (
        _masks as _attention_masks,
    )
    from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func

    cases: list[tuple[str, list[int], dict[str, Any]]] = [
        ("varlen 512/1024/77/2048", [512, 1024, 77, 2048], {}),
        ("varlen 2 x 8192", [8192, 8192], {}),
        ("2 x 8192, window 4096", [8192, 8192], {"window_size": (4096, 0)}),
        ("2 x 8192, softcap 30", [8192, 8192], {"softcap": 30.0}),
    ]
    for name, lens, extra in cases:
        total = sum(lens)
        q, k, v = _bf16(total, HQ, D), _bf16(total, HKV, D), _bf16(total, HKV, D)
        cu = _cu(lens)
        chain = partial(flash_attn_varlen_func, q, k, v, cu, cu, max(lens), max(lens), causal=True, **extra)
        base = partial(_sdpa_loop, q, k, v, lens)
        ms = cuda_ms({"sdpa": base, "torch": chain}, 5, repeats)
        peak = {"sdpa": peak_total(base), "torch": peak_total(chain)}
        builds = []
        for _ in range(5):  # a new batch layout: the mask is built on the device once
            _attention_masks.cache_clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            chain()
            torch.cuda.synchronize()
            builds.append((time.perf_counter() - t0) * 1e3)
        ref = base().float()
        err = float((chain().float() - ref).abs().max()) if not extra else float("nan")
        rows.append(
            {
                "case": f"prefill {name}",
                "sdpa_ms": ms["sdpa"],
                "torch_ms": ms["torch"],
                "ratio": ms["torch"] / ms["sdpa"],
                "peak_sdpa_mib": peak["sdpa"] / 2**20,
                "peak_torch_mib": peak["torch"] / 2**20,
                "first_call_ms": min(builds),
                "max_abs_diff": err,
                "backend": _torch_fast_attention.last_backend("flash_attn_varlen_func"),
            }
        )
        del q, k, v


def decode(rows: list[dict[str, Any]], cuda_ms: Callable[..., dict[str, float]], repeats: int) -> None:
    from kernel_fallback.integrations.flash_attn import _fast as _torch_fast_attention
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    for batch in (8, 64):
        for cached in (4096, 32768):
            q = _bf16(batch, 1, HQ, D)
            k_cont, v_cont = _bf16(batch, HKV, cached, D), _bf16(batch, HKV, cached, D)
            qs = q.transpose(1, 2)
            base = partial(F.scaled_dot_product_attention, qs, k_cont, v_cont, enable_gqa=True)
            seqlens = torch.full((batch,), cached, dtype=torch.int32, device="cuda")
            for page in (1, 64):
                pages = batch * cached // page
                perm = torch.randperm(pages, device="cuda").int().view(batch, -1)
                # the same logical cache, scattered over pages
                kp = torch.empty(pages, page, HKV, D, device="cuda", dtype=torch.bfloat16)
                vp = torch.empty_like(kp)
                kp[perm.view(-1).long()] = k_cont.transpose(1, 2).reshape(pages, page, HKV, D)
                vp[perm.view(-1).long()] = v_cont.transpose(1, 2).reshape(pages, page, HKV, D)
                for lse in (False, True):
                    call = partial(
                        flash_attn_with_kvcache,
                        q,
                        kp,
                        vp,
                        cache_seqlens=seqlens,
                        page_table=perm,
                        causal=True,
                        return_softmax_lse=lse,
                    )
                    ms = cuda_ms({"sdpa": base, "torch": call}, 10, repeats)
                    peak = {"sdpa": peak_total(base), "torch": peak_total(call)}
                    got = call()
                    got = got[0] if lse else got
                    err = float((got.float() - base().transpose(1, 2).float()).abs().max())
                    rows.append(
                        {
                            "case": f"decode B={batch} cached={cached} page={page}"
                            + (" +lse" if lse else ""),
                            "sdpa_ms": ms["sdpa"],
                            "torch_ms": ms["torch"],
                            "ratio": ms["torch"] / ms["sdpa"],
                            "peak_sdpa_mib": peak["sdpa"] / 2**20,
                            "peak_torch_mib": peak["torch"] / 2**20,
                            "first_call_ms": float("nan"),
                            "max_abs_diff": err,
                            "backend": _torch_fast_attention.last_backend("flash_attn_with_kvcache"),
                        }
                    )
                del kp, vp
            del k_cont, v_cont


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | SDPA ms | torch provider ms | ratio | peak SDPA MiB | peak torch MiB | mem ratio "
        "| new-layout call ms | max abs diff | backend |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [
        f"| {r['case']} | {r['sdpa_ms']:.3f} | {r['torch_ms']:.3f} | {r['ratio']:.2f}x | "
        f"{r['peak_sdpa_mib']:.0f} | {r['peak_torch_mib']:.0f} | "
        f"{r['peak_torch_mib'] / r['peak_sdpa_mib']:.2f}x | "
        f"{r['first_call_ms']:.2f} | {r['max_abs_diff']:.3g} | {r['backend']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
