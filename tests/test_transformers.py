"""transformers models on the FA3 chains (kernel_fallback.integrations.transformers), on CPU.

Tiny models from configs with random weights (no downloads). The oracle is transformers'
own ``sdpa`` implementation (``eager`` for attention sinks and softcap, which its SDPA path lacks):
float32 logits within 1e-4 on every real token, and the same greedy ``generate()``.
Attention calls are counted by forward hooks on the models' attention modules and must
all have been sent to a chain.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernel_fallback.integrations import transformers as kf_transformers  # noqa: E402
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func  # noqa: E402
from kernel_fallback.integrations.transformers import (  # noqa: E402
    DEFAULT_NAME,
    register_attention,
    reset_served_calls,
    served_calls,
)

VOCAB = 96
NEW_TOKENS = 5


def tiny(kind: str) -> Any:
    """A random two-layer model: GQA (4 query heads, 2 kv heads), and what ``kind`` adds."""
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
    }
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "mistral-window":  # every layer slides over 4 tokens, shorter than the prompts
        config = transformers.MistralConfig(**common, sliding_window=4)
        model = transformers.MistralForCausalLM(config)
    elif kind == "gpt_oss-sinks":  # sliding and full layers, learned sinks, head_dim != hidden/heads
        common["intermediate_size"] = 64
        config = transformers.GptOssConfig(
            **common, head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2
        )
        model = transformers.GptOssForCausalLM(config)
        with torch.no_grad():  # initialised to zero-mean noise; make them matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    elif kind == "gemma2-softcap":  # softcap 1.0 (strong), sliding and full layers, scale 64**-0.5
        config = transformers.Gemma2Config(
            **common, head_dim=16, sliding_window=4, attn_logit_softcapping=1.0, query_pre_attn_scalar=64
        )
        model = transformers.Gemma2ForCausalLM(config)
        with torch.no_grad():  # scores of a few units, so that the cap of 1.0 bites
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(10.0)
                layer.self_attn.k_proj.weight.mul_(10.0)
    else:
        raise AssertionError(kind)
    return model.eval()


MODELS = ["llama", "mistral-window", "gpt_oss-sinks", "gemma2-softcap"]
# transformers' SDPA path has no sinks or softcap: those models are checked against eager.
ORACLE = {"llama": "sdpa", "mistral-window": "sdpa", "gpt_oss-sinks": "eager", "gemma2-softcap": "eager"}


def batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of up to 9 tokens; ``padded``: two of them left-padded (lengths 9, 5, 7)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
        mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def name() -> Iterator[str]:
    registered = register_attention()
    reset_served_calls()
    yield registered
    reset_served_calls()


def count_attention_calls(model: Any) -> list[int]:
    """A live count of the calls of the model's attention modules (torch forward hooks)."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
    return calls


def run(model: Any, impl: str, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one forward pass and a greedy generate() under ``impl``."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    return logits, tokens


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("kind", MODELS)
def test_logits_and_greedy_generate_match_transformers_own_attention(
    name: str, kind: str, padded: bool
) -> None:
    model = tiny(kind)
    ids, mask = batch(padded)
    want_logits, want_tokens = run(model, ORACLE[kind], ids, mask)
    calls = count_attention_calls(model)
    got_logits, got_tokens = run(model, name, ids, mask)

    real = mask.bool()  # padding rows are zeros under FlashAttention, garbage under SDPA
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=1e-4, rtol=0)
    assert torch.equal(got_tokens, want_tokens)
    assert calls[0] == 2 * (1 + NEW_TOKENS)  # layers x (forward + one per generated token)
    assert sum(served_calls().values()) == calls[0]
    # Padded steps are unpadded into packed sequences (as transformers' own flash path), at
    # least both prefills; a window that has slid past the padding needs no mask any more.
    # Unpadded steps run over the model's cache.
    assert served_calls()["flash_attn_varlen_func"] >= (2 * 2 if padded else 0)
    assert served_calls()["flash_attn_varlen_func"] <= (calls[0] if padded else 0)


