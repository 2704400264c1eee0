"""The Triton split-K decode kernel against the exact ``reference`` provider.

On a CUDA machine the cases run in-process on the GPU. Without one they run in a
subprocess under Triton's interpreter (``TRITON_INTERPRET=1`` must be set before triton
is imported, so it cannot be set in this process, whose triton may already be loaded):
``python tests/test_triton_decode.py`` runs every case on CPU tensors and prints one
JSON line of results, which the parametrized tests then check. Skipped without triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from triton_sm90 import compile_for_sm90, has_ptxas

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    """One random decode call."""

    id: str
    batch: int
    sq: int
    hq: int
    hkv: int
    page: int | None  # None: contiguous (B, capacity, Hkv, D) cache
    pages_per_seq: int
    lens: tuple[int, ...]
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    lse: bool = True
    dtype: str = "float16"
    d: int = 64
    append: int = 0


CASES = [
    Case("page1-b1-mha", 1, 1, 2, 2, 1, 70, (70,)),
    Case("page16-b3-gqa4", 3, 1, 8, 2, 16, 6, (96, 0, 33)),
    Case("page64-b3-gqa4-lse-off", 3, 1, 8, 2, 64, 3, (150, 64, 1), lse=False),
    Case("page256-b1-gqa4", 1, 1, 4, 1, 256, 2, (300,)),
    Case("contiguous-b3", 3, 1, 4, 1, None, 200, (200, 17, 0)),
    Case("causal-sq4-page16", 3, 4, 8, 2, 16, 5, (70, 2, 0)),
    Case("noncausal-sq3-page16", 3, 3, 4, 2, 16, 5, (70, 2, 0), causal=False),
    Case("softcap-page16", 3, 1, 8, 2, 16, 5, (77, 40, 5), softcap=5.0),
    Case("sinks-page1", 3, 2, 8, 2, 1, 80, (80, 0, 9), sinks=True),
    Case("window-left32-page16", 1, 3, 4, 1, 16, 8, (120,), window=(32, 0)),
    Case("window-both-sq4", 3, 4, 4, 2, None, 100, (100, 50, 3), causal=False, window=(20, 2)),
    Case("bf16-page64-append", 3, 2, 8, 2, 64, 3, (100, 0, 30), dtype="bfloat16", append=2),
    Case("d96-dv96-page16", 3, 1, 4, 2, 16, 4, (60, 10, 33), d=96),
]


def run_case(case: Case, device: str) -> dict[str, Any]:
    """Run ``case`` through the kernel and the reference; return max errors and tolerances."""
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn._checks import check_window
    from kernel_fallback.integrations.flash_attn._triton_decode import decode_attention

    gen = torch.Generator().manual_seed(hash(case.id) % (1 << 31))
    dtype = getattr(torch, case.dtype)
    b, hkv, d = case.batch, case.hkv, case.d
    q = torch.randn(b, case.sq, case.hq, d, generator=gen).to(device=device, dtype=dtype)
    if case.page is None:
        shape = (b, case.pages_per_seq, hkv, d)
        page_table = None
    else:
        n_pages = b * case.pages_per_seq + 3
        shape = (n_pages, case.page, hkv, d)
        perm = torch.randperm(n_pages, generator=gen)[: b * case.pages_per_seq]
        page_table = perm.view(b, case.pages_per_seq).to(device=device, dtype=torch.int32)
    k_cache = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    cached = torch.tensor(case.lens, dtype=torch.int32, device=device) - case.append
    cached = cached.clamp_min(0)
    k_new = v_new = None
    if case.append:
        k_new = torch.randn(b, case.append, hkv, d, generator=gen).to(device=device, dtype=dtype)
        v_new = torch.randn(b, case.append, hkv, d, generator=gen).to(device=device, dtype=dtype)
    sinks = torch.randn(case.hq, generator=gen).to(device) if case.sinks else None
    scale = d**-0.5
    kwargs: dict[str, Any] = {
        "causal": case.causal,
        "window_size": case.window,
        "softcap": case.softcap,
        "sinks": sinks,
        "return_softmax_lse": True,
        "softmax_scale": scale,
        "page_table": page_table,
    }
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want_out, want_lse = ref.flash_attn_with_kvcache(
        q, k_ref, v_ref, k_new, v_new, cache_seqlens=cached, **kwargs
    )
    if case.append:  # the kernel reads the cache; the provider appends before calling it
        k_cache, v_cache = k_ref, v_ref
    left, right = check_window(case.window, case.causal)
    out, lse = decode_attention(
        q,
        k_cache,
        v_cache,
        cached + case.append,
        page_table,
        scale,
        (left, right),
        case.softcap,
        sinks,
        case.lse,
    )
    result: dict[str, Any] = {
        "out_err": (out.float() - want_out.float()).abs().max().item(),
        "out_tol": 2e-2 if dtype == torch.bfloat16 else 3e-3,
        "out_shape": list(out.shape),
        "want_shape": list(want_out.shape),
    }
    if case.lse:
        assert lse is not None
        same_inf = torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        finite = torch.isfinite(want_lse)
        err = (lse[finite] - want_lse[finite]).abs().max().item() if finite.any() else 0.0
        result |= {"lse_err": err if same_inf else float("inf"), "lse_tol": 2e-3}
    else:
        result["lse_none"] = lse is None
    return result


@dataclass(frozen=True)
class XCase:
    """A decode call with FA3's MLA ``qv`` and/or fp8 inputs with descales.

    ``shared``: k_cache and v_cache are the rope (first d) and latent (last dv) columns
    of one (pages, page, 1, d + dv) buffer, as sglang's MLA cache is. ``descale``: none,
    per-bh (a different scale per batch and kv head), or expanded (a 0-d scale
    ``.expand(B, Hkv)``, stride 0).
    """

    id: str
    batch: int
    hq: int
    hkv: int
    page: int
    pages_per_seq: int
    lens: tuple[int, ...]
    d: int
    dv: int
    qv: bool = False
    shared: bool = False
    fp8: str | None = None
    descale: str = "none"
    softcap: float = 0.0
    sq: int = 1
    scale: float | None = None


# fmt: off
XCASES = [
    XCase("mla-small-h32-page16", 2, 32, 1, 16, 4, (50, 9), d=32, dv=128, qv=True, shared=True),
    XCase("mla-small-h16-page1-sq2", 2, 16, 1, 1, 40, (40, 3), d=32, dv=64, qv=True, sq=2),
    XCase("mla-real-h16-64-512-page64", 2, 16, 1, 64, 3, (130, 7), d=64, dv=512, qv=True, shared=True,
          scale=192**-0.5),
    XCase("fp8-e4m3-per-bh-page16", 2, 8, 2, 16, 5, (70, 33), d=64, dv=64, fp8="float8_e4m3fn",
          descale="per-bh"),
    XCase("fp8-e4m3-expanded-softcap-page64", 2, 8, 2, 64, 2, (100, 64), d=64, dv=64,
          fp8="float8_e4m3fn", descale="expanded", softcap=4.0),
    XCase("fp8-e5m2-per-bh-page1", 1, 4, 1, 1, 50, (50,), d=32, dv=32, fp8="float8_e5m2", descale="per-bh"),
]
# fmt: on


def _gather(cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """(pages, page, Hkv, D) through the table -> (B, capacity, Hkv, D)."""
    return cache[page_table.long()].flatten(1, 2)


def fa3_decode_oracle(
    q: torch.Tensor,
    qv: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    softcap: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA3's causal decode math in ``dtype``, from its documented formula (not the provider).

    S = (q k^T + qv v^T) * scale * q_descale * k_descale, softcap as tanh, bottom-right
    causal mask and cache lengths; O = softmax(S) v * v_descale; lse = logsumexp(S).
    q (B, Sq, Hq, D), k/v gathered (B, cap, Hkv, D[v]). Returns out (B, Sq, Hq, Dv), lse (B, Hq, Sq).
    """
    sq, hq = q.shape[1], q.shape[2]
    hkv, cap = k.shape[2], k.shape[1]
    g = hq // hkv
    kh = k.to(dtype).repeat_interleave(g, dim=2)
    vh = v.to(dtype).repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), kh)
    if qv is not None:
        s = s + torch.einsum("bqhd,bkhd->bhqk", qv.to(dtype), vh)
    s = s * scale
    if descales is not None:
        qk = (descales[0] * descales[1]).to(dtype).repeat_interleave(g, dim=1)  # (B, Hq)
        s = s * qk[:, :, None, None]
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    keys = torch.arange(cap)
    pos = torch.arange(sq)
    last = pos[None, :] + lens[:, None].long() - sq  # (B, Sq): the last key each row sees
    allowed = (keys[None, None, :] <= last[:, :, None]) & (keys[None, None, :] < lens[:, None, None].long())
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s.double(), dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vh)
    if descales is not None:
        out = out * descales[2].to(dtype).repeat_interleave(g, dim=1)[:, None, :, None]
    return out, lse.float()


