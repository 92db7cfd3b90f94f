"""CUDA: what differs from the CPU path. No prepacking, int4 or fused kernels (cuBLAS takes the
plain weights), attention stays in the cache's dtype, argmax is the plain kernel,
and the KV budget comes from free device memory."""
from __future__ import annotations

import torch


class DeviceUnavailable(ValueError):
    """The device asked for does not exist here (a clear error, not a crash later)."""


def check_available(device: torch.device) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceUnavailable(f"device {str(device)!r} asked for, but this torch ({torch.__version__}, {build}) "
                           f"sees no CUDA device; install a CUDA build of torch or use --device cpu")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA "
                           f"device(s) are visible")


def available_memory(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def quantize_model(model, quantization: str) -> dict:
    """--quantization on CUDA: each linear weight takes its quantized values
    (platform/quant.py), computed by cuBLAS in the model's dtype. The results are
    the quantized model's; no memory is saved (baton has no CUDA block kernels)."""
    from ..models.layers import Linear
    from .quant import KINDS, take_quantized_values

    n = 0
    for mod in model.modules():
        if isinstance(mod, Linear) and mod.in_features % 32 == 0:
            take_quantized_values(mod, KINDS[quantization])
            n += 1
    return {"prepacked": 0, "int4": 0, "quantized": n}
