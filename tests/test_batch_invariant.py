"""--batch-invariant: a bf16 request computes in float32 over the checkpoint's
weights with baton's row-independent kernels, so greedy output does not depend
on the batch."""
import pytest
import torch

from baton.platform import native


@pytest.mark.skipif(native.kernels() is None, reason="baton's CPU kernels are not built or the CPU lacks AVX2")
def test_bf16_batch_invariant_greedy_alone_equals_batched(default_model_path):
    from baton.engine import EngineConfig, LLMEngine
    from baton.llm import LLM
    from baton.sampling import SamplingParams

    llm = LLM.from_engine(LLMEngine(EngineConfig(model=default_model_path, dtype="bfloat16", batch_invariant=True,
                                                 max_num_seqs=8)))
    model = llm.engine.model
    assert model.dtype == torch.float32 and model.kernel_options.native
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
               "The three primary colors are", "In 1969, astronauts", "My favourite book is", "To make a cake,"]
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    alone = [llm.generate([q], p)[0].outputs[0].token_ids for q in prompts]
    assert batched == alone


def test_batch_invariant_needs_the_kernels(tiny_llama):
    from baton.models.loader import load_model

    with pytest.raises(ValueError, match="batch_invariant needs baton's CPU kernels"):
        load_model(tiny_llama, "bfloat16", native_kernels=False, batch_invariant=True)
    model, _ = load_model(tiny_llama, "float32", native_kernels=False, batch_invariant=True)  # float32: nothing to do
    assert model.dtype == torch.float32