def run_xcase(case: XCase, device: str) -> dict[str, Any]:
    """Run ``case`` through the kernel; errors against a float64 oracle and a plain-dtype one."""
    from kernel_fallback.integrations.flash_attn._triton_decode import decode_attention

    gen = torch.Generator().manual_seed(sum(map(ord, case.id)))
    b, hq, hkv, d, dv, sq = case.batch, case.hq, case.hkv, case.d, case.dv, case.sq
    store = getattr(torch, case.fp8) if case.fp8 else torch.float16
    n_pages = b * case.pages_per_seq + 3
    if case.shared:  # one buffer, rope then latent columns: non-contiguous views
        kv = torch.randn(n_pages, case.page, hkv, d + dv, generator=gen).to(store)
        k_cache, v_cache = kv[..., :d], kv[..., d:]
    else:
        k_cache = (torch.randn(n_pages, case.page, hkv, d, generator=gen) * 2).to(store)
        v_cache = (torch.randn(n_pages, case.page, hkv, dv, generator=gen) * 2).to(store)
    q = torch.randn(b, sq, hq, d, generator=gen).to(store)
    qv = torch.randn(b, sq, hq, dv, generator=gen).to(store) if case.qv else None
    perm = torch.randperm(n_pages, generator=gen)[: b * case.pages_per_seq]
    page_table = perm.view(b, case.pages_per_seq).to(torch.int32)
    lens = torch.tensor(case.lens, dtype=torch.int32)
    descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    if case.descale == "per-bh":
        qd, kd, vd = (torch.rand(b, hkv, generator=gen) * 1.5 + 0.25 for _ in range(3))
        descales = (qd, kd, vd)
    elif case.descale == "expanded":
        qd, kd, vd = (torch.tensor(x).expand(b, hkv) for x in (0.7, 1.3, 0.4))
        descales = (qd, kd, vd)
    scale = case.scale if case.scale is not None else (d + (dv if case.qv else 0)) ** -0.5
    dev = torch.device(device)

    def on_device(t: torch.Tensor) -> torch.Tensor:
        # .to() would make an expanded (stride-0) scale contiguous: expand on the device instead
        return t[:1, :1].to(dev).expand(b, hkv) if t.stride() == (0, 0) else t.to(dev)

    out, lse = decode_attention(
        q.to(dev),
        k_cache.to(dev) if not case.shared else kv.to(dev)[..., :d],
        v_cache.to(dev) if not case.shared else kv.to(dev)[..., d:],
        lens.to(dev),
        page_table.to(dev),
        scale,
        (-1, 0),
        case.softcap,
        None,
        True,
        qv=None if qv is None else qv.to(dev),
        q_descale=None if descales is None else on_device(descales[0]),
        k_descale=None if descales is None else on_device(descales[1]),
        v_descale=None if descales is None else on_device(descales[2]),
    )
    assert lse is not None
    out_dtype = torch.bfloat16 if case.fp8 else torch.float16
    args = (
        q,
        qv,
        _gather(k_cache, page_table),
        _gather(v_cache, page_table),
        lens,
        scale,
        descales,
        case.softcap,
    )
    want, want_lse = fa3_decode_oracle(*args, torch.float64)
    plain, _ = fa3_decode_oracle(*args, torch.float32 if case.fp8 else torch.float16)
    plain_err = (plain.to(out_dtype).double() - want).abs().max().item()
    # FA3's tests: <= 2x a plain computation's error, plus the output dtype's rounding at this scale.
    rounding = (want.to(out_dtype).double() - want).abs().max().item()
    finite = torch.isfinite(want_lse)
    same_inf = torch.equal(torch.isinf(lse.cpu()), torch.isinf(want_lse))
    return {
        "out_dtype": str(out.dtype),
        "want_dtype": str(out_dtype),
        "out_shape": list(out.shape),
        "want_shape": list(want.shape),
        "out_err": (out.cpu().double() - want).abs().max().item(),
        "out_tol": 2 * plain_err + 2 * rounding,
        "lse_err": (lse.cpu()[finite] - want_lse[finite]).abs().max().item() if same_inf else float("inf"),
        "lse_tol": 2e-3,
    }


