"""The roofline and the HF same-weights check on a model whose linear layers keep
their values only in baton's kernels (the freed float32 weights)."""
import pytest
import torch

from baton.platform import native


@pytest.mark.skipif(native.kernels() is None, reason="baton's CPU kernels are not built or the CPU lacks AVX2")
def test_roofline_and_dense_weight_with_kernel_held_values(tiny_llama):
    from baton.bench import roofline
    from baton.models.layers import Linear
    from baton.models.loader import load_model

    quantized, _ = load_model(tiny_llama, "float32", quantization="int4")
    plain, _ = load_model(tiny_llama, "float32", native_kernels=False)
    layers = [m for m in quantized.modules() if isinstance(m, Linear)]
    assert any(m.weight.numel() == 0 for m in layers)  # freed: the kernels hold the blocks
    for m in layers:
        w = m.dense_weight()
        assert w.shape == (m.out_features, m.in_features)
        if m.weight.numel() == 0:
            assert torch.equal(w, m.kernel.quant.dequantize())
    r = roofline.measure(quantized, batches=(1,), quick=True)
    sizes = roofline.model_sizes(plain)
    assert r["parameters"] == sizes["parameters"] and r["weight_bytes"] == sizes["weight_bytes"]
    assert r["flops_per_token"] == sizes["flops_per_token"]
    assert 0 < r["compact_path_weight_bytes"] < sizes["weight_bytes"]
    assert r["gemm"][0]["own_kernels_step_gemm_time_s"] > 0
