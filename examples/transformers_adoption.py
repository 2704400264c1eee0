"""A transformers model on the FA3 chains, where ``flash_attention_3`` cannot load.

Run: ``python examples/transformers_adoption.py`` (CPU is fine; needs
``pip install 'kernel_fallback[transformers]'``; no download: a tiny random Llama is
saved to a temporary directory and loaded back).

1. ``attn_implementation="flash_attention_3"`` raises ``ImportError`` here (no
   ``flash_attn_interface`` package, or one built for another torch).
2. ``register_attention()`` registers the chains under ``"kernel_fallback_fa3"``;
   ``from_pretrained(..., attn_implementation=name)`` loads the model with it.
3. A left-padded batch generates exactly the tokens of transformers' SDPA, and every
   attention call was served by a chain (here by its ``torch`` provider, with one
   ``provider_fallback`` event per chain saying why; on an H100/H200 with sgl-kernel
   installed, by the real FA3 kernel).
"""

from __future__ import annotations

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from kernel_fallback.integrations.transformers import register_attention, served_calls


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    ids = torch.randint(1, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for batched generation
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}

    with tempfile.TemporaryDirectory() as path:
        LlamaForCausalLM(config).save_pretrained(path)

        try:
            AutoModelForCausalLM.from_pretrained(path, attn_implementation="flash_attention_3")
            print("1. flash_attention_3 loaded: this machine has a working FA3 package")
        except ImportError as exc:
            print(f"1. flash_attention_3: ImportError: {str(exc).splitlines()[0]}")

        name = register_attention()
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name).eval()  # type: ignore[no-untyped-call,unused-ignore]
        reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()  # type: ignore[no-untyped-call,unused-ignore]
        print(f"2. from_pretrained(attn_implementation={name!r}): {model.config._attn_implementation}")

    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, **options)
        want = reference.generate(input_ids=ids, attention_mask=mask, **options)
    print(f"3. greedy tokens equal to SDPA's: {torch.equal(got, want)}; calls served: {served_calls()}")
    for chain in (flash_attn_varlen_func, flash_attn_with_kvcache):
        print(f"   {chain.__name__}: served by provider {chain.chain.active!r}")


if __name__ == "__main__":
    main()
