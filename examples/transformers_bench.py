"""Tokens/s of a random Llama's ``generate()``: ``sdpa`` against the FA3 chains.

Run on a GPU: ``python examples/transformers_bench.py`` (bf16, 8 layers of Llama-3-8B's
shapes: hidden 4096, 32 query heads, 8 kv heads, head dim 128, MLP 14336, vocab 128256;
batch 8, 512-token prompts, 128 new tokens). ``--tiny`` runs a two-layer float32 model on
the CPU in seconds (a smoke test, not a measurement). No download: the weights are random.

Both implementations run the same model under the same transformers settings (dynamic
cache, greedy decoding, ``min_new_tokens`` = ``max_new_tokens`` so every run makes the
same number of tokens); the runs alternate, after one warm-up each (the chain's
flex_attention compiles on its first CUDA prefill), and the median is reported. The
last column is the chain's throughput over SDPA's (1.00 = as fast). ``--padded``
left-pads half of the batch to half the prompt length, so every step of the chain runs
the unpad/varlen path, as transformers' own flash implementations do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from kernel_fallback.integrations.flash_attn import _fast
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func as fa3_varlen
from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache as fa3_kvcache
from kernel_fallback.integrations.transformers import register_attention, reset_served_calls, served_calls

LLAMA3_8B_SHAPES: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
TINY_SHAPES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}


def build(args: argparse.Namespace) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The random model on its device, prompts and their attention mask."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shapes = TINY_SHAPES if args.tiny else LLAMA3_8B_SHAPES
    config = LlamaConfig(**shapes, num_hidden_layers=args.layers, pad_token_id=0)
    with torch.device(args.device):  # initialise on the device: fast, no host copy
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype).eval()  # type: ignore[no-untyped-call,unused-ignore]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt), generator=generator)
    mask = torch.ones_like(ids)
    if args.padded:
        mask[: args.batch // 2, : args.prompt // 2] = 0
    return model, ids.masked_fill(mask == 0, 0).to(args.device), mask.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(
    model: Any, impl: str, ids: torch.Tensor, mask: torch.Tensor, new: int
) -> tuple[float, Any]:
    """Seconds of one greedy generate() of ``new`` tokens per sequence under ``impl``."""
    model.set_attn_implementation(impl)
    sync(str(ids.device))
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    sync(str(ids.device))
    return time.perf_counter() - start, tokens


def attention_call_us(model: Any, impl: str, args: argparse.Namespace, calls: int = 200) -> float:
    """Wall-clock microseconds of one decode-shaped attention call alone (launch-bound on a GPU).

    One query per sequence over ``prompt + new_tokens`` cached keys, through the function
    transformers' registry holds for ``impl``, with the model's first attention module.
    """
    from transformers import AttentionInterface

    layer = model.model.layers[0].self_attn
    config = model.config
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, layer.head_dim
    length = args.prompt + args.new_tokens
    q = torch.randn(args.batch, hq, 1, d, device=args.device, dtype=args.dtype)
    k, v = (torch.randn(args.batch, hkv, length, d, device=args.device, dtype=args.dtype) for _ in "kv")
    fn = AttentionInterface()[impl]  # type: ignore[no-untyped-call,unused-ignore]
    with torch.no_grad():
        for _ in range(3):
            fn(layer, q, k, v, None, scaling=layer.scaling)
        sync(args.device)
        start = time.perf_counter()
        for _ in range(calls):
            fn(layer, q, k, v, None, scaling=layer.scaling)
        sync(args.device)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="two tiny float32 layers on the CPU (smoke test)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; 2 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default 8; 2 with --tiny)")
    parser.add_argument(
        "--prompt", type=int, default=None, help="prompt tokens (default 512; 16 with --tiny)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="new tokens (default 128; 8 with --tiny)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs each (default 5; 1 with --tiny)"
    )
    parser.add_argument("--padded", action="store_true", help="left-pad half of the batch")
    args = parser.parse_args()
    defaults = (2, 2, 16, 8, 1) if args.tiny else (8, 8, 512, 128, 5)
    for field, default in zip(("layers", "batch", "prompt", "new_tokens", "repeats"), defaults, strict=True):
        if getattr(args, field) is None:
            setattr(args, field, default)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA device; use --tiny for the CPU smoke test")
    args.device = "cpu" if args.tiny else "cuda"
    args.dtype = torch.float32 if args.tiny else torch.bfloat16

    name = register_attention()
    model, ids, mask = build(args)
    impls = ["sdpa", name]
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    tokens: dict[str, Any] = {}
    for impl in impls:  # warm-up: compiles the chain's flex prefill, loads providers
        timed_generate(model, impl, ids, mask, args.new_tokens)
    reset_served_calls()
    for _ in range(args.repeats):
        for impl in impls:
            elapsed, tokens[impl] = timed_generate(model, impl, ids, mask, args.new_tokens)
            seconds[impl].append(elapsed)

    made = args.batch * args.new_tokens
    rate = {impl: made / statistics.median(seconds[impl]) for impl in impls}
    new_tokens = [tokens[impl][:, args.prompt :] for impl in impls]
    agree = (new_tokens[0] == new_tokens[1]).float().mean().item()
    print(
        f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, {args.dtype}, "
        f"{args.layers} layers, batch {args.batch} x {args.prompt} prompt tokens"
        f"{' (half left-padded to half length)' if args.padded else ''}, {args.new_tokens} new tokens, "
        f"median of {args.repeats}"
    )
    print(f"{'implementation':<24}{'tokens/s':>12}{'vs sdpa':>10}")
    for impl in impls:
        print(f"{impl:<24}{rate[impl]:>12.1f}{rate[impl] / rate['sdpa']:>10.2f}")
    print(f"attention calls served by the chains: {served_calls()}")
    alone = {impl: attention_call_us(model, impl, args) for impl in impls}
    print(
        "one decode attention call alone (us, back to back): "
        + ", ".join(f"{impl} {us:.1f}" for impl, us in alone.items())
    )
    for chain in (fa3_varlen, fa3_kvcache):
        backend = _fast.last_backend(chain.__name__)
        print(f"  {chain.__name__}: provider {chain.chain.active}, last torch backend {backend}")
    print(f"new tokens equal to sdpa's: {agree:.1%} (random weights: near-tied logits may differ)")


if __name__ == "__main__":
    main()
