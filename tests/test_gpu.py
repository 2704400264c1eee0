"""CUDA graphs and torch.compile on a real GPU (skipped without CUDA; CI has none).

Run on a CUDA machine: ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from structlog.testing import capture_logs

from kernel_fallback import UnsupportedKwargError, reload_config, stats, tolerant_kwargs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def triton_kernels() -> Any:
    pytest.importorskip("triton")
    import triton_kernels as module  # type: ignore[import-not-found,unused-ignore]  # examples/

    return module


def mm_no_out() -> Callable[..., torch.Tensor]:
    return torch.ops.aten.mm.default


def capture(step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm up on a side stream (as CUDA graph capture requires), then capture ``step``."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


KERNELS = ["aten-mm", "triton"]


def kernel_and_reference(
    which: str, policy: str
) -> tuple[Any, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    if which == "aten-mm":
        return tolerant_kwargs(["out"], policy, name=f"mm_{policy}")(mm_no_out()), torch.mm
    module = triton_kernels()
    return tolerant_kwargs(["out"], policy, name=f"triton_{policy}")(module.scaled_add), torch.add


@pytest.mark.parametrize("which", KERNELS)
def test_copy_keeps_the_static_out_buffer_right_on_every_replay(which: str) -> None:
    kernel, reference = kernel_and_reference(which, "copy")
    x, y = torch.randn(256, 256, device="cuda"), torch.randn(256, 256, device="cuda")
    out = torch.zeros(256, 256, device="cuda")
    with capture_logs() as logs:
        graph, _ = capture(lambda: kernel(x, y, out=out))
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        y.copy_(torch.randn_like(y))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference(x, y))
    (row,) = stats()
    assert row["graph_captures"] == 1
    assert row["count"] == 4  # 3 warm-up calls and the capture; replays never reach Python
    captured = [e for e in logs if e.get("cuda_graph_capture")]
    assert len(captured) == 1


@pytest.mark.parametrize("which", KERNELS)
def test_native_out_fast_path_under_graph(which: str) -> None:
    if which == "aten-mm":
        kernel = tolerant_kwargs(["out"], "raise")(torch.mm)
        reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.mm
    else:
        kernel = tolerant_kwargs(["out"], "raise")(triton_kernels().scaled_add_out)
        reference = torch.add
    assert kernel.tolerant.missing == ()
    x, y = torch.randn(128, 128, device="cuda"), torch.randn(128, 128, device="cuda")
    out = torch.zeros(128, 128, device="cuda")
    graph, _ = capture(lambda: kernel(x, y, out=out))
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference(x, y))
    assert stats() == []


def test_warn_leaves_the_static_buffer_stale_and_says_so_at_capture() -> None:
    kernel = tolerant_kwargs(["out"], "warn", name="mm_warn_graph")(mm_no_out())
    x, y = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    out = torch.zeros(64, 64, device="cuda")
    with capture_logs() as logs:
        graph, result = capture(lambda: kernel(x, y, out=out))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    # The graph's own result is right, the caller's static buffer was never written:
    # the silent corruption users reported, here reported at capture time.
    torch.testing.assert_close(result, x @ y)
    assert torch.count_nonzero(out) == 0
    (event,) = [e for e in logs if e.get("cuda_graph_capture")]
    assert event["policy"] == "warn"
    assert "replays without writing" in event["risk"]
    assert stats()[0]["graph_captures"] == 1


def test_raise_policy_refuses_before_capture_starts_work() -> None:
    kernel = tolerant_kwargs(["out"], "raise", name="mm_raise_graph")(mm_no_out())
    x = torch.randn(16, 16, device="cuda")
    with pytest.raises(UnsupportedKwargError, match="mm_raise_graph does not accept the keyword 'out'"):
        kernel(x, x, out=torch.empty_like(x))


@pytest.mark.parametrize("policy", ["warn", "copy"])
def test_the_library_never_synchronizes_the_device(policy: str) -> None:
    kernel = tolerant_kwargs(["out"], policy, name=f"mm_sync_{policy}")(mm_no_out())
    x, out = torch.randn(32, 32, device="cuda"), torch.empty(32, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with capture_logs():
            for _ in range(3):
                kernel(x, x, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("policy", ["warn", "copy"])
def test_inductor_on_cuda_fullgraph_no_recompiles(policy: str) -> None:
    kernel = tolerant_kwargs(["out"], policy, name=f"mm_compile_{policy}")(mm_no_out())

    @torch.compile(fullgraph=True, backend="inductor")
    def step(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return kernel(a, b, out=out) + 1.0

    out = torch.zeros(64, 64, device="cuda")
    with capture_logs():
        for _ in range(100):
            a, b = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
            result = step(a, b, out)
            torch.testing.assert_close(result, a @ b + 1.0)
    if policy == "copy":
        torch.testing.assert_close(out, a @ b)
    else:
        assert torch.count_nonzero(out) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert stats()[0]["compiled_traces"] == 1


@pytest.mark.usefixtures("fresh_dynamo")
def test_reload_after_compilation_recompiles_once(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tolerant_kwargs(["out"], "warn", name="mm_compile_reload")(mm_no_out())
    step = torch.compile(lambda a, out: kernel(a, a, out=out), fullgraph=True, backend="inductor")
    a, out = torch.randn(32, 32, device="cuda"), torch.zeros(32, 32, device="cuda")
    with capture_logs():
        step(a, out)
        assert torch.count_nonzero(out) == 0
        monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__MM_COMPILE_RELOAD", "copy")
        reload_config()
        for _ in range(10):
            step(a, out)
    torch.testing.assert_close(out, a @ a)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.usefixtures("fresh_dynamo")
def test_copy_under_compiled_cuda_graphs_reduce_overhead() -> None:
    # Inductor's CUDA-graph trees skip graphs that mutate inputs (writing `out` is one),
    # exactly as for a native out= kernel; the results must be right either way.
    kernel = tolerant_kwargs(["out"], "copy", name="mm_reduce_overhead")(mm_no_out())
    step = torch.compile(
        lambda a, b, out: kernel(a, b, out=out) * 2.0, mode="reduce-overhead", fullgraph=True
    )
    out = torch.zeros(64, 64, device="cuda")
    with capture_logs():
        for _ in range(6):
            a, b = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
            result = step(a, b, out)
            torch.testing.assert_close(result, 2.0 * (a @ b))
            torch.testing.assert_close(out, a @ b)


def test_flash_attn_chain_on_cuda_matches_the_cpu_result() -> None:
    from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func

    gen = torch.Generator().manual_seed(0)
    lens = [5, 17, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens), 8, 64, generator=gen)
    k = torch.randn(sum(lens), 2, 64, generator=gen)
    v = torch.randn(sum(lens), 2, 64, generator=gen)
    with capture_logs():
        expected = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        buf = torch.empty(sum(lens), 8, 64, device="cuda")
        qc, kc, vc, cuc = (t.cuda() for t in (q, k, v, cu))
        got = flash_attn_varlen_func(qc, kc, vc, cuc, cuc, max(lens), max(lens), causal=True, out=buf)
    assert got is buf
    torch.testing.assert_close(buf.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_every_capture_holding_a_fallback_is_counted_and_logged() -> None:
    kernel = tolerant_kwargs(["out"], "copy", name="mm_two_graphs")(mm_no_out())
    x = torch.randn(32, 32, device="cuda")
    out = torch.zeros(32, 32, device="cuda")
    with capture_logs() as logs:
        capture(lambda: kernel(x, x, out=out))
        capture(lambda: kernel(x, x, out=out))
    assert stats()[0]["graph_captures"] == 2
    assert len([e for e in logs if e.get("cuda_graph_capture")]) == 2


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-break", "fullgraph"])
def test_raise_policy_under_inductor_on_cuda(fullgraph: bool) -> None:
    kernel = tolerant_kwargs(["out"], "raise", name=f"mm_compile_raise_{fullgraph}")(mm_no_out())
    step = torch.compile(lambda a, out: kernel(a, a, out=out) + 1.0, fullgraph=fullgraph, backend="inductor")
    a, out = torch.randn(16, 16, device="cuda"), torch.zeros(16, 16, device="cuda")
    if fullgraph:
        with pytest.raises(torch._dynamo.exc.Unsupported, match="under the 'raise' policy"):
            step(a, out)
    else:
        with pytest.raises(UnsupportedKwargError, match="does not accept the keyword 'out'"):
            step(a, out)


@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional-query", "keyword-query"])
def test_a_routed_chain_call_under_capture_replays_right_and_is_reported(by_keyword: bool) -> None:
    from kernel_fallback import kernel_chain

    def fast(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def with_sinks(x: torch.Tensor, *, sinks: torch.Tensor | None = None) -> torch.Tensor:
        return x * 2 + (0 if sinks is None else sinks)

    @kernel_chain(route=["sinks"], name="graph_routed")
    def toy(x: torch.Tensor, *, sinks: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    toy.provider("fast", loader=lambda: fast)
    toy.provider("ref", loader=lambda: with_sinks)
    x, s = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    with capture_logs() as logs:
        # sglang's varlen wrapper passes every argument by keyword, the query too.
        graph, result = capture(lambda: toy(x=x, sinks=s) if by_keyword else toy(x, sinks=s))
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        s.copy_(torch.randn_like(s))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(result, x * 2 + s)
    (event,) = [e for e in logs if e.get("cuda_graph_capture")]
    assert event["event"] == "kernel_fallback.dispatch"
    assert [r["graph_captures"] for r in stats() if r["kind"] == "dispatch"] == [1]


def _bf16_rule(fast: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor) -> None:
    """Upstream's rule: error vs the float64 oracle at most 2x a plain bf16 computation's."""
    fast_err = (fast.double().cpu() - oracle).abs().max()
    plain_err = (plain.double().cpu() - oracle).abs().max()
    atol = 2 * (oracle + 0.3 - 0.3 - oracle).abs().max()
    assert fast_err <= 2 * plain_err + atol, f"error {float(fast_err):.3g} vs plain {float(plain_err):.3g}"


ATTENTION_CASES = [
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"window_size": (7, 3)}, id="window"),
    pytest.param({"causal": True, "attention_chunk": 16}, id="chunk-causal"),
    pytest.param({"attention_chunk": 16, "softcap": 30.0}, id="chunk-softcap"),
    pytest.param({"causal": True, "window_size": (20, -1), "softcap": 5.0, "sinks": True}, id="sinks"),
]


@pytest.mark.parametrize("options", ATTENTION_CASES)
def test_fast_varlen_on_cuda_within_upstreams_bf16_rule(options: dict[str, Any]) -> None:
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn._checks import check_window

    gen = torch.Generator().manual_seed(5)
    lens_q, lens_k = [5, 130, 0, 77, 300], [9, 130, 4, 200, 300]
    cu_q, cu_k = (
        torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (lens_q, lens_k)
    )
    q, k, v = (
        torch.randn(sum(n), h, 64, generator=gen).bfloat16()
        for n, h in ((lens_q, 8), (lens_k, 2), (lens_k, 2))
    )
    opts = dict(options)
    sinks = torch.randn(8, generator=gen) if opts.pop("sinks", False) else None
    oracle, oracle_lse = ref.flash_attn_varlen_func(
        q.double(), k.double(), v.double(), cu_q, cu_k, sinks=sinks, return_softmax_lse=True, **opts
    )
    # A plain PyTorch computation in bf16 arithmetic (upstream's upcast=False reference).
    window = check_window(opts.get("window_size", (-1, -1)), opts.get("causal", False))
    plain = torch.zeros(q.shape[0], 8, 64, dtype=torch.bfloat16)
    for b in range(len(lens_q)):
        if lens_q[b]:
            rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            plain[rows] = ref._attend(
                q[rows],
                k[keys],
                v[keys],
                64**-0.5,
                window,
                opts.get("attention_chunk", 0),
                opts.get("softcap", 0.0),
                sinks,
                torch.bfloat16,
            )[0].bfloat16()
    out, lse = fast.flash_attn_varlen_func(
        q.cuda(),
        k.cuda(),
        v.cuda(),
        cu_q.cuda(),
        cu_k.cuda(),
        sinks=None if sinks is None else sinks.cuda(),
        return_softmax_lse=True,
        **opts,
    )
    assert fast.last_backend("flash_attn_varlen_func") == "flex_attention (compiled)"
    _bf16_rule(out, plain, oracle)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(oracle_lse))
    finite = torch.isfinite(oracle_lse)
    torch.testing.assert_close(lse.cpu()[finite], oracle_lse[finite].float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "lse-softcap-sinks"])
@pytest.mark.parametrize("page", [1, 16, 256], ids=["page1", "page16", "page256"])
def test_paged_decode_through_the_chain_captured_in_a_cuda_graph(page: int, extras: bool) -> None:
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    batch, blocks_per_seq = 4, 512 // page
    num_blocks = batch * blocks_per_seq + 3
    k_cache = torch.randn(num_blocks, page, 2, 64, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.randperm(num_blocks, device="cuda")[: batch * blocks_per_seq].view(batch, -1).int()
    q = torch.randn(batch, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (
        torch.randn(batch, 1, 2, 64, device="cuda", dtype=torch.bfloat16),
        torch.randn(batch, 1, 2, 64, device="cuda", dtype=torch.bfloat16),
    )
    seqlens = torch.tensor([0, 100, 300, 510], dtype=torch.int32, device="cuda")

    opts: dict[str, Any] = {"page_table": page_table, "causal": True}
    if extras:
        opts |= {"softcap": 5.0, "sinks": torch.randn(8, device="cuda"), "return_softmax_lse": True}

    def step() -> Any:
        return flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, **opts)

    with capture_logs():
        graph, out = capture(step)
        if importlib.util.find_spec("triton") is not None:
            assert fast.last_backend("flash_attn_with_kvcache") == fast.TRITON_DECODE
        for lens in ([5, 200, 1, 400], [511, 0, 64, 7]):  # new inputs in the static buffers
            q.normal_()
            k_new.normal_()
            v_new.normal_()
            seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
            before_k, before_v = k_cache.clone(), v_cache.clone()
            graph.replay()
            expected = ref.flash_attn_with_kvcache(
                q, before_k, before_v, k_new, v_new, cache_seqlens=seqlens, **opts
            )
            if extras:
                torch.testing.assert_close(out[1], expected[1], atol=2e-3, rtol=2e-3)  # lse
                out_now, expected = out[0], expected[0]
            else:
                out_now = out
            torch.testing.assert_close(out_now, expected, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(k_cache, before_k)  # both appended the same new keys


def test_triton_decode_opt_out_takes_the_sdpa_path_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    from kernel_fallback.integrations.flash_attn import _fast as fast

    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(3, 1, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_cache, v_cache = (
        torch.randn(12, 16, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2)
    )
    page_table = torch.randperm(12, device="cuda", generator=gen)[:12].view(3, 4).int()
    seqlens = torch.tensor([64, 0, 17], dtype=torch.int32, device="cuda")

    def call() -> Any:
        return fast.flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=seqlens, page_table=page_table, causal=True
        )

    with_kernel = call()
    assert fast.last_backend("flash_attn_with_kvcache") == fast.TRITON_DECODE
    monkeypatch.setenv(fast.TRITON_DECODE_ENV, "0")
    without = call()
    assert fast.last_backend("flash_attn_with_kvcache") == "sdpa (decode, gqa folded into rows)"
    torch.testing.assert_close(with_kernel, without, atol=2e-2, rtol=2e-2)


# -- transformers on the FA3 chains (kernel_fallback.integrations.transformers) --------------


def _llama_logits(model: Any, impl: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the real tokens of a prefill, then of one decode step over its cache.

    The decode step's token is the prompt's last, the same for every model (not each
    model's own argmax, which bf16 rounding may change).
    """
    model.set_attn_implementation(impl)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = model(
            input_ids=ids[:, -1:],
            attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
            past_key_values=first.past_key_values,
        )
    return torch.cat([first.logits[mask.bool()], step.logits[:, -1]]).float()


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_transformers_llama_bf16_on_the_chains_within_the_bf16_rule_of_sdpa(padded: bool) -> None:
    """A random bf16 Llama through the registered implementation: prefill and decode logits
    within upstream's bf16 rule (error vs the float32 model at most 2x that of transformers'
    own SDPA in bf16), generate() served entirely by the chains, decode on Triton when unpadded.
    """
    transformers = pytest.importorskip("transformers")
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.transformers import register_attention, reset_served_calls, served_calls

    name = register_attention()
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        exact = transformers.LlamaForCausalLM(config).eval()
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    model.load_state_dict({k: v.bfloat16() for k, v in exact.state_dict().items()})
    ids = torch.randint(1, 1024, (4, 96), device="cuda")
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :40] = 0
        mask[3, :7] = 0

    oracle = _llama_logits(exact, "sdpa", ids, mask).double().cpu()
    plain = _llama_logits(model, "sdpa", ids, mask)
    reset_served_calls()
    got = _llama_logits(model, name, ids, mask)
    _bf16_rule(got, plain, oracle)
    if not padded and importlib.util.find_spec("triton") is not None:
        assert fast.last_backend("flash_attn_with_kvcache") == fast.TRITON_DECODE

    calls = [0]
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    reset_served_calls()
    with torch.no_grad():
        tokens = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False
        )
    assert tokens.shape == (4, 96 + 16)
    assert calls[0] == 2 * 16
    assert sum(served_calls().values()) == calls[0]


