"""Ready-made kernel chains for real kernel packages.

- :mod:`kernel_fallback.integrations.flash_attn`: FlashAttention-3's
  ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache``, served by sgl-kernel, a
  kernels-hub build, the FlashAttention-2 package or a pure-torch reference, chosen the
  way sglang chooses (``SGLANG_USE_SGL_FA3_KERNEL``).
- :mod:`kernel_fallback.integrations.transformers`: ``register_attention()``, those chains
  as a HuggingFace transformers ``attn_implementation`` (needs the ``transformers`` extra).

Nothing here is imported by ``import kernel_fallback``: import the module you use.
"""