def run_layout_sequence(device: str) -> list[dict[str, Any]]:
    """One process, one shape, layouts that change call to call (each called twice).

    The kernel's plan cache must tell these apart: a strided cache view (sglang's MLA
    views of one buffer), a q one element off 16-byte alignment, an int64 lens tensor,
    one int for every sequence's length, and an appended-key count.
    """
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn._triton_decode import decode_attention

    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, d, page, per_seq = 2, 4, 2, 32, 16, 4
    n_pages = b * per_seq

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=torch.float16)

    page_table = torch.randperm(n_pages, generator=gen).view(b, per_seq).to(device=device, dtype=torch.int32)
    wide = rand(n_pages, page, hkv, 3 * d)
    q_buf = rand(b * hq * d + 1)
    lens = torch.tensor([50, 17], dtype=torch.int32, device=device)
    steps: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | int, int]] = [
        ("contiguous", rand(b, 1, hq, d), wide[..., :d].contiguous(), lens, 0),
        ("strided-cache-view", rand(b, 1, hq, d), wide[..., d : 2 * d], lens, 0),
        ("q-off-alignment", q_buf[1:].view(b, 1, hq, d), wide[..., d : 2 * d], lens, 0),
        ("int64-lens", rand(b, 1, hq, d), wide[..., :d].contiguous(), lens.long(), 0),
        ("one-int-lens", rand(b, 1, hq, d), wide[..., :d].contiguous(), 40, 0),
        ("lens-plus-append", rand(b, 1, hq, d), wide[..., :d].contiguous(), lens, 3),
    ]
    found = []
    for name, q, k_cache, lens_k, add in steps:
        v_cache = wide[..., 2 * d :]
        n = (lens_k + add) if isinstance(lens_k, int) else (lens_k + add).to(torch.int32)
        seqlens = torch.full((b,), n, dtype=torch.int32, device=device) if isinstance(n, int) else n
        want = ref.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=seqlens, page_table=page_table, causal=True
        )
        assert isinstance(want, torch.Tensor)
        errs = []
        for _ in range(2):  # the second call reuses the plan (and on CUDA launches the compiled kernels)
            out, _ = decode_attention(
                q, k_cache, v_cache, lens_k, page_table, d**-0.5, (-1, 0), 0.0, None, False, lens_add=add
            )
            errs.append((out.float() - want.float()).abs().max().item())
        found.append({"step": name, "err": max(errs)})
    return found


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    """Every case's result: in-process on CUDA, else one interpreter subprocess."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if ON_CUDA:
        return (
            {case.id: run_case(case, "cuda") for case in CASES}
            | {case.id: run_xcase(case, "cuda") for case in XCASES}
            | {"layouts": {"steps": run_layout_sequence("cuda")}}
        )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    parsed: dict[str, dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return parsed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decode_matches_reference(case: Case, results: dict[str, dict[str, Any]]) -> None:
    if case.dtype == "bfloat16" and not ON_CUDA:
        pytest.skip("Triton 3.6's interpreter misreads bf16 tensors (fp16 cases cover the CPU run)")
    got = results[case.id]
    assert got["out_shape"] == got["want_shape"]
    assert got["out_err"] <= got["out_tol"], got
    if case.lse:
        assert got["lse_err"] <= got["lse_tol"], got
    else:
        assert got["lse_none"], got


@pytest.mark.parametrize("case", XCASES, ids=[c.id for c in XCASES])
def test_mla_and_fp8_decode_match_fa3s_formula(case: XCase, results: dict[str, dict[str, Any]]) -> None:
    got = results[case.id]
    assert (got["out_shape"], got["out_dtype"]) == (got["want_shape"], got["want_dtype"])
    assert got["out_err"] <= got["out_tol"], got
    assert got["lse_err"] <= got["lse_tol"], got


def test_a_changed_layout_of_the_same_shape_gets_its_own_plan(results: dict[str, dict[str, Any]]) -> None:
    steps = results["layouts"]["steps"]
    assert [s["step"] for s in steps] == [
        "contiguous", "strided-cache-view", "q-off-alignment", "int64-lens", "one-int-lens", "lens-plus-append"
    ]  # fmt: skip
    assert all(s["err"] <= 3e-3 for s in steps), steps


def _mla_128_heads() -> dict[str, Any]:
    from kernel_fallback.integrations.flash_attn._triton_plan import pick_config

    kv = torch.randn(40, 1, 1, 576, dtype=torch.bfloat16)
    return {
        "args": (
            torch.randn(2, 1, 128, 64, dtype=torch.bfloat16), kv[..., :64], kv[..., 64:],
            torch.tensor([20, 3], dtype=torch.int32), torch.arange(40, dtype=torch.int32).view(2, 20),
            192**-0.5, (-1, 0), 0.0, None, False,
        ),
        "qv": torch.randn(2, 1, 128, 512, dtype=torch.bfloat16),
        "config": pick_config(128, 512, hopper=True),
    }  # fmt: skip


def _fp8_everything() -> dict[str, Any]:
    cache = torch.randn(8, 16, 2, 128).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.5).expand(2, 2)
    return {
        "args": (
            torch.randn(2, 1, 8, 128).to(torch.float8_e4m3fn), cache, cache.clone(),
            torch.tensor([20, 3], dtype=torch.int32), torch.arange(8, dtype=torch.int32).view(2, 4),
            0.1, (32, 0), 5.0, torch.randn(8), True,
        ),
        "q_descale": torch.rand(2, 2),
        "k_descale": scale,
        "v_descale": scale,
    }  # fmt: skip


def _fp8_paged_on_hopper() -> dict[str, Any]:
    from kernel_fallback.integrations.flash_attn._triton_plan import pick_config

    return _fp8_everything() | {"config": pick_config(4, 128, fp8=True, hopper=True, page=16)}


def _bf16_paged_on_hopper() -> dict[str, Any]:
    from kernel_fallback.integrations.flash_attn._triton_plan import pick_config

    cache = torch.randn(8, 16, 2, 128, dtype=torch.bfloat16)
    return {
        "args": (
            torch.randn(2, 1, 8, 128, dtype=torch.bfloat16), cache, cache.clone(),
            torch.tensor([20, 3], dtype=torch.int32), torch.arange(8, dtype=torch.int32).view(2, 4),
            0.1, (-1, 0), 0.0, None, False,
        ),
        "config": pick_config(4, 128, hopper=True, page=16, busy=True),
    }  # fmt: skip


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "make",
    [_mla_128_heads, _fp8_everything, _fp8_paged_on_hopper, _bf16_paged_on_hopper],
    ids=["mla-128-heads", "fp8-e4m3-all-options", "fp8-paged-hopper-tiles", "bf16-paged-hopper-tiles"],
)
def test_the_compiled_kernels_build_for_sm90_with_the_launch_arguments(make: Any) -> None:
    """The interpreter never compiles: build the exact launch for Hopper with Triton's bundled ptxas."""
    from kernel_fallback.integrations.flash_attn import _triton_decode as td
    from kernel_fallback.integrations.flash_attn import _triton_plan as tp

    if tp._INTERPRET:
        pytest.skip("this process runs Triton's interpreter")
    if not has_ptxas():
        pytest.skip("this triton has no bundled ptxas")
    call = make()
    plan, split_args, merge_args, _, _ = tp.prepare(*call.pop("args"), **call)
    split = compile_for_sm90(
        td._decode_split_kernel,
        split_args,
        len(plan.split_consts),
        num_warps=plan.warps,
        num_stages=plan.stages,
    )
    merge = compile_for_sm90(td._decode_merge_kernel, merge_args, len(plan.merge_consts))
    assert split.asm["cubin"]
    assert merge.asm["cubin"]
    if plan.split_consts[7] == 64:  # BLOCK_M: a 64-row tile is chosen for Hopper's wgmma
        assert "wgmma.mma_async" in split.asm["ptx"]


if __name__ == "__main__":
    found = {case.id: run_case(case, "cpu") for case in CASES if case.dtype != "bfloat16"}
    found |= {case.id: run_xcase(case, "cpu") for case in XCASES}
    print(json.dumps(found | {"layouts": {"steps": run_layout_sequence("cpu")}}))