@pytest.mark.parametrize("page", [None, 16], ids=["contiguous", "page16"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["no-leftpad", "leftpad"])
def test_kvcache_extras_on_cuda_within_upstreams_bf16_rule(page: int | None, leftpad: bool) -> None:
    """Rotary + cache_batch_idx + appends on CUDA: Triton decode unless leftpad, bf16 rule."""
    pytest.importorskip("triton")
    from kvcache_cases import clone_call, random_case
    from test_kvcache_features_oracle import oracle as kv_oracle

    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref

    call = random_case(
        41, page, dtype=torch.bfloat16, new_kv="plain", rotary_dim=32, batch_idx=True, leftpad=leftpad,
        varlen_q=False, sq=1, mask="causal", hkv=2,
    )  # fmt: skip
    as64 = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in call.items()
    }
    oracle = ref.flash_attn_with_kvcache(**clone_call(as64))
    plain, _, _ = kv_oracle(call, dtype=torch.bfloat16)  # upstream's upcast=False computation
    on_gpu: dict[str, Any] = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in clone_call(call).items()
    }
    got = fast.flash_attn_with_kvcache(**on_gpu)
    assert isinstance(got, torch.Tensor)
    assert isinstance(oracle, torch.Tensor)
    backend = fast.last_backend("flash_attn_with_kvcache")
    if leftpad:  # a key start the kernel does not take
        assert backend != fast.TRITON_DECODE
    else:  # the batch index folded into a page table
        assert backend == fast.TRITON_DECODE
    _bf16_rule(got, plain, oracle)
    want_cache = clone_call(call)
    ref.flash_attn_with_kvcache(**want_cache)
    # Rotated on another device: a bf16 rounding step apart at most.
    torch.testing.assert_close(on_gpu["k_cache"].cpu(), want_cache["k_cache"])


