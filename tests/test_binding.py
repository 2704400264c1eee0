"""Decorated kernels pickle by the name they are stored under, also across a spawn."""

from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

KERNELS = textwrap.dedent(
    """
    import torch
    from kernel_fallback import stats, tolerant_kwargs


    def flash_attn_varlen_func(q):
        return q * 2


    fa3 = tolerant_kwargs(["out"], "copy")(flash_attn_varlen_func)
    fa3_no_out = tolerant_kwargs(["only_qv"])(flash_attn_varlen_func)


    @tolerant_kwargs(["out"])
    def decorated(q):
        return q


    class Backend:
        forward = tolerant_kwargs(["out"], "copy")(flash_attn_varlen_func)


    def make_global():
        global made_in_function
        made_in_function = tolerant_kwargs(["out"])(flash_attn_varlen_func)


    make_global()
    mm = tolerant_kwargs(["out"], "raise")(torch.mm)


    def local_only():
        kernel = tolerant_kwargs(["out"])(flash_attn_varlen_func)
        return kernel


    def run(kernel):
        buf = torch.zeros(2)
        result = kernel(torch.ones(2), out=buf)
        return {
            "result": result.tolist(),
            "buf": buf.tolist(),
            "policy": kernel.tolerant.policies["out"][0],
            "counts": [row["count"] for row in stats()],
        }
    """
)


@pytest.fixture
def kmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    (tmp_path / "kf_pickled_kernels.py").write_text(KERNELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("kf_pickled_kernels", None)
    module = importlib.import_module("kf_pickled_kernels")
    yield module
    sys.modules.pop("kf_pickled_kernels", None)


@pytest.mark.parametrize(
    ("attr", "qualname"),
    [
        ("fa3", "fa3"),
        ("fa3_no_out", "fa3_no_out"),
        ("decorated", "decorated"),
        ("made_in_function", "made_in_function"),
    ],
    ids=["readme-pattern", "clone", "decorator-syntax", "global-statement"],
)
def test_module_level_kernels_pickle_by_reference(kmod: ModuleType, attr: str, qualname: str) -> None:
    kernel = getattr(kmod, attr)
    assert (kernel.__module__, kernel.__qualname__) == ("kf_pickled_kernels", qualname)
    assert kernel.__name__ == kernel.__wrapped__.__name__
    assert pickle.loads(pickle.dumps(kernel)) is kernel


def test_a_class_attribute_pickles(kmod: ModuleType) -> None:
    forward = kmod.Backend.forward
    assert forward.__qualname__ == "Backend.forward"
    assert pickle.loads(pickle.dumps(forward)) is forward


def test_a_builtin_kernel_pickles_by_value_and_is_decorated_again(kmod: ModuleType) -> None:
    copy = pickle.loads(pickle.dumps(kmod.mm))
    assert copy.tolerant.policies == kmod.mm.tolerant.policies
    a, b, out = torch.ones(2, 2), torch.ones(2, 2), torch.empty(2, 2)
    assert copy(a, b, out=out) is out


def test_a_kernel_stored_nowhere_keeps_the_kernels_names(kmod: ModuleType) -> None:
    kernel = kmod.local_only()
    assert kernel.__qualname__ == "flash_attn_varlen_func"
    with pytest.raises(pickle.PicklingError, match="not the same object"):
        pickle.dumps(kernel)


def test_spawned_workers_receive_the_readme_kernel(tmp_path: Path) -> None:
    (tmp_path / "kf_pickled_kernels.py").write_text(KERNELS)
    (tmp_path / "spawn_main.py").write_text(
        textwrap.dedent(
            """
            import json, multiprocessing
            import kf_pickled_kernels as kmod

            if __name__ == "__main__":
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    print(json.dumps(pool.apply(kmod.run, (kmod.fa3,))))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "spawn_main.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "result": [2.0, 2.0],
        "buf": [2.0, 2.0],
        "policy": "copy",
        "counts": [1],
    }
