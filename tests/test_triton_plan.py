"""Launch plans of the Triton decode kernel, on CPU tensors (nothing is launched here).

``prepare`` is the host half of ``decode_attention``: it checks a layout once, keys a
plan on everything a compiled kernel depends on, and builds the launch arguments.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def plans() -> Any:
    from kernel_fallback.integrations.flash_attn import _triton_plan

    _triton_plan._PLANS.clear()
    yield _triton_plan
    _triton_plan._PLANS.clear()


def decode_call(batch: int = 2, pages: int = 4, **overrides: Any) -> dict[str, Any]:
    """Arguments of ``prepare`` for a paged bf16 GQA decode (8/2 heads, d=64, page 16)."""
    k_cache = torch.randn(batch * pages, 16, 2, 64, dtype=torch.bfloat16)
    args: dict[str, Any] = {
        "q": torch.randn(batch, 1, 8, 64, dtype=torch.bfloat16),
        "k_cache": k_cache,
        "v_cache": torch.randn_like(k_cache),
        "lens_k": torch.full((batch,), 20, dtype=torch.int32),
        "page_table": torch.arange(batch * pages, dtype=torch.int32).view(batch, pages),
        "scale": 0.125,
        "window": (-1, 0),
        "softcap": 0.0,
        "sinks": None,
        "want_lse": False,
    }
    return args | overrides


def prepare(plans: Any, args: dict[str, Any]) -> Any:
    positional = [args.pop(name) for name in list(args)[:10]]
    return plans.prepare(*positional, **args)


def test_the_same_layout_reuses_its_plan_and_new_values_do_not_matter(plans: Any) -> None:
    first = prepare(plans, decode_call())[0]
    again = decode_call()  # new tensors, new values, same layout
    again["lens_k"] = torch.full((2,), 60, dtype=torch.int32)
    assert prepare(plans, again)[0] is first
    assert len(plans._PLANS) == 1


@pytest.mark.parametrize(
    "change",
    ["strided-cache", "misaligned-q", "int64-lens", "one-int-lens", "lse", "sinks"],
)
def test_a_changed_layout_gets_its_own_plan(plans: Any, change: str) -> None:
    first = prepare(plans, decode_call())[0]
    args = decode_call()
    if change == "strided-cache":
        args["k_cache"] = torch.randn(8, 16, 2, 128, dtype=torch.bfloat16)[..., :64]
    elif change == "misaligned-q":
        args["q"] = torch.randn(2 * 8 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 1, 8, 64)
    elif change == "int64-lens":
        args["lens_k"] = args["lens_k"].long()
    elif change == "one-int-lens":
        args["lens_k"] = 20
    elif change == "lse":
        args["want_lse"] = True
    else:
        args["sinks"] = torch.randn(8)
    plan = prepare(plans, args)[0]
    assert plan is not first
    assert len(plans._PLANS) == 2


def test_new_batch_sizes_and_capacities_keep_the_compiled_constants(plans: Any) -> None:
    """Only runtime arguments change: the kernels compiled for one batch/capacity serve all."""
    base = prepare(plans, decode_call())[0]
    for batch, pages in ((5, 4), (2, 40), (33, 3)):
        plan = prepare(plans, decode_call(batch, pages))[0]
        assert plan is not base
        assert (plan.split_consts, plan.merge_consts) == (base.split_consts, base.merge_consts)
        assert plan.split_tail != base.split_tail or plan.split_grid != base.split_grid


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("q_descale", torch.ones(2, 3), r"q_descale must be a float32 tensor of shape \(2, 2\)"),
        ("k_descale", torch.ones(2, 2, dtype=torch.float64), r"k_descale must be a float32 tensor"),
        ("qv", torch.randn(2, 1, 8, 32, dtype=torch.bfloat16), r"qv must have shape \(2, 1, 8, 64\)"),
    ],
    ids=["descale-shape", "descale-dtype", "qv-shape"],
)
def test_bad_arguments_are_named(plans: Any, name: str, value: torch.Tensor, message: str) -> None:
    override: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=message):
        prepare(plans, decode_call(**override))


def test_an_expanded_scale_keeps_stride_zero(plans: Any) -> None:
    scale = torch.tensor(0.5).expand(2, 2)
    _, split_args, merge_args, _, _ = prepare(plans, decode_call(k_descale=scale, v_descale=scale))
    assert split_args[7] is scale  # k_descale pointer: the expanded tensor itself, no copy
    assert merge_args[2] is scale
    assert merge_args[8:10] == (0, 0)


def test_num_splits_depends_on_shapes_only() -> None:
    from kernel_fallback.integrations.flash_attn._triton_plan import num_splits

    cpu = torch.device("cpu")
    assert num_splits(1, 1, 64, cpu) == 1  # one key block: nothing to split
    assert num_splits(1, 1, 64 * 100, cpu) > 1
    assert num_splits(64, 8, 64 * 100, cpu) == 1  # enough programs without splitting
    # per_sm: CPU counts 8 "SMs"; one sequence of one head takes per_sm * 8 splits.
    assert num_splits(1, 1, 64 * 100, cpu, per_sm=2) == 16
    assert num_splits(1, 1, 64 * 100, cpu, per_sm=4) == 32


TILES = [
    pytest.param(
        {"rows": 4, "dv": 128, "hopper": True, "page": 16, "busy": True},
        (16, 128, 4, 3, 2),
        id="hopper-paged",
    ),
    pytest.param(
        {"rows": 4, "dv": 128, "hopper": True, "page": 16}, (16, 64, 4, 3, 2), id="hopper-paged-small-batch"
    ),
    pytest.param({"rows": 4, "dv": 128, "hopper": True, "page": 1}, (16, 64, 4, 3, 2), id="hopper-page1"),
    pytest.param({"rows": 4, "dv": 128, "hopper": False, "page": 64}, (16, 64, 4, 3, 2), id="ampere-paged"),
    pytest.param(
        {"rows": 4, "dv": 128, "fp8": True, "hopper": True, "page": 64},
        (16, 128, 4, 3, 4),
        id="hopper-fp8-paged",
    ),
    pytest.param({"rows": 4, "dv": 128, "fp8": True, "page": 64}, (16, 64, 8, 3, 2), id="fp8-elsewhere"),
    pytest.param({"rows": 4, "dv": 256, "d": 256, "hopper": True, "page": 64}, (16, 64, 4, 3, 2), id="d256"),
    pytest.param({"rows": 32, "dv": 128, "hopper": True, "page": 64}, (32, 64, 4, 3, 2), id="32-rows"),
    pytest.param({"rows": 128, "dv": 512, "d": 64, "hopper": True}, (64, 64, 8, 2, 2), id="mla-128-heads"),
    pytest.param({"rows": 16, "dv": 512, "d": 64, "hopper": True}, (16, 32, 4, 2, 2), id="mla-16-heads"),
    pytest.param({"rows": 128, "dv": 512, "d": 64}, (16, 32, 4, 2, 2), id="mla-off-hopper"),
]


@pytest.mark.parametrize(("shape", "want"), TILES)
def test_tiles_follow_the_measured_choices(shape: dict[str, Any], want: tuple[int, ...]) -> None:
    from kernel_fallback.integrations.flash_attn._triton_plan import pick_config

    rows, dv = shape.pop("rows"), shape.pop("dv")
    assert tuple(pick_config(rows, dv, **shape)) == want