# Gradients and float64 through the torch provider on CUDA (issue 15).


def _upstream_grad_rule(got: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor, softcap: float) -> None:
    """Upstream's backward rule, in bf16: error at most 2x (3x with softcap) a plain bf16 computation's."""
    oracle, plain, got = (t.detach().cpu().bfloat16().double() for t in (oracle, plain, got))
    atol = 2 * (oracle + 0.3 - 0.3 - oracle).abs().max() + (0 if softcap == 0 else 3e-4)
    err, plain_err = (got - oracle).abs().max(), (plain - oracle).abs().max()
    assert err <= (2 if softcap == 0 else 3) * plain_err + atol, (
        f"error {float(err):.3g} vs {float(plain_err):.3g}"
    )


GRAD_CASES = [
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"window_size": (7, 3), "softcap": 15.0}, id="window-softcap"),
    pytest.param({"causal": True, "sinks": True}, id="causal-sinks"),
]


@pytest.mark.parametrize("options", GRAD_CASES)
def test_varlen_gradients_on_cuda_take_compiled_flex_within_upstreams_rule(options: dict[str, Any]) -> None:
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn._checks import check_window

    gen = torch.Generator().manual_seed(9)
    lens_q, lens_k = [5, 130, 0, 77, 300], [9, 130, 4, 200, 300]
    cu_q, cu_k = (
        torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (lens_q, lens_k)
    )
    opts = dict(options)
    softcap = opts.get("softcap", 0.0)
    tensors = [
        torch.randn(sum(n), h, 64, generator=gen).bfloat16()
        for n, h in ((lens_q, 8), (lens_k, 2), (lens_k, 2))
    ]
    if opts.pop("sinks", False):
        tensors.append(torch.randn(8, generator=gen).bfloat16())
    grad_out = torch.randn(sum(lens_q), 8, 64, generator=gen).bfloat16()

    def grads(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
        sinks = leaves[3] if len(leaves) > 3 else None
        out = fast.flash_attn_varlen_func(
            leaves[0], leaves[1], leaves[2], cu_q.to(device), cu_k.to(device), sinks=sinks, **opts
        )
        return torch.autograd.grad(out, leaves, grad_out.to(device=device, dtype=dtype))

    want = grads(torch.float64, "cpu")  # the exact reference: float64 autograd
    got = grads(torch.bfloat16, "cuda")
    assert fast.last_backend("flash_attn_varlen_func") == "flex_attention (compiled)"
    # A plain PyTorch computation in bf16 arithmetic (upstream's upcast=False reference).
    window = check_window(opts.get("window_size", (-1, -1)), opts.get("causal", False))
    leaves = [t.clone().requires_grad_() for t in tensors]
    rows = [
        ref._attend(
            leaves[0][cu_q[b] : cu_q[b + 1]],
            leaves[1][cu_k[b] : cu_k[b + 1]],
            leaves[2][cu_k[b] : cu_k[b + 1]],
            64**-0.5,
            window,
            0,
            softcap,
            leaves[3] if len(leaves) > 3 else None,
            torch.bfloat16,
        )[0]
        for b in range(len(lens_q))
        if lens_q[b]
    ]
    plain = torch.autograd.grad(torch.cat(rows), leaves, grad_out)
    for g, p, w in zip(got, plain, want, strict=True):
        _upstream_grad_rule(g, p, w, softcap)


@pytest.mark.parametrize("page", [0, 16], ids=["contiguous", "paged"])
def test_kvcache_gradients_on_cuda_skip_the_triton_and_sdpa_decode(page: int) -> None:
    from kernel_fallback.integrations.flash_attn import _fast as fast

    gen = torch.Generator().manual_seed(4)
    batch, cap = 3, 64
    q = torch.randn(batch, 1, 8, 64, generator=gen).bfloat16()
    if page:
        k_cache, v_cache = (
            torch.randn(batch * cap // page + 2, page, 2, 64, generator=gen).bfloat16() for _ in "kv"
        )
        table = (
            torch.randperm(batch * cap // page + 2, generator=gen)[: batch * cap // page]
            .view(batch, -1)
            .int()
        )
    else:
        k_cache, v_cache = (torch.randn(batch, cap, 2, 64, generator=gen).bfloat16() for _ in "kv")
        table = None
    seqlens = torch.tensor([0, 17, 64], dtype=torch.int32)
    grad_out = torch.randn(batch, 1, 8, 64, generator=gen).bfloat16()

    def grads(dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k_cache, v_cache)]
        out = fast.flash_attn_with_kvcache(
            leaves[0],
            leaves[1],
            leaves[2],
            cache_seqlens=seqlens.to(device),
            page_table=None if table is None else table.to(device),
            causal=True,
        )
        return torch.autograd.grad(out, leaves, grad_out.to(device=device, dtype=dtype))

    want = grads(torch.float64, "cpu")
    assert fast.last_backend("flash_attn_with_kvcache") == fast.REFERENCE_FLOAT64
    got = grads(torch.bfloat16, "cuda")
    assert fast.last_backend("flash_attn_with_kvcache") == "flex_attention (compiled)"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double().cpu(), w, atol=3e-2, rtol=3e-2)


def test_float64_on_cuda_is_the_exact_reference_and_refused_under_capture() -> None:
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref

    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 3, 300], dtype=torch.int32)
    q, k, v = (torch.randn(300, h, 64, generator=gen, dtype=torch.float64) for h in (8, 2, 2))
    sinks = torch.randn(8, generator=gen, dtype=torch.float64)
    want = ref.flash_attn_varlen_func(q, k, v, cu, cu, causal=True, sinks=sinks)
    got = fast.flash_attn_varlen_func(
        q.cuda(), k.cuda(), v.cuda(), cu.cuda(), cu.cuda(), causal=True, sinks=sinks.cuda()
    )
    assert fast.last_backend("flash_attn_varlen_func") == fast.REFERENCE_FLOAT64
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    qc, kc, vc, cuc = q.cuda(), k.cuda(), v.cuda(), cu.cuda()
    graph = torch.cuda.CUDAGraph()
    with (
        pytest.raises(ValueError, match="cannot run while a CUDA graph is captured"),
        torch.cuda.graph(graph),
    ):
        fast.flash_attn_varlen_func(qc, kc, vc, cuc, cuc, causal=True)


