"""The reference provider's MLA (``qv``) and fp8 descales against FA3's formula, in float64.

The oracle here is written from FlashAttention-3's hopper mainloop as issue 14 states it,
not from the reference's code: per query head ``h`` of kv head ``j = h // (Hq // Hkv)``,

    S = (q_h @ k_j^T + qv_h @ v_j^T) * scale * q_descale[b, j] * k_descale[b, j]
    S = softcap * tanh(S / softcap)            (softcap > 0), then the mask
    O = softmax(S) @ v_j * v_descale[b, j],    lse = logsumexp(S)

with the default scale ``(D + Dv) ** -0.5`` when ``qv`` is given, and a bfloat16 output
for fp8 inputs. Shapes follow sglang's DeepSeek calls: rope 64 / latent 512, one kv head,
``k_rope``/``c_kv`` strided views of one (pages, page_size, 1, 576) buffer, packed
queries with ``cu_seqlens_q``; fp8 KV with stride-0 descales of shape (batch, Hkv).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn import _reference as ref

ROPE, LATENT = 64, 512
#: sglang's MLA scale: 1/sqrt(qk_nope + qk_rope = 128 + 64), times a YaRN mscale squared.
MLA_SCALE = 192**-0.5 * 1.2**2


def oracle(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    qv: Tensor | None = None,
    descale: tuple[Tensor, Tensor, Tensor] | None = None,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One sequence in float64, head by head: out (Lq, Hq, Dv), lse (Hq, Lq).

    ``descale`` holds this sequence's (q, k, v) descales, each (Hkv,).
    """
    lq, hq = q.shape[0], q.shape[1]
    lk, hkv = k.shape[0], k.shape[1]
    out = torch.zeros(lq, hq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((hq, lq), -math.inf, dtype=torch.float64)
    pos_q = torch.arange(lq).unsqueeze(1) + (lk - lq)  # bottom-right alignment
    pos_k = torch.arange(lk).unsqueeze(0)
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    left, right = window[0], 0 if causal else window[1]
    if right >= 0:
        allowed &= pos_k <= pos_q + right
    if left >= 0:
        allowed &= pos_k >= pos_q - left
    for h in range(hq):
        j = h * hkv // hq
        kj, vj = k[:, j].double(), v[:, j].double()
        s = q[:, h].double() @ kj.T
        if qv is not None:
            s = s + qv[:, h].double() @ vj.T
        s = s * scale
        if descale is not None:
            s = s * float(descale[0][j]) * float(descale[1][j])
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~allowed, -math.inf)
        for i in range(lq):
            row = s[i][allowed[i]]
            if row.numel() == 0:
                continue
            top = row.max()
            weights = torch.exp(s[i] - top).masked_fill(~allowed[i], 0.0)
            total = weights.sum()
            lse[h, i] = top + torch.log(total)
            o = (weights / total) @ vj
            out[i, h] = o * (float(descale[2][j]) if descale is not None else 1.0)
    return out, lse