@pytest.mark.parametrize("kind", ["mistral-window", "gpt_oss-sinks", "gemma2-softcap"])
def test_the_window_sinks_and_softcap_change_the_result_so_the_checks_above_can_fail(
    name: str, kind: str
) -> None:
    """Without its window (sinks, softcap) the model computes something else than the oracle."""
    ids, mask = batch(padded=True)
    real = mask.bool()
    model = tiny(kind)
    want, _ = run(model, ORACLE[kind], ids, mask)
    for layer in model.model.layers:
        if kind == "mistral-window":
            model.config.sliding_window = None
        elif kind == "gpt_oss-sinks":
            with torch.no_grad():
                layer.self_attn.sinks.fill_(-1e4)  # a sink nobody attends to
        else:
            layer.self_attn.attn_logit_softcapping = None
    model.set_attn_implementation(name)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert (got[real] - want[real]).abs().max() > 1e-2


def test_from_pretrained_with_the_registered_name(name: str, tmp_path: Path) -> None:
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    ids, mask = batch(padded=True)
    _, want = run(model, "sdpa", ids, mask)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert loaded.config._attn_implementation == name
    calls = count_attention_calls(loaded)
    with torch.no_grad():
        got = loaded.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    assert torch.equal(got, want)
    assert sum(served_calls().values()) == calls[0] == 2 * NEW_TOKENS


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("kind", ["llama", "mistral-window"])
def test_generate_with_a_static_cache(name: str, kind: str, padded: bool) -> None:
    """A static cache's keys are longer than what it holds (and generate() drops an all-ones mask)."""
    model = tiny(kind)
    ids, mask = batch(padded)
    model.set_attn_implementation("sdpa")
    options: dict[str, Any] = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **options)
        model.set_attn_implementation(name)
        calls = count_attention_calls(model)
        got = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **options)
    assert torch.equal(got, want)
    assert sum(served_calls().values()) == calls[0]