def _mla_oracle(
    q: torch.Tensor,
    qv: torch.Tensor,
    kv: torch.Tensor,
    page_table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """FA3's MLA decode formula in ``dtype``: softmax((q k^T + qv v^T) * scale) v, one kv head."""
    d = q.shape[-1]
    cache = kv[page_table.long()].flatten(1, 2)[:, :, 0].to(dtype)  # (B, cap, d + dv)
    s = torch.einsum("bhd,bkd->bhk", q[:, 0].to(dtype), cache[..., :d])
    s = (s + torch.einsum("bhd,bkd->bhk", qv[:, 0].to(dtype), cache[..., d:])) * scale
    keys = torch.arange(cache.shape[1], device=q.device)
    s = s.masked_fill((keys[None, :] >= lens[:, None].long())[:, None], float("-inf"))
    return torch.einsum("bhk,bkd->bhd", torch.softmax(s, dim=-1), cache[..., d:]).unsqueeze(1)


@pytest.mark.parametrize("page", [1, 64], ids=["page1", "page64"])
def test_mla_128_heads_decode_captured_in_a_cuda_graph_within_upstreams_rule(page: int) -> None:
    """sglang's MLA call: rope and latent caches are views of one (tokens, 1, 576) buffer."""
    pytest.importorskip("triton")
    from kernel_fallback.integrations.flash_attn._triton_decode import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(11)
    batch, heads, capacity = 3, 128, 1024
    blocks = batch * capacity // page + 2
    kv = torch.randn(blocks, page, 1, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
    page_table = torch.randperm(blocks, device="cuda", generator=gen)[: batch * capacity // page]
    page_table = page_table.view(batch, -1).int()
    q = torch.randn(batch, 1, heads, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    qv = torch.randn(batch, 1, heads, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
    lens = torch.tensor([1000, 1, 333], dtype=torch.int32, device="cuda")
    scale = 192**-0.5

    def step() -> Any:
        out, _ = decode_attention(
            q, kv[..., :64], kv[..., 64:], lens, page_table, scale, (-1, 0), 0.0, None, False, qv=qv
        )
        return out

    graph, out = capture(step)
    for new_lens in ([17, 1024, 600], [1, 2, 3]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.normal_(generator=gen)
        graph.replay()
        oracle = _mla_oracle(q, qv, kv, page_table, lens, scale, torch.float64)
        plain = _mla_oracle(q, qv, kv, page_table, lens, scale, torch.bfloat16)
        _bf16_rule(out, plain, oracle.cpu())


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_decode_through_the_provider_gives_bf16_within_fp8_rounding(fmt: str) -> None:
    pytest.importorskip("triton")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 decode needs compute capability 8.9+")
    from kernel_fallback.integrations.flash_attn import _fast as fast

    dtype = getattr(torch, fmt)
    gen = torch.Generator(device="cuda").manual_seed(12)
    k_cache, v_cache = (torch.randn(40, 16, 8, 128, device="cuda", generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(4, 1, 32, 128, device="cuda", generator=gen).to(dtype)
    page_table = torch.randperm(40, device="cuda", generator=gen)[:32].view(4, 8).int()
    seqlens = torch.tensor([128, 5, 77, 0], dtype=torch.int32, device="cuda")
    out = fast.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, page_table=page_table, causal=True
    )
    assert isinstance(out, torch.Tensor)
    assert fast.last_backend("flash_attn_with_kvcache") == fast.TRITON_DECODE
    assert out.dtype == torch.bfloat16
    # The oracle on the fp8 values themselves: widening is exact, so only bf16-level error remains.
    k_log, v_log = (c[page_table.long()].flatten(1, 2).double() for c in (k_cache, v_cache))
    qd = q.double().view(4, 1, 8, 4, 128)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qd, k_log) * 128**-0.5
    keys = torch.arange(k_log.shape[1], device="cuda")
    s = s.masked_fill((keys[None, :] >= seqlens[:, None].long())[:, None, None, None], float("-inf"))
    oracle = torch.einsum("bhgqk,bkhd->bqhgd", torch.softmax(s, -1).nan_to_num(0.0), v_log).reshape(
        4, 1, 32, 128
    )
    torch.testing.assert_close(out.double(), oracle, atol=2e-2, rtol=2e-2)


def test_eager_decode_compiles_once_per_model_layout_and_never_syncs() -> None:
    """New batch sizes and cache capacities reuse the compiled kernels; no call syncs the device."""
    pytest.importorskip("triton")
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _triton_decode as td

    def compiled() -> int:
        kernels = (td._decode_split_kernel, td._decode_merge_kernel)
        return sum(len(caches[0]) for kernel in kernels for caches in kernel.device_caches.values())

    def call(batch: int, pages: int) -> None:
        k_cache = torch.randn(batch * pages, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
        table = torch.arange(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
        lens = torch.full((batch,), pages * 16 - 3, dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fast.flash_attn_with_kvcache(
                q, k_cache, k_cache, cache_seqlens=lens, page_table=table, causal=True
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert fast.last_backend("flash_attn_with_kvcache") == fast.TRITON_DECODE
        want = fast.flash_attn_with_kvcache(
            q.float(), k_cache.float(), k_cache.float(), cache_seqlens=lens, page_table=table, causal=True
        )
        assert isinstance(out, torch.Tensor)
        assert isinstance(want, torch.Tensor)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)

    call(3, 8)
    before = compiled()
    for batch, pages in ((3, 8), (5, 8), (3, 40), (17, 3), (1, 200)):
        call(batch, pages)
    assert compiled() == before


# -- MLA (qv) and fp8 KV on CUDA (issue 14): the torch provider's non-Triton paths ------------


def _mla_paged(
    gen: torch.Generator, lens: list[int], page: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sglang's MLA cache on CUDA: k_rope/c_kv views of one (pages, page, 1, 576) buffer; table."""
    counts = [-(-n // page) for n in lens]
    buf = torch.randn(sum(counts) + 1, page, 1, 576, generator=gen).to(device="cuda", dtype=dtype)
    order = torch.randperm(sum(counts), generator=gen) + 1
    table = torch.zeros(len(lens), max(counts), dtype=torch.int32)
    start = 0
    for b, c in enumerate(counts):
        table[b, :c] = order[start : start + c]
        start += c
    return buf[..., 512:], buf[..., :512], table.cuda()


@pytest.mark.parametrize(
    ("page", "heads", "captured"),
    [(1, 16, False), (64, 128, False), (16, 16, True)],
    ids=["page1-h16", "page64-h128", "page16-captured"],
)
def test_mla_decode_with_qv_on_cuda_within_upstreams_bf16_rule(page: int, heads: int, captured: bool) -> None:
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    gen = torch.Generator().manual_seed(41)
    lens = [300, 7, 1025]
    k_rope, c_kv, table = _mla_paged(gen, lens, page, torch.bfloat16)
    q_rope = torch.randn(3, heads, 64, generator=gen).to("cuda", torch.bfloat16)
    q_nope = torch.randn(3, heads, 512, generator=gen).to("cuda", torch.bfloat16)
    opts: dict[str, Any] = {
        "cache_seqlens": torch.tensor(lens, dtype=torch.int32, device="cuda"),
        "page_table": table,
        "cu_seqlens_q": torch.arange(4, dtype=torch.int32, device="cuda"),
        "cu_seqlens_k_new": torch.arange(4, dtype=torch.int32, device="cuda"),
        "max_seqlen_q": 1,
        "softmax_scale": 192**-0.5 * 1.2**2,
        "causal": True,
        "return_softmax_lse": True,
    }

    def step() -> Any:
        return flash_attn_with_kvcache(q_rope, k_rope, c_kv, qv=q_nope, **opts)

    if captured:
        graph, (out, lse, *_rest) = capture(step)
        graph.replay()
        torch.cuda.synchronize()
    else:
        out, lse, *_rest = step()
    # The reference lacks cu_seqlens_k_new, which FA3 reads only with new keys.
    cpu: dict[str, Any] = {k: v.cpu() for k, v in opts.items() if isinstance(v, torch.Tensor)}
    cpu = {**{k: v for k, v in opts.items() if not isinstance(v, torch.Tensor)}, **cpu}
    del cpu["cu_seqlens_k_new"]
    qr, kr, ckv, qn = (t.cpu() for t in (q_rope, k_rope, c_kv, q_nope))
    oracle, oracle_lse = ref.flash_attn_with_kvcache(
        qr.double(), kr.double(), ckv.double(), qv=qn.double(), **cpu
    )
    plain, _ = ref.flash_attn_with_kvcache(qr, kr, ckv, qv=qn, **cpu)  # fp32 math, bf16 out
    assert out.dtype == torch.bfloat16
    _bf16_rule(out, plain, oracle)
    torch.testing.assert_close(lse.cpu(), oracle_lse, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("packed", [False, True], ids=["sdpa-decode", "packed-flex"])
def test_fp8_decode_with_stride_0_descales_on_cuda(packed: bool) -> None:
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    gen = torch.Generator().manual_seed(42)
    f8, lens, page, hkv = torch.float8_e4m3fn, [200, 5, 513], 16, 2
    blocks = 3 * 33 + 1  # 33 pages of 16 hold the longest request
    table = (torch.randperm(blocks - 1, generator=gen) + 1).view(3, 33).int()
    k8, v8 = (torch.randn(blocks, page, hkv, 128, generator=gen).to(f8) for _ in range(2))
    q8 = torch.randn(3, 1, 8, 128, generator=gen).to(f8)
    scale = torch.tensor(0.75)
    opts: dict[str, Any] = {
        "cache_seqlens": torch.tensor(lens, dtype=torch.int32),
        "page_table": table,
        "causal": True,
    }
    if packed:
        opts["cu_seqlens_q"] = torch.arange(4, dtype=torch.int32)
    q_in = q8.view(3, 8, 128) if packed else q8
    got = flash_attn_with_kvcache(
        q_in.cuda(), k8.cuda(), v8.cuda(),
        **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in opts.items()},
        k_descale=scale.cuda().expand(3, hkv), v_descale=scale.cuda().expand(3, hkv),
    )  # fmt: skip
    assert got.dtype == torch.bfloat16
    k_deq, v_deq = k8.double() * 0.75, v8.double() * 0.75
    oracle = ref.flash_attn_with_kvcache(q_in.double(), k_deq, v_deq, **opts)
    assert isinstance(oracle, torch.Tensor)
    # Upstream's plain computation (attention_ref with upcast=False): bf16 matmuls and softmax.
    plain = torch.zeros_like(oracle, dtype=torch.bfloat16)
    for b, n in enumerate(lens):
        keys = k_deq.bfloat16()[table[b].long()].flatten(0, 1)[:n].repeat_interleave(4, 1)
        values = v_deq.bfloat16()[table[b].long()].flatten(0, 1)[:n].repeat_interleave(4, 1)
        rows = q_in[b].bfloat16().view(1, 8, 128)
        scores = torch.einsum("qhd,khd->hqk", rows, keys) * 128**-0.5
        plain_b = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), values)
        plain[b] = plain_b.view(plain[b].shape)
    _bf16_rule(got, plain, oracle)


def test_mla_prefill_192_128_in_fp8_on_cuda() -> None:
    """MLA's MHA prefill in fp8 without descales: q/k 192, v 128, lse, compiled flex."""
    from kernel_fallback.integrations.flash_attn import _reference as ref
    from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func

    gen = torch.Generator().manual_seed(43)
    f8, lens = torch.float8_e4m3fn, [700, 33, 1300]
    cu = torch.tensor([0, 700, 733, 2033], dtype=torch.int32)
    q, k = (torch.randn(2033, 16, 192, generator=gen).to(f8) for _ in range(2))
    v = torch.randn(2033, 16, 128, generator=gen).to(f8)
    out, lse, *_rest = flash_attn_varlen_func(
        q.cuda(), k.cuda(), v.cuda(), cu.cuda(), cu.cuda(), max(lens), max(lens),
        softmax_scale=192**-0.5, causal=True, return_softmax_lse=True,
    )  # fmt: skip
    assert out.dtype == torch.bfloat16
    opts: dict[str, Any] = {"softmax_scale": 192**-0.5, "causal": True, "return_softmax_lse": True}
    oracle, oracle_lse = ref.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu, cu, **opts)
    plain, _ = ref.flash_attn_varlen_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, **opts)
    _bf16_rule(out, plain, oracle)
    torch.testing.assert_close(lse.cpu(), oracle_lse, atol=2e-2, rtol=2e-3)


def test_qv_decode_that_the_triton_kernel_fits_runs_it_and_is_right() -> None:
    """Head dims the Triton kernel takes (64 / 128, bf16, 8 rows): with qv it runs there."""
    pytest.importorskip("triton")
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref

    gen = torch.Generator().manual_seed(44)
    q, qv = torch.randn(2, 1, 8, 64, generator=gen), torch.randn(2, 1, 8, 128, generator=gen)
    k_cache, v_cache = torch.randn(9, 16, 1, 64, generator=gen), torch.randn(9, 16, 1, 128, generator=gen)
    opts: dict[str, Any] = {
        "cache_seqlens": torch.tensor([61, 3], dtype=torch.int32),
        "page_table": (torch.randperm(8, generator=gen) + 1).view(2, 4).int(),
    }
    qb, kb, vb, qvb = (t.bfloat16() for t in (q, k_cache, v_cache, qv))
    on_cuda = {k: v.cuda() for k, v in opts.items()}
    got = fast.flash_attn_with_kvcache(qb.cuda(), kb.cuda(), vb.cuda(), qv=qvb.cuda(), **on_cuda)
    assert fast.last_backend("flash_attn_with_kvcache") == fast.TRITON_DECODE
    oracle = ref.flash_attn_with_kvcache(qb.double(), kb.double(), vb.double(), qv=qvb.double(), **opts)
    plain = ref.flash_attn_with_kvcache(qb, kb, vb, qv=qvb, **opts)
    assert isinstance(got, torch.Tensor)
    assert isinstance(oracle, torch.Tensor)
    assert isinstance(plain, torch.Tensor)
    _bf16_rule(got, plain, oracle)


# -- eager decode host cost (issue 15): the provider remembers a checked decode layout --------


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "lse-softcap-sinks-window"])
def test_a_remembered_decode_layout_gives_the_checked_calls_result(
    extras: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    from kernel_fallback.integrations.flash_attn import _decode
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref

    gen = torch.Generator(device="cuda").manual_seed(9)
    q = torch.randn(4, 1, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_cache, v_cache = (
        torch.randn(40, 16, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv"
    )
    table = torch.randperm(40, device="cuda", generator=gen)[:32].view(4, 8).int()
    seqlens = torch.tensor([1, 64, 127, 100], dtype=torch.int32, device="cuda")
    opts: dict[str, Any] = {"cache_seqlens": seqlens, "page_table": table, "causal": True}
    if extras:
        opts |= {
            "softcap": 5.0,
            "window_size": (20, -1),
            "sinks": torch.randn(8, device="cuda", generator=gen),
            "return_softmax_lse": True,
        }
    monkeypatch.setattr(_decode, "_SERVED", {})

    def call() -> Any:
        return fast.flash_attn_with_kvcache(q, k_cache, v_cache, **opts)

    def oracle() -> Any:
        cpu: dict[str, Any] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
        return ref.flash_attn_with_kvcache(
            q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), **cpu
        )

    checked = call()  # checked, served by the kernel, remembered
    assert fast.last_backend("flash_attn_with_kvcache") == fast.TRITON_DECODE
    assert len(_decode._SERVED) == 1
    for _ in range(2):  # new values, same layout: remembered
        q.normal_(generator=gen)
        seqlens.copy_(torch.randint(0, 129, (4,), device="cuda", generator=gen, dtype=torch.int32))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(_decode._SERVED) == 1
        want = oracle()
        for g, w in zip(got if extras else (got,), want if extras else (want,), strict=True):
            torch.testing.assert_close(g.float().cpu(), w.float(), atol=2e-2, rtol=2e-2)
    monkeypatch.setattr(_decode, "_SERVED", {})
    torch.testing.assert_close(call(), got, atol=0, rtol=0)  # checked again: the same bits
    assert isinstance(checked, type(got))
    # A layout change is a new key: checked (and refused) as before.
    with pytest.raises(ValueError, match="sinks must have shape"):
        fast.flash_attn_with_kvcache(q, k_cache, v_cache, **(opts | {"sinks": torch.zeros(3, device="cuda")}))
    # The opt-out variable is read per call, remembered layout or not.
    monkeypatch.setenv(fast.TRITON_DECODE_ENV, "0")
    call()
    assert fast.last_backend("flash_attn_with_kvcache") != fast.TRITON_DECODE


def test_a_remembered_decode_layout_replays_right_in_a_cuda_graph() -> None:
    pytest.importorskip("triton")
    from kernel_fallback.integrations.flash_attn import _decode
    from kernel_fallback.integrations.flash_attn import _fast as fast
    from kernel_fallback.integrations.flash_attn import _reference as ref

    q = torch.randn(2, 1, 16, 128, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, 256, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    seqlens = torch.tensor([256, 30], dtype=torch.int32, device="cuda")

    def step() -> Any:
        return fast.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)

    step()
    assert any(entry.plan.split is not None for entry in _decode._SERVED.values())
    graph, out = capture(step)  # every call of warm-up and capture is a remembered one
    for lens in ([3, 256], [129, 1]):
        q.normal_()
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        want = ref.flash_attn_with_kvcache(
            q.cpu().float(),
            k_cache.cpu().float(),
            v_cache.cpu().float(),
            cache_seqlens=seqlens.cpu(),
            causal=True,
        )
        torch.testing.assert_close(out.float().cpu(), want, atol=2e-2, rtol=2e-2)


def test_qv_alone_requiring_grad_takes_a_differentiable_path_on_cuda() -> None:
    from kernel_fallback.integrations.flash_attn import _fast as fast

    gen = torch.Generator().manual_seed(12)
    k_rope, c_kv, table = _mla_paged(gen, [40, 9], 16, torch.bfloat16)
    q = torch.randn(2, 1, 16, 64, generator=gen).bfloat16()
    qv = torch.randn(2, 1, 16, 512, generator=gen).bfloat16()
    grad_out = torch.randn(2, 1, 16, 512, generator=gen).bfloat16()
    lens = torch.tensor([40, 9], dtype=torch.int32)

    def qv_grad(dtype: torch.dtype, device: str) -> torch.Tensor:
        leaf = qv.to(device=device, dtype=dtype).requires_grad_()
        out = fast.flash_attn_with_kvcache(
            q.to(device=device, dtype=dtype), k_rope.to(device=device, dtype=dtype),
            c_kv.to(device=device, dtype=dtype), cache_seqlens=lens.to(device), page_table=table.to(device),
            causal=True, qv=leaf,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(out, leaf, grad_out.to(device=device, dtype=dtype))
        return grad

    want = qv_grad(torch.float64, "cpu")
    got = qv_grad(torch.bfloat16, "cuda")
    assert fast.last_backend("flash_attn_with_kvcache") == "flex_attention (compiled)"
    torch.testing.assert_close(got.double().cpu(), want, atol=3e-2, rtol=3e-2)