def _mla_cache(
    gen: torch.Generator, lens: list[int], page: int
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """k_rope, c_kv (views of one buffer), page_table and each request's logical (rope, latent)."""
    pages = [max(1, -(-n // page)) for n in lens]
    buf = torch.randn(sum(pages) + 1, page, 1, LATENT + ROPE, generator=gen, dtype=torch.float64)
    c_kv, k_rope = buf[..., :LATENT], buf[..., LATENT:]
    order = (torch.randperm(sum(pages), generator=gen) + 1).tolist()
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    ropes, latents, start = [], [], 0
    for b, (n, p) in enumerate(zip(lens, pages, strict=True)):
        table[b, :p] = torch.tensor(order[start : start + p], dtype=torch.int32)
        start += p
        ropes.append(torch.cat([k_rope[i] for i in order[start - p : start]])[:n])
        latents.append(torch.cat([c_kv[i] for i in order[start - p : start]])[:n])
    return k_rope, c_kv, table, ropes, latents


def _cu(lens: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _check(got: Tensor, want: Tensor, what: str, rel: float = 1e-10) -> None:
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf entries differ"
    finite = torch.isfinite(want)
    if finite.any():
        err = (got[finite] - want[finite]).abs().max() / want[finite].abs().max().clamp_min(1e-12)
        assert err <= rel, f"{what}: relative error {float(err):.3g} > {rel}"


MLA_CASES = [
    pytest.param({"page": 1, "sq": [1, 1, 1], "empty": True}, id="decode-page1-empty-cache"),
    pytest.param({"page": 16, "sq": [1, 1, 1], "heads": 128}, id="decode-page16-h128"),
    pytest.param({"page": 64, "sq": [1, 1, 1], "lse": True}, id="decode-page64-lse"),
    pytest.param({"page": 16, "sq": [3, 1, 4], "lse": True}, id="extend-page16-lse"),
    pytest.param({"page": 1, "sq": [2, 2, 1], "softcap": 20.0}, id="extend-softcap"),
    pytest.param({"page": 16, "sq": [2, 1, 3], "causal": False, "lse": True}, id="cascade-prefix"),
    pytest.param({"page": 16, "sq": [3, 1, 2], "window": (4, 0)}, id="window"),
    pytest.param({"page": 64, "sq": [1, 1, 1], "scale": None}, id="default-scale"),
]


@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_cache_call_matches_the_formula(case: dict[str, Any]) -> None:
    """sglang's MLA decode/extend/cascade call over a paged cache, one empty request."""
    gen = torch.Generator().manual_seed(7)
    sq, heads = case["sq"], case.get("heads", 16)
    causal, window = case.get("causal", True), case.get("window", (-1, -1))
    # Cached tokens, the new ones included; the first request's cache is empty when asked
    # (and for the cascade's shared prefix, which the first request does not have).
    lens = [0 if case.get("empty") or not causal else sq[0], 37, 70]
    k_rope, c_kv, table, ropes, latents = _mla_cache(gen, lens, case["page"])
    q_rope = torch.randn(sum(sq), heads, ROPE, generator=gen, dtype=torch.float64)
    q_nope = torch.randn(sum(sq), heads, LATENT, generator=gen, dtype=torch.float64)
    scale = case.get("scale", MLA_SCALE)
    out, lse = ref.flash_attn_with_kvcache(
        q_rope, k_rope, c_kv, qv=q_nope, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
        page_table=table, cu_seqlens_q=_cu(sq), max_seqlen_q=max(sq), softmax_scale=scale,
        causal=causal, window_size=window, softcap=case.get("softcap", 0.0), return_softmax_lse=True,
    )  # fmt: skip
    offsets = _cu(sq).tolist()
    for b in range(len(sq)):
        rows = slice(offsets[b], offsets[b + 1])
        want, want_lse = oracle(
            q_rope[rows], ropes[b], latents[b], qv=q_nope[rows],
            scale=scale if scale is not None else (ROPE + LATENT) ** -0.5,
            causal=causal, window=window, softcap=case.get("softcap", 0.0),
        )  # fmt: skip
        _check(out[rows], want, f"out[{b}]")
        _check(lse[:, rows], want_lse, f"lse[{b}]", rel=1e-6)  # the lse is float32, as FA3's
    if lens[0] == 0:  # an empty cache: zeros and -inf, FA3's empty-row result
        assert torch.equal(out[: offsets[1]], torch.zeros_like(out[: offsets[1]]))
        assert torch.isneginf(lse[:, : offsets[1]]).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mla_varlen_with_qv_matches_the_formula(causal: bool) -> None:
    gen = torch.Generator().manual_seed(8)
    lens_q, lens_k = [3, 0, 6], [5, 2, 6]
    q = torch.randn(sum(lens_q), 8, ROPE, generator=gen, dtype=torch.float64)
    qv = torch.randn(sum(lens_q), 8, LATENT, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens_k), 1, ROPE, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 1, LATENT, generator=gen, dtype=torch.float64)
    out, lse = ref.flash_attn_varlen_func(
        q, k, v, _cu(lens_q), _cu(lens_k), qv=qv, causal=causal, return_softmax_lse=True
    )
    oq, ok = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    for b in range(3):
        rq, rk = slice(oq[b], oq[b + 1]), slice(ok[b], ok[b + 1])
        want, want_lse = oracle(q[rq], k[rk], v[rk], qv=qv[rq], scale=(ROPE + LATENT) ** -0.5, causal=causal)
        _check(out[rq], want, f"out[{b}]")
        _check(lse[:, rq], want_lse, f"lse[{b}]", rel=1e-6)


def _descales(gen: torch.Generator, batch: int, hkv: int, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) descales in [0.25, 8]: one 0-d scale expanded (sglang) or per (b, h) different."""
    if kind == "expanded":
        k_scale = torch.tensor(float(2 ** torch.empty(()).uniform_(-2, 3, generator=gen)))
        return torch.ones(batch, hkv), k_scale.expand(batch, hkv), k_scale.expand(batch, hkv)
    q_d, k_d, v_d = (2 ** torch.empty(batch, hkv).uniform_(-2, 3, generator=gen) for _ in range(3))
    return q_d, k_d.T.contiguous().T, v_d  # k_descale column-major: any strides


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize(
    ("kind", "page", "softcap"),
    [("expanded", 16, 0.0), ("per-head", 1, 0.0), ("per-head", 64, 15.0)],
    ids=["sglang-expanded-page16", "per-head-page1", "per-head-page64-softcap"],
)
def test_fp8_cache_call_matches_the_formula(fp8: str, kind: str, page: int, softcap: float) -> None:
    """fp8 KV decode/extend over a paged cache: descales read per (request, kv head)."""
    gen = torch.Generator().manual_seed(9)
    dtype, hq, hkv, d = getattr(torch, fp8), 8, 2, 32
    lens, sq = [9, 1, 40], [1, 1, 3]
    blocks = sum(-(-n // page) for n in lens) + 1
    k_cache = (torch.randn(blocks, page, hkv, d, generator=gen) * 3).to(dtype)
    v_cache = (torch.randn(blocks, page, hkv, d, generator=gen) * 3).to(dtype)
    table = torch.zeros(3, max(-(-n // page) for n in lens), dtype=torch.int32)
    nxt = 1
    for b, n in enumerate(lens):
        for p in range(-(-n // page)):
            table[b, p], nxt = nxt, nxt + 1
    q = (torch.randn(sum(sq), hq, d, generator=gen) * 3).to(dtype)
    q_d, k_d, v_d = _descales(gen, 3, hkv, kind)
    q_descale = None if kind == "expanded" else q_d  # sglang passes no q_descale
    out, lse = ref.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(lens, dtype=torch.int32), page_table=table,
        cu_seqlens_q=_cu(sq), max_seqlen_q=3, causal=True, softcap=softcap, q_descale=q_descale,
        k_descale=k_d, v_descale=v_d, return_softmax_lse=True,
    )  # fmt: skip
    assert out.dtype == torch.bfloat16
    offsets = _cu(sq).tolist()
    for b in range(3):
        rows = slice(offsets[b], offsets[b + 1])
        idx = torch.arange(lens[b])
        keys = k_cache[table[b, idx // page].long(), idx % page]
        values = v_cache[table[b, idx // page].long(), idx % page]
        want, want_lse = oracle(
            q[rows], keys, values, scale=d**-0.5, causal=True, softcap=softcap,
            descale=(q_d[b] if q_descale is not None else torch.ones(hkv), k_d[b], v_d[b]),
        )  # fmt: skip
        # bfloat16 output: the float64 result rounded once.
        _check(out[rows], want.bfloat16(), f"out[{b}]", rel=2**-7)
        _check(lse[:, rows], want_lse, f"lse[{b}]", rel=1e-6)


def test_mla_prefill_192_128_in_fp8_without_descales() -> None:
    """MLA's MHA prefill: q/k head dim 192, v 128, fp8 without descales, lse for chunked prefix."""
    gen = torch.Generator().manual_seed(10)
    f8 = torch.float8_e4m3fn
    lens = [4, 7]
    q = torch.randn(11, 4, 192, generator=gen).to(f8)
    k = torch.randn(11, 4, 192, generator=gen).to(f8)
    v = torch.randn(11, 4, 128, generator=gen).to(f8)
    out, lse = ref.flash_attn_varlen_func(
        q, k, v, _cu(lens), _cu(lens), softmax_scale=MLA_SCALE, causal=True, return_softmax_lse=True
    )
    assert out.dtype == torch.bfloat16
    for b, (a, z) in enumerate(zip(_cu(lens)[:-1].tolist(), _cu(lens)[1:].tolist(), strict=True)):
        want, want_lse = oracle(q[a:z], k[a:z], v[a:z], scale=MLA_SCALE, causal=True)
        _check(out[a:z], want.bfloat16(), f"out[{b}]", rel=2**-7)
        _check(lse[:, a:z], want_lse, f"lse[{b}]", rel=1e-6)
