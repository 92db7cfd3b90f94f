"""torch's CPU int4 kernel, used for Q4_1 blocks of a bf16 model only where it is right (platform/cpu.py)."""
import pytest
import torch

from baton.platform import cpu
from baton.platform.quant import quantize


def test_int4_kernel_is_used_only_where_it_computes_the_dequantized_values():
    if cpu._int4_mm is None:
        pytest.skip("this torch has no CPU int4 kernel")
    gen = torch.Generator().manual_seed(1)
    q = quantize(torch.randn(96, 256, generator=gen), "q4_1")
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    got = cpu.Int4Linear(q, dense=None, options=cpu.KernelOptions(False))(x).float()
    err = ((got - x.float() @ q.dequantize().T).abs().max() / got.abs().max()).item()
    lin = torch.nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    assert cpu.int4_applies(lin) == cpu.int4_works()
    assert cpu.int4_works() == (err <= 0.05), f"relative error {err:.3g}"
