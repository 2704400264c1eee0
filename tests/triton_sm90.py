"""Compile a Triton kernel for Hopper (sm_90) on a machine without a GPU.

The interpreter that runs the kernels on CPU never compiles them, so a launch that does
not build (shared memory, a bad constexpr) would first fail on a GPU. These helpers build
the exact launch with Triton's bundled ptxas. Like Triton's launcher, they mark pointers
16-byte aligned and integers divisible by 16 as such: without those hints Triton neither
vectorizes nor pipelines the loads, and the built kernel would not be the one a GPU runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_TRITON_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.float8_e5m2: "fp8e5",
}


def has_ptxas() -> bool:
    """Whether this triton bundles the ptxas that :func:`compile_for_sm90` needs."""
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def compile_for_sm90(kernel: Any, args: tuple[Any, ...], n_consts: int, **options: int) -> Any:
    """Compile ``kernel`` for sm_90 with exactly these launch arguments (constexprs last)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, compile

    names = kernel.arg_names
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, (name, arg) in enumerate(zip(names[: len(args) - n_consts], args, strict=False)):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[arg.dtype]
            aligned = arg.data_ptr() % 16 == 0
        else:
            signature[name] = "fp32" if isinstance(arg, float) else "i32"
            aligned = not isinstance(arg, float) and arg % 16 == 0
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = dict(zip(names[len(args) - n_consts :], args[len(args) - n_consts :], strict=True))
    signature |= dict.fromkeys(consts, "constexpr")
    source = ASTSource(kernel, signature, consts, attrs)
    return compile(source, target=GPUTarget("cuda", 90, 32), options=options)
