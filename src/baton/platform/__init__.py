"""Device-specific choices, behind one interface the engine, the model runner
and the loader call: `cpu.py` and `cuda.py` hold the details."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import cpu, cuda

Device = Union[str, torch.device]


def resolve_device(device: Device) -> torch.device:
    """The device, checked: a clear error when CUDA is asked for and absent."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu or cuda[:N]; got {device!r}") from None
    if device.type == "cuda":
        cuda.check_available(device)
    elif device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda[:N]; got {str(device)!r}")
    return device


def configure(device: Device, num_threads: Optional[int] = None) -> None:
    """Process setup where an engine starts (see cpu.configure_process)."""
    cpu.configure_process(num_threads)


def prepare_model(model, quant_blocks: Optional[dict] = None, prepack: bool = True,
                  quantization: Optional[str] = None, native: bool = True) -> dict:
    """Install the device's kernels on a loaded model's layers (the first use of
    oneDNN in a process that loads a model: its cache caps apply from here).
    quant_blocks: a GGUF's quantized weights by module name; quantization:
    "int8" / "int4" to quantize the linear layers now (platform/quant.py);
    native: baton's C++ kernels where they apply (False: the eager reference path)."""
    if model.device.type == "cpu":
        cpu.configure_process()
        return cpu.prepare_model(model, quant_blocks, prepack, quantization, native)
    if quantization is not None:
        return cuda.quantize_model(model, quantization)
    return {"prepacked": 0, "int4": 0}


def decode_attention_kernel(cache_dtype: torch.dtype, device: torch.device):
    """A fused kernel that writes each row's new K/V at its length and attends
    columns up to it (per-row lengths, no mask), or None: the eager path."""
    return cpu.decode_attention_kernel(cache_dtype) if device.type == "cpu" else None


def available_memory(device: Device) -> int:
    device = torch.device(device)
    return cuda.available_memory(device) if device.type == "cuda" else cpu.available_memory()


def upcast_attention(B: int, T: int, W: int, device: torch.device) -> bool:
    return device.type == "cpu" and cpu.upcast_attention(B, T, W)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    return cpu.greedy_argmax(logits) if logits.device.type == "cpu" else logits.argmax(dim=-1)
