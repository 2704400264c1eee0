"""The FA chains against stand-ins of each published ``sgl_kernel`` build (tests/sgl_kernel_stubs.py).

Each test installs one build as a real package on sys.path, with distribution metadata
(``*.dist-info/METADATA``) that ``importlib.metadata`` reads, and builds the FA chains
with :func:`flash_attn._varlen_chain` / ``_kvcache_chain`` -- the same declarations as
the module's chains -- passing ``gates=()``. That is the one difference: this machine
has no CUDA, so sglang's capability gate (checked for real in tests/test_chain.py)
would close ``sgl_kernel`` before it is imported. The module's own chains stay gated
(``test_the_modules_chains_stay_gated_here``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sgl_kernel_stubs as stubs
import torch

from kernel_fallback import ProviderUnavailableError, UnsupportedKwargError
from kernel_fallback.integrations.flash_attn import _builds as builds
from kernel_fallback.integrations.flash_attn import _chains as fa
from kernel_fallback.testing import capture_fallbacks

BUILD_IDS = list(stubs.BUILDS)


@pytest.fixture
def install(tmp_path: Path) -> Iterator[Any]:
    """``install(build, metadata=True)``: that build as ``sgl_kernel`` for this test only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))

        def put(build: str, *, metadata: bool = True) -> None:
            stubs.install(tmp_path, build, metadata=metadata)

        yield put
        stubs.uninstall()


def chains() -> tuple[Any, Any]:
    """Ungated copies of the module's two chains (see the module docstring)."""
    tag = uuid.uuid4().hex[:6]
    varlen = fa._varlen_chain(name=f"stub_varlen_{tag}", gates=(), fa4_gates=())
    kvcache = fa._kvcache_chain(name=f"stub_kvcache_{tag}", gates=(), fa4_gates=())
    return varlen, kvcache


def calls(entry: str) -> list[dict[str, Any]]:
    return [args for build, name, args in stubs.CALLS if name == entry and build != "fa4"]


def sequences(lens: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens), 8, 16, generator=gen)
    k, v = (torch.randn(sum(lens), 2, 16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Causal attention per sequence with torch's SDPA (equal q/k lengths: both alignments agree)."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True
            ).transpose(0, 1)
        )
    return torch.cat(outs)


# -- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("distribution", "version", "found"),
    [
        ("sgl-kernel", "0.3.21", "0.3.21"),
        ("sglang-kernel", "0.4.10", "0.4.10"),
        ("sglang-kernel", "0.4.12", "0.4.10"),
        ("sgl-kernel", "0.3.22.post1", "0.3.21"),
        ("sglang-kernel", "0.4.9", None),
        ("sgl-kernel", "0.2.0", None),
    ],
    ids=["0.3.21", "0.4.10", "newer-0.4", "newer-0.3", "older-0.4", "older-0.3"],
)
def test_a_build_is_read_as_the_newest_listed_one_at_or_below_it(
    distribution: str, version: str, found: str | None
) -> None:
    build = builds.build_for(distribution, version)
    assert (build.version if build else None) == found


@pytest.mark.parametrize("build", BUILD_IDS)
def test_the_installed_version_is_read_under_either_distribution_name(install: Any, build: str) -> None:
    install(build)
    distribution, version, *_ = stubs.BUILDS[build]
    assert builds.installed() == (distribution, version)
    ignored = builds.ignored_by_installed("flash_attn_varlen_func")(None)
    assert ignored == {"page_table", "score_mod", "aux_tensors"}


def test_without_metadata_every_keyword_any_build_ignores_counts_as_missing(install: Any) -> None:
    install("sglang-kernel-0.4.10", metadata=False)
    assert builds.installed() is None
    assert builds.ignored_by_installed("flash_attn_with_kvcache")(None) == {"score_mod", "aux_tensors"}


# -- each build through the chains ----------------------------------------------------------


