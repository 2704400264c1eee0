"""Stand-ins for the published ``sgl_kernel.flash_attn`` builds, for tests on a machine without CUDA.

The signatures are those of the published wheels (sgl-kernel 0.3.21 and sglang-kernel
0.4.10, ``sgl_kernel/flash_attn.py``; 0.3.21's ``sgl_kernel/_fa4_interface.py``), in the
same order with the same defaults. The bodies keep what each build does with its
arguments where it matters here: 0.3.21's varlen passes None for ``page_table`` to the
kernel and uses ``score_mod``/``aux_tensors`` only with ``ver=4``; 0.4.10 has no ``ver=4``
branch at all. The attention itself is computed by the torch provider; a feature the
stand-in cannot compute raises NotImplementedError rather than being ignored.

:func:`install` writes a package ``sgl_kernel`` re-exporting one build's functions, with
a ``*.dist-info/METADATA`` naming the distribution and version, so that both ``import
sgl_kernel`` and ``importlib.metadata.version("sglang-kernel")`` see that build.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch

from kernel_fallback.integrations.flash_attn import _reference as ref

#: One entry per call a stand-in received: (build, entry point, every argument by name).
CALLS: list[tuple[str, str, dict[str, Any]]] = []


def _cannot(**features: Any) -> None:
    given = [name for name, value in features.items() if value is not None and value is not False]
    if given:
        raise NotImplementedError(f"the sgl_kernel stand-in cannot compute {', '.join(given)}")


def _varlen(args: dict[str, Any]) -> Any:
    """Both builds' varlen path: ``page_table`` never reaches the kernel (None is passed)."""
    _cannot(
        qv=args["qv"], q_descale=args["q_descale"], k_descale=args["k_descale"], v_descale=args["v_descale"]
    )
    if args["max_seqlen_q"] is None or args["max_seqlen_k"] is None:
        raise ValueError("max_seqlen_q and max_seqlen_k are required for FA3")
    return ref.flash_attn_varlen_func(
        args["q"],
        args["k"],
        args["v"],
        args["cu_seqlens_q"],
        args["cu_seqlens_k"],
        max_seqlen_q=args["max_seqlen_q"],
        max_seqlen_k=args["max_seqlen_k"],
        seqused_q=args["seqused_q"],
        seqused_k=args["seqused_k"],
        softmax_scale=args["softmax_scale"],
        causal=args["causal"],
        window_size=tuple(args["window_size"]),
        attention_chunk=args["attention_chunk"] or 0,
        softcap=args["softcap"],
        sinks=args["sinks"],
        return_softmax_lse=True,
    )


def _kvcache(args: dict[str, Any]) -> Any:
    _cannot(
        qv=args["qv"],
        rotary_cos=args["rotary_cos"],
        cache_batch_idx=args["cache_batch_idx"],
        cache_leftpad=args["cache_leftpad"],
        q_descale=args["q_descale"],
        k_descale=args["k_descale"],
        v_descale=args["v_descale"],
    )
    if args["k"] is not None:  # FA3 reads cu_seqlens_k_new only with new keys
        _cannot(cu_seqlens_k_new=args["cu_seqlens_k_new"])
    return ref.flash_attn_with_kvcache(
        args["q"],
        args["k_cache"],
        args["v_cache"],
        args["k"],
        args["v"],
        cache_seqlens=args["cache_seqlens"],
        page_table=args["page_table"],
        cu_seqlens_q=args["cu_seqlens_q"],
        max_seqlen_q=args["max_seqlen_q"],
        softmax_scale=args["softmax_scale"],
        causal=args["causal"],
        window_size=tuple(args["window_size"]),
        attention_chunk=args["attention_chunk"] or 0,
        softcap=args["softcap"],
        sinks=args["sinks"],
        return_softmax_lse=True,
    )


def _finish(
    result: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor | None, return_softmax_lse: bool
) -> Any:
    computed, lse = result
    if out is not None:  # 0.4.10 hands `out` to the op, which writes the result there
        out.copy_(computed)
        computed = out
    if not return_softmax_lse:
        return computed
    # The builds return (out, softmax_lse, *rest): the op's further outputs follow.
    return (computed, lse, torch.empty(0), torch.empty(0))


# -- sgl-kernel 0.3.21 -------------------------------------------------------------------


def flash_attn_with_kvcache_0_3_21(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    qv: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    cache_seqlens: Any = None,
    cache_batch_idx: Any = None,
    cache_leftpad: Any = None,
    page_table: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k_new: Any = None,
    max_seqlen_q: Any = None,
    rotary_seqlens: Any = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    softmax_scale: Any = None,
    causal: Any = False,
    window_size: Any = (-1, -1),
    attention_chunk: Any = None,
    softcap: Any = 0.0,
    rotary_interleaved: Any = True,
    scheduler_metadata: Any = None,
    num_splits: Any = 0,
    pack_gqa: Any = None,
    sm_margin: Any = 0,
    return_softmax_lse: Any = False,
    sinks: Any = None,
    score_mod: Any = None,
    aux_tensors: Any = None,
    ver: Any = 3,
) -> Any:
    args = dict(locals())
    CALLS.append(("0.3.21", "flash_attn_with_kvcache", args))
    if ver == 4:
        raise NotImplementedError("the stand-in's FA4 path covers flash_attn_varlen_func only")
    return _finish(_kvcache(args), None, return_softmax_lse)