def packed_row() -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Three sequences (4, 7, 5 tokens) packed into one row, positions restarting at 0."""
    lengths = [4, 7, 5]
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return ids, positions, bounds


def test_padding_free_packed_sequences_match_each_sequence_alone(name: str) -> None:
    """Packed by position_ids, or by cu_seq_lens (a flattening collator's kwargs): no cross-talk."""
    model = tiny("mistral-window")
    ids, positions, bounds = packed_row()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        alone = [model(input_ids=ids[:, a:b], use_cache=False).logits[0] for a, b in bounds]
    want = torch.cat(alone)
    model.set_attn_implementation(name)
    cu = torch.tensor([0] + [b for _, b in bounds], dtype=torch.int32)
    longest = max(b - a for a, b in bounds)
    with torch.no_grad():
        by_positions = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        by_cu = model(
            input_ids=ids,
            position_ids=positions,
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=longest,
            max_length_k=longest,
        ).logits[0]
    torch.testing.assert_close(by_positions, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(by_cu, want, atol=1e-4, rtol=0)
    assert served_calls() == {"flash_attn_varlen_func": 4, "flash_attn_with_kvcache": 0}


def test_calls_go_to_the_chains_provider(name: str) -> None:
    """Naming the chain's exact reference provider changes nothing: the chain serves the calls."""
    model = tiny("llama")
    ids, mask = batch(padded=True)
    want, _ = run(model, "sdpa", ids, mask)
    flash_attn_varlen_func.use("reference")
    try:
        model.set_attn_implementation(name)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
        assert flash_attn_varlen_func.chain.active == "reference"
    finally:
        flash_attn_varlen_func.use(None)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)


def test_register_is_idempotent_and_uses_the_public_registries() -> None:
    assert register_attention() == DEFAULT_NAME
    first_mask = transformers.AttentionMaskInterface()[DEFAULT_NAME]
    assert register_attention() == DEFAULT_NAME
    assert transformers.AttentionInterface()[DEFAULT_NAME] is kf_transformers.attention_forward
    assert transformers.AttentionMaskInterface()[DEFAULT_NAME] is first_mask
    assert register_attention("kf_fa3_second") == "kf_fa3_second"
    assert transformers.AttentionInterface()["kf_fa3_second"] is kf_transformers.attention_forward


def test_a_name_another_library_took_over_is_not_taken_back() -> None:
    assert register_attention("kf_fa3_taken") == "kf_fa3_taken"
    transformers.AttentionInterface.register("kf_fa3_taken", transformers.AttentionInterface()["sdpa"])
    with pytest.raises(
        ValueError, match=r"'kf_fa3_taken' is already registered in transformers .* by something else"
    ):
        register_attention("kf_fa3_taken")
    assert transformers.AttentionInterface()["kf_fa3_taken"] is transformers.AttentionInterface()["sdpa"]


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("my_flash_attention", "names containing 'flash'"),
        ("kernels-community/x", "hub kernels"),
        ("eager", "'eager'"),
        ("", "non-empty string"),
        ("sdpa", "already registered in transformers"),
        ("flex_attention", "already registered in transformers"),
    ],
    ids=["flash", "hub-kernel", "eager", "empty", "sdpa", "flex"],
)
def test_names_transformers_means_otherwise_are_refused(bad: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        register_attention(bad)
    assert repr(bad) in str(info.value) or bad == ""


def test_training_with_attention_dropout_is_refused(name: str) -> None:
    model = tiny("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.set_attn_implementation(name)
    model.train()
    ids, mask = batch(padded=False)
    with pytest.raises(
        ValueError, match=r"attention dropout 0.1 cannot be served: FlashAttention-3 has no dropout"
    ):
        model(input_ids=ids, attention_mask=mask)


def register_in_child(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """register_attention() in a fresh interpreter that finds ``files`` as its transformers."""
    package = tmp_path / "transformers"
    package.mkdir()
    for filename, text in files.items():
        (package / filename).write_text(text)
    code = "from kernel_fallback.integrations.transformers import register_attention; register_attention()"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
        check=False,
        timeout=120,
    )


def test_a_transformers_without_the_registration_api_is_named(tmp_path: Path) -> None:
    # transformers 4.47: AttentionInterface and AttentionMaskInterface did not exist yet.
    child = register_in_child(tmp_path, {"__init__.py": "__version__ = '4.47.0'\n", "masking_utils.py": ""})
    assert child.returncode == 1
    assert (
        "ImportError: kernel_fallback.integrations.transformers needs transformers>=5.0,<6 "
        "(pip install 'kernel_fallback[transformers]'); transformers 4.47.0 lacks "
        "transformers.AttentionInterface.register, transformers.AttentionMaskInterface.register, "
        "transformers.masking_utils.flash_attention_mask"
    ) in child.stderr


def test_importing_the_module_needs_no_transformers(tmp_path: Path) -> None:
    """Only register_attention() imports transformers; without it, its error names the extra."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import kernel_fallback.integrations.transformers as m\n"
        "m.register_attention()\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert child.returncode == 1
    assert "ImportError: kernel_fallback.integrations.transformers needs transformers>=5.0,<6" in child.stderr
    assert "transformers cannot be imported" in child.stderr


ROOT = Path(__file__).resolve().parent.parent


def run_example(*args: str) -> str:
    child = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr
    return child.stdout


def test_adoption_example_prints_what_it_says() -> None:
    out = run_example("examples/transformers_adoption.py")
    assert "1. flash_attention_3: ImportError: " in out
    assert "2. from_pretrained(attn_implementation='kernel_fallback_fa3'): kernel_fallback_fa3" in out
    assert "3. greedy tokens equal to SDPA's: True; calls served: {'flash_attn_varlen_func': 16," in out


def test_bench_runs_tiny_on_cpu_and_prints_the_ratio() -> None:
    out = run_example("examples/transformers_bench.py", "--tiny", "--new-tokens", "3")
    assert re.search(r"^sdpa\s+\d+\.\d\s+1\.00$", out, re.M)
    assert re.search(r"^kernel_fallback_fa3\s+\d+\.\d\s+\d+\.\d\d$", out, re.M)
    assert (
        "attention calls served by the chains: {'flash_attn_varlen_func': 0, 'flash_attn_with_kvcache': 6}"
        in out
    )
