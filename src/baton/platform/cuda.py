"""CUDA: what differs from the CPU path. No prepacking or int4 (cuBLAS takes the
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
