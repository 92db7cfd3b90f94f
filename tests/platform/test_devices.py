"""Device choice: a clear error for a device that is not here, before any model loads."""
from __future__ import annotations

import pytest
import torch

from baton import EngineConfig, LLMEngine
from baton import platform


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="CUDA"):
        LLMEngine(EngineConfig(model=tiny_llama, device="cuda"))


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "cuda:x"])
def test_unknown_device_names_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="cpu or cuda"):
        platform.resolve_device(bad)


def test_kv_budget_default_comes_from_the_model_device(tiny_llama):
    from testutil import load_cached

    model, tok = load_cached(tiny_llama)
    engine = LLMEngine(EngineConfig(kv_cache_fraction=0.01), model=model, tokenizer=tok)
    assert 0 < engine.budget.limit <= platform.available_memory(model.device) * 0.011
