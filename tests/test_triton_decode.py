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
    left, right = ref._check_window(case.window, case.causal)
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


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    """Every case's result: in-process on CUDA, else one interpreter subprocess."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if ON_CUDA:
        return {case.id: run_case(case, "cuda") for case in CASES}
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


def test_num_splits_depends_on_shapes_only() -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from kernel_fallback.integrations.flash_attn._triton_decode import num_splits

    cpu = torch.device("cpu")
    assert num_splits(1, 1, 64, cpu) == 1  # one key block: nothing to split
    assert num_splits(1, 1, 64 * 100, cpu) > 1
    assert num_splits(64, 8, 64 * 100, cpu) == 1  # enough programs without splitting


if __name__ == "__main__":
    print(json.dumps({case.id: run_case(case, "cpu") for case in CASES if case.dtype != "bfloat16"}))
