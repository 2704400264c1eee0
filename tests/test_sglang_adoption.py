"""examples/sglang_adoption.py: sglang's FA3 call shapes through the chain, on torch and on each build.

The example runs as a script (the torch provider serves here); its wrappers and call
shapes are then replayed against the stand-in ``sgl_kernel`` builds of
tests/sgl_kernel_stubs.py through ungated copies of the FA chains (see
tests/test_sgl_kernel_builds.py for why ungated).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sgl_kernel_stubs as stubs
import torch

from kernel_fallback.integrations.flash_attn import _chains as fa

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sglang_adoption.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sglang_adoption_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_runs_every_shape_on_torch() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "active providers: varlen torch, kvcache torch"
    # MLA with qv and fp8 KV with stride-0 descales are served by the torch provider (issue 14).
    for shape in ("prefill", "decode", "extend", "cascade", "mla (qv)", "fp8 decode"):
        assert f"{shape}: matches the float64 reference: True" in lines
    # The provider choice is the only event: hints, only_qv=False, attention_chunk=0,
    # cu_seqlens_k_new without k and ver=3 are not fallbacks.
    assert (
        "events: [('provider', 'flash_attn_varlen_func', 'torch'), ('provider', 'flash_attn_with_kvcache', 'torch')]"
        in lines
    )
    assert (
        "ver=4: ProviderUnavailableError: flash_attn_varlen_func(ver=4) asks for provider 'fa4'"
        in proc.stdout
    )
    assert (
        "ver=5: PolicyConfigError: flash_attn_varlen_func(ver=5): ver takes 3 (this chain), 4 (provider 'fa4')."
        in (lines)
    )


@pytest.fixture(params=list(stubs.BUILDS))
def on_build(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ModuleType]]:
    """The example module with its kernels replaced by ungated chains over one stand-in build."""
    build: str = request.param
    example = load_example()
    tag = uuid.uuid4().hex[:6]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        stubs.install(tmp_path, build)
        patch.setattr(
            example, "fa3_varlen", fa._varlen_chain(name=f"ex_varlen_{tag}", gates=(), fa4_gates=())
        )
        patch.setattr(
            example, "fa3_kvcache", fa._kvcache_chain(name=f"ex_kvcache_{tag}", gates=(), fa4_gates=())
        )
        yield build, example
        stubs.uninstall()


def received(entry: str) -> list[dict[str, Any]]:
    return [args for _, name, args in stubs.CALLS if name == entry]


@pytest.mark.parametrize("shape", ["prefill", "decode", "extend", "cascade"])
def test_every_shape_reaches_the_build_and_matches_the_reference(
    on_build: tuple[str, ModuleType], shape: str
) -> None:
    build, example = on_build
    assert getattr(example, shape)(torch.Generator().manual_seed(1)) is True
    assert example.fa3_varlen.chain.active == example.fa3_kvcache.chain.active == "sgl_kernel"
    got = stubs.CALLS
    assert got, "the build was not called"
    assert {b for b, _, _ in got} == {build.rsplit("-", 1)[1]}
    for _, _, args in got:
        assert args["ver"] == 3
        if build == "sgl-kernel-0.3.21":
            assert "out" not in args
            assert "only_qv" not in args
        else:
            assert args["only_qv"] is False
    if shape == "decode":
        (args,) = received("flash_attn_with_kvcache")
        assert args["num_splits"] == 0
        assert args["page_table"] is not None
    if shape in ("extend", "cascade"):
        args = received("flash_attn_with_kvcache")[0]
        assert args["k"] is None
        assert args["cu_seqlens_k_new"] is not None  # accepted by the build, read by FA3 only with k


def test_mla_with_qv_is_sent_to_the_build_that_takes_it(on_build: tuple[str, ModuleType]) -> None:
    _, example = on_build
    with pytest.raises(NotImplementedError, match="stand-in cannot compute qv"):
        example.mla(torch.Generator().manual_seed(2))
    (args,) = received("flash_attn_with_kvcache")
    assert args["qv"] is not None
    # k_rope and c_kv reach the build as the strided views of one buffer sglang passes.
    assert args["k_cache"].untyped_storage().data_ptr() == args["v_cache"].untyped_storage().data_ptr()
    assert args["k_cache"].shape[-1] == 64
    assert args["v_cache"].shape[-1] == 512


def test_fp8_decode_is_sent_to_the_build_with_its_stride_0_descales(on_build: tuple[str, ModuleType]) -> None:
    _, example = on_build
    with pytest.raises(NotImplementedError, match="stand-in cannot compute k_descale, v_descale"):
        example.fp8_decode(torch.Generator().manual_seed(3))
    (args,) = received("flash_attn_with_kvcache")
    assert args["q"].dtype == args["k_cache"].dtype == torch.float8_e4m3fn
    assert args["k_descale"].stride() == args["v_descale"].stride() == (0, 0)
    assert args["q_descale"] is None