@pytest.mark.parametrize("build", BUILD_IDS)
def test_sglangs_varlen_call_reaches_the_build_without_what_it_lacks(install: Any, build: str) -> None:
    install(build)
    varlen, _ = chains()
    q, k, v, cu = sequences([4, 6])
    with capture_fallbacks() as events:
        out = varlen(
            q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6, causal=True,
            attention_chunk=0, num_splits=1, pack_gqa=None, only_qv=False, sm_margin=0,
            return_softmax_lse=False, sinks=None, out=None,
        )  # fmt: skip
    assert varlen.chain.active == "sgl_kernel"
    assert events == []
    (received,) = calls("flash_attn_varlen_func")
    assert received["num_splits"] == 1
    assert received["attention_chunk"] == 0
    assert received["ver"] == 3  # never passed: the build's default
    torch.testing.assert_close(out, sdpa_reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", BUILD_IDS)
def test_a_keyword_the_build_ignores_is_never_sent_there(install: Any, build: str) -> None:
    install(build)
    varlen, _ = chains()
    q, k, v, cu = sequences([4])
    row = {r["name"]: r for r in varlen.describe()["providers"]}["sgl_kernel"]
    assert {"page_table", "score_mod", "aux_tensors"} <= set(row["lacks"])
    assert row["signature"].endswith("+ declared unsupported")
    with pytest.raises(UnsupportedKwargError, match="'page_table'"):
        varlen(q, k, v, cu, cu, 4, 4, page_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(UnsupportedKwargError, match="'score_mod'"):
        varlen(q, k, v, cu, cu, 4, 4, score_mod=lambda s: s)
    assert calls("flash_attn_varlen_func") == []


@pytest.mark.parametrize("build", BUILD_IDS)
def test_sglangs_28_positional_kvcache_call_reaches_the_build(install: Any, build: str) -> None:
    install(build)
    _, kvcache = chains()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 16, generator=gen)
    k_cache, v_cache = (torch.randn(3, 4, 2, 16, generator=gen) for _ in range(2))
    table = torch.tensor([[1, 2], [0, 0]], dtype=torch.int32)
    seqlens = torch.tensor([6, 3], dtype=torch.int32)
    cu1 = torch.tensor([0, 1, 2], dtype=torch.int32)
    positional: list[Any] = [
        q,
        k_cache,
        v_cache,
        None,
        None,
        None,
        None,
        None,
        seqlens,
        None,
        None,
        table,
        cu1,
        cu1,
        1,
    ]
    positional += [None, None, None, None, None, True, (-1, -1), None, 0.0, True, None, 0, None]
    buffer = torch.full_like(q, float("nan"))
    with capture_fallbacks() as events:
        got, lse, *rest = kvcache(
            *positional, sm_margin=0, only_qv=False, return_softmax_lse=True, sinks=None, out=buffer
        )
    (received,) = calls("flash_attn_with_kvcache")
    assert received["page_table"] is table  # 28 positional: page_table reaches a build that uses it
    assert received["cu_seqlens_k_new"] is cu1  # accepted by every build; FA3 ignores it without k
    assert received["num_splits"] == 0
    if build == "sgl-kernel-0.3.21":  # no `out`: the chain copies into the caller's buffer
        assert "out" not in received
        assert [(e.kind, e.subject, e.policy) for e in events] == [("kwarg", "out", "copy")]
    else:
        assert received["out"] is buffer
        assert events == []
    assert got is buffer
    want = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, page_table=table,
                                      cu_seqlens_q=cu1, max_seqlen_q=1, causal=True, return_softmax_lse=True)  # fmt: skip
    torch.testing.assert_close(got, want[0])
    torch.testing.assert_close(lse, want[1])
    assert len(rest) == 2  # the build's own (out, softmax_lse, *rest)


def test_only_qv_true_goes_to_the_build_that_takes_it(install: Any) -> None:
    install("sgl-kernel-0.3.21")
    _, kvcache = chains()
    q = torch.zeros(1, 1, 8, 16)
    with pytest.raises(UnsupportedKwargError, match="'only_qv'"):
        kvcache(q, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16), qv=q, only_qv=True)
    assert calls("flash_attn_with_kvcache") == []


@pytest.mark.parametrize("build", BUILD_IDS)
def test_ver_4_is_served_by_fa4_where_the_build_ships_it(install: Any, build: str) -> None:
    install(build)
    varlen, _ = chains()
    q, k, v, cu = sequences([5, 3], seed=4)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(2))
    if build == "sglang-kernel-0.4.10":  # 0.4.x dropped its FA4 build: refused, not run as FA3
        with pytest.raises(
            ProviderUnavailableError, match=r"\(ver=4\) asks for provider 'fa4'.*_fa4_interface"
        ):
            varlen(q, k, v, cu, cu, 5, 5, causal=True, ver=4)
        assert stubs.CALLS == []
        return
    got, lse = varlen(
        q, k, v, cu, cu, 5, 5, causal=True, sinks=sinks, ver=4, num_splits=0, return_softmax_lse=True
    )
    ((_, _, received),) = [c for c in stubs.CALLS if c[0] == "fa4"]
    assert received["learnable_sink"] is sinks
    assert received["window_size"] == (None, None)
    want = fa.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True, sinks=sinks, return_softmax_lse=True)
    torch.testing.assert_close(got, want[0])
    torch.testing.assert_close(lse, want[1])


def test_the_modules_chains_stay_gated_here(install: Any) -> None:
    install("sglang-kernel-0.4.10")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the gate may be open")
    fa.flash_attn_varlen_func.reset()
    try:
        row = {r["name"]: r for r in fa.flash_attn_varlen_func.describe()["providers"]}["sgl_kernel"]
        assert row["status"] == "unavailable"
        assert row["reason"].startswith("gate 'compute capability 8.x or 9.x' is closed")
        assert calls("flash_attn_varlen_func") == []
    finally:
        fa.flash_attn_varlen_func.reset()


def test_both_distributions_present_trusts_neither(
    install: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The two published builds ignore the same keywords in this entry point; a third row
    # that differs makes "which row was used" observable.
    other = builds.Build(
        "sgl-kernel",
        "0.3.0",
        torch="2.8.0",
        ignores={"flash_attn_with_kvcache": frozenset({"page_table"})},
        lacks=frozenset(),
    )
    monkeypatch.setattr(builds, "BUILDS", (*builds.BUILDS, other))
    install("sglang-kernel-0.4.10")
    assert builds.ignored_by_installed("flash_attn_with_kvcache")(None) == {"score_mod", "aux_tensors"}
    old = tmp_path / "sgl_kernel-0.3.21.dist-info"
    old.mkdir()
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: sgl-kernel\nVersion: 0.3.21\n")
    assert builds.installed() == ("sglang-kernel", "0.4.10")
    assert builds.ignored_by_installed("flash_attn_with_kvcache")(None) == {
        "score_mod",
        "aux_tensors",
        "page_table",
    }
