"""Logit parity with HF transformers (float32), prefill and decode."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baton.models.loader import load_model
from testutil import baton_logits, engine_device


def hf_logits(hf, ids: list[int], next_ids: list[int]):
    full = torch.tensor([ids + next_ids])
    with torch.no_grad():
        logits = hf(full).logits[0].float()
    return logits[len(ids) - 1:]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_parity_with_hf(arch, tiny_llama, tiny_qwen2):
    import transformers

    path = tiny_llama if arch == "llama" else tiny_qwen2
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, cfg = load_model(path, "float32", engine_device())
    assert cfg.attention_bias == (arch == "qwen2")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=g).tolist()
    nxt = torch.randint(0, cfg.vocab_size, (9,), generator=g).tolist()
    diff = (baton_logits(model, ids, len(nxt), nxt) - hf_logits(hf, ids, nxt)).abs().max().item()
    print(f"{arch}: max abs logit difference vs HF = {diff:.2e}")
    # Measured ~1e-6 on this machine: float32 rounding only.
    assert diff < 1e-4


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path):
    import transformers

    from testutil import make_tiny_model

    path = make_tiny_model(tmp_path, "llama", tie_word_embeddings=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, cfg = load_model(path, "float32", engine_device())
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.embed.weight
    ids = list(range(3, 200, 2))
    diff = (baton_logits(model, ids, 1, [5]) - hf_logits(hf, ids, [5])).abs().max().item()
    assert diff < 1e-4, diff


def test_default_model_parity_with_hf(default_model_path):
    """The default GGUF dequantized by us vs by transformers' own GGUF loader."""
    import transformers

    p = Path(default_model_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                           dtype=torch.float32).eval()
    from testutil import load_cached

    # The eager path: the reference the C++ kernels are tested against
    # (tests/platform/test_native_kernels.py); they quantize activations as llama.cpp does.
    model, tok = load_cached(default_model_path, "float32", native_kernels=False)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. Then it")
    nxt = tok.encode(" ran into the woods")
    diff = (baton_logits(model, ids, len(nxt), nxt) - hf_logits(hf, ids, nxt)).abs().max().item()
    print(f"SmolLM2-135M: max abs logit difference vs HF = {diff:.2e}")
    # Measured ~2e-5 on this machine (logits of magnitude ~20).
    assert diff < 1e-3


def test_bf16_close_to_fp32(tiny_llama):
    m32, cfg = load_model(tiny_llama, "float32")
    m16, _ = load_model(tiny_llama, "bfloat16")
    ids = list(range(1, 50))
    a, b = baton_logits(m32, ids, 1, [7]), baton_logits(m16, ids, 1, [7])
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel < 0.05, rel


def test_llama_attention_bias_includes_o_proj(tmp_path):
    """HF Llama's attention_bias puts a bias on q, k, v and o: all four are loaded."""
    import transformers

    from testutil import make_tiny_model

    path = make_tiny_model(tmp_path, "llama", attention_bias=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.normal_(0, 0.5)  # HF initialises biases to zero
    hf.save_pretrained(path)
    model, cfg = load_model(path, "float32", engine_device())
    ids = list(range(3, 40))
    diff = (baton_logits(model, ids, 2, [5, 9]) - hf_logits(hf, ids, [5, 9])).abs().max().item()
    assert diff < 1e-4, diff
