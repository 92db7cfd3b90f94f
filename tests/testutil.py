"""Helpers shared by the tests: tiny random models built on the fly, cached loads."""
from __future__ import annotations

import functools

import torch


def make_tiny_model(path, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Write an HF model directory (config.json + model.safetensors) with random
    weights. The init scale is raised so logits are peaked and greedy choices are
    not near-ties (which would make token equality a test of float noise)."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, initializer_range=0.15, tie_word_embeddings=False, eos_token_id=None,
                  bos_token_id=None, pad_token_id=None)
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    model.save_pretrained(str(path))
    return str(path)


@functools.lru_cache(maxsize=None)
def load_cached(path: str, dtype: str = "float32"):
    from baton.models.loader import load_model
    from baton.tokenizer import load_tokenizer

    model, cfg = load_model(path, dtype)
    return model, load_tokenizer(path, cfg.eos_token_ids)


def make_engine(path: str, dtype: str = "float32", **kwargs):
    """An engine over a cached model, so tests share weights."""
    from baton.engine import EngineConfig, LLMEngine

    model, tok = load_cached(path, dtype)
    kwargs.setdefault("kv_cache_bytes", 1 << 30)
    return LLMEngine(EngineConfig(model=path, dtype=dtype, **kwargs), model=model, tokenizer=tok)