def flash_attn_varlen_func_0_3_21(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: Any = None,
    max_seqlen_k: Any = None,
    seqused_q: Any = None,
    seqused_k: Any = None,
    page_table: Any = None,
    softmax_scale: Any = None,
    causal: Any = False,
    qv: Any = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    window_size: Any = (-1, -1),
    attention_chunk: Any = 0,
    softcap: Any = 0.0,
    num_splits: Any = 1,
    pack_gqa: Any = None,
    sm_margin: Any = 0,
    return_softmax_lse: Any = False,
    sinks: Any = None,
    score_mod: Any = None,
    aux_tensors: Any = None,
    ver: Any = 3,
) -> Any:
    args = dict(locals())
    CALLS.append(("0.3.21", "flash_attn_varlen_func", args))
    if ver == 4:
        window = (None, None) if tuple(window_size) == (-1, -1) else window_size
        return fa4_flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seqused_q=seqused_q,
            seqused_k=seqused_k,
            page_table=page_table,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window,
            softcap=softcap,
            pack_gqa=pack_gqa,
            learnable_sink=sinks,
            return_softmax_lse=return_softmax_lse,
            score_mod=score_mod,
            aux_tensors=aux_tensors,
        )
    return _finish(_varlen(args), None, return_softmax_lse)


def fa4_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    learnable_sink: torch.Tensor | None = None,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    return_softmax_lse: bool | None = False,
    score_mod: Any = None,
    aux_tensors: list[Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """0.3.21's ``_fa4_interface.flash_attn_varlen_func``: always (out, lse)."""
    CALLS.append(("fa4", "flash_attn_varlen_func", dict(locals())))
    _cannot(page_table=page_table, score_mod=score_mod, aux_tensors=aux_tensors)
    assert cu_seqlens_q is not None
    assert cu_seqlens_k is not None
    left, right = window_size
    out, lse = ref.flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=(-1 if left is None else left, -1 if right is None else right),
        softcap=softcap,
        sinks=learnable_sink,
        return_softmax_lse=True,
    )
    return out, lse if return_softmax_lse else None


# -- sglang-kernel 0.4.10 ----------------------------------------------------------------


def flash_attn_with_kvcache_0_4_10(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    k: Any = None,
    v: Any = None,
    qv: Any = None,
    rotary_cos: Any = None,
    rotary_sin: Any = None,
    cache_seqlens: Any = None,
    cache_batch_idx: Any = None,
    cache_leftpad: Any = None,
    page_table: Any = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k_new: Any = None,
    max_seqlen_q: Any = None,
    rotary_seqlens: Any = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    softmax_scale: Any = None,
    causal: Any = False,
    window_size: Any = (-1, -1),
    attention_chunk: Any = None,
    softcap: Any = 0.0,
    rotary_interleaved: Any = True,
    scheduler_metadata: Any = None,
    num_splits: Any = 0,
    pack_gqa: Any = None,
    only_qv: Any = False,
    sm_margin: Any = 0,
    return_softmax_lse: Any = False,
    sinks: Any = None,
    score_mod: Any = None,
    aux_tensors: Any = None,
    ver: Any = 3,
    out: Any = None,
) -> Any:
    args = dict(locals())
    CALLS.append(("0.4.10", "flash_attn_with_kvcache", args))
    _cannot(only_qv=only_qv)  # score_mod, aux_tensors and ver are never read, as published
    return _finish(_kvcache(args), out, return_softmax_lse)


def flash_attn_varlen_func_0_4_10(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: Any = None,
    max_seqlen_k: Any = None,
    seqused_q: Any = None,
    seqused_k: Any = None,
    page_table: Any = None,
    softmax_scale: Any = None,
    causal: Any = False,
    qv: Any = None,
    q_descale: Any = None,
    k_descale: Any = None,
    v_descale: Any = None,
    window_size: Any = (-1, -1),
    attention_chunk: Any = 0,
    softcap: Any = 0.0,
    num_splits: Any = 1,
    pack_gqa: Any = None,
    only_qv: Any = False,
    sm_margin: Any = 0,
    return_softmax_lse: Any = False,
    sinks: Any = None,
    score_mod: Any = None,
    aux_tensors: Any = None,
    ver: Any = 3,
    out: Any = None,
) -> Any:
    args = dict(locals())
    CALLS.append(("0.4.10", "flash_attn_varlen_func", args))
    _cannot(only_qv=only_qv)
    return _finish(_varlen(args), out, return_softmax_lse)


# -- installing one build as the package sgl_kernel ---------------------------------------

BUILDS = {
    "sgl-kernel-0.3.21": ("sgl-kernel", "0.3.21", "0_3_21", True),
    "sglang-kernel-0.4.10": ("sglang-kernel", "0.4.10", "0_4_10", False),
}
MODULES = ("sgl_kernel", "sgl_kernel.flash_attn", "sgl_kernel._fa4_interface")


def install(root: Path, build: str, *, metadata: bool = True) -> None:
    """Write ``sgl_kernel`` for ``build`` (a key of :data:`BUILDS`) under ``root`` (put on sys.path)."""
    distribution, version, suffix, has_fa4 = BUILDS[build]
    package = root / "sgl_kernel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'"""Stand-in for {distribution} {version}."""\n')
    (package / "flash_attn.py").write_text(
        "from sgl_kernel_stubs import (\n"
        f"    flash_attn_varlen_func_{suffix} as flash_attn_varlen_func,\n"
        f"    flash_attn_with_kvcache_{suffix} as flash_attn_with_kvcache,\n"
        ")\n"
    )
    if has_fa4:
        (package / "_fa4_interface.py").write_text(
            "from sgl_kernel_stubs import fa4_flash_attn_varlen_func as flash_attn_varlen_func\n"
        )
    if metadata:
        info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    importlib.invalidate_caches()


def uninstall() -> None:
    """Forget the imported stand-in modules (the directory goes with the test's tmp_path)."""
    for name in MODULES:
        sys.modules.pop(name, None)
    CALLS.clear()
