"""Group-wise weight quantization, in llama.cpp's two simplest block formats, so a
GGUF's blocks are used as they are and an HF checkpoint quantized at load time
gets the same layout:

- q4_1 (`--quantization int4`): per row, blocks of 32 weights as w = d * q + m,
  q in 0..15, packed two per byte (low nibbles elements 0..15 of the block, high
  nibbles 16..31, as ggml stores them); d and m per block, float16 values (as ggml
  stores them) held as float32.
- q8_0 (`--quantization int8`): w = d * q, q in -127..127, d = max|w| / 127.

`dequantize()` is the eager reference; the CPU kernels (platform/native.py)
compute with these blocks directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

GROUP = 32
KINDS = {"int4": "q4_1", "int8": "q8_0"}  # --quantization -> block format


def check_quantization(q: Optional[str]) -> Optional[str]:
    """The --quantization value, checked: None (or "none"), "int8" or "int4"."""
    if q in (None, "none"):
        return None
    if q not in KINDS:
        raise ValueError(f"quantization must be one of none, {', '.join(KINDS)}; got {q!r}")
    return q


@dataclass
class QuantWeights:
    kind: str                          # "q4_1" or "q8_0"
    qs: torch.Tensor                   # q4_1: uint8 [N, K/2]; q8_0: int8 [N, K]
    d: torch.Tensor                    # float32 [N, K/32] (float16 values)
    m: Optional[torch.Tensor] = None   # q4_1 only: float32 [N, K/32] (float16 values)

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.qs.shape
        return n, k * 2 if self.kind == "q4_1" else k

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def unpacked(self) -> torch.Tensor:
        """q as integers [N, K] (q4_1: 0..15; q8_0: -127..127)."""
        if self.kind == "q8_0":
            return self.qs
        n, half = self.qs.shape
        blocks = self.qs.view(n, half // 16, 16)
        return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).view(n, half * 2)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [N, K]: d * q (+ m), each product rounded to float32."""
        n, k = self.shape
        q = self.unpacked().float().view(n, k // GROUP, GROUP)
        w = q * self.d.unsqueeze(-1)
        if self.m is not None:
            w = w + self.m.unsqueeze(-1)
        return w.view(n, k)


def quantize(w: torch.Tensor, kind: str) -> QuantWeights:
    """Round-to-nearest group-wise quantization of a [N, K] weight (K % 32 == 0)."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"cannot quantize a weight with {k} input features in groups of {GROUP}")
    b = w.detach().float().cpu().view(n, k // GROUP, GROUP)
    # Scales and mins are float16 values, as ggml stores them (the kernels read them so).
    if kind == "q8_0":
        d = (b.abs().amax(-1) / 127).half().float()
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round(b * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return QuantWeights("q8_0", q.view(n, k).contiguous(), d.contiguous())
    if kind == "q4_1":
        lo, hi = b.amin(-1).half().float(), b.amax(-1)
        d = ((hi - lo) / 15).half().float()
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round((b - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
        packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
        return QuantWeights("q4_1", packed.contiguous(), d.contiguous(), lo.contiguous())
    raise ValueError(f"unknown block format {kind!r}")


def take_quantized_values(linear, kind: str) -> None:
    """The layer's weight, in place, becomes its quantize -> dequantize values: the
    quantized model's results where no kernel computes on the blocks (no saving)."""
    q = quantize(linear.weight, kind)
    linear.weight.data.copy_(q.dequantize().to(linear.weight.device, linear.weight.dtype))


def from_gguf_blocks(kind: str, blocks: np.ndarray) -> QuantWeights:
    """A GGUF tensor's raw blocks, [N, K/32, bytes per block], as QuantWeights
    (copies: the file's memory map is closed after loading)."""
    n, nb, _ = blocks.shape
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = np.ascontiguousarray(blocks[..., 4:]).reshape(n, nb * 16)
        return QuantWeights(kind, torch.from_numpy(qs), torch.from_numpy(d), torch.from_numpy(m))
    if kind == "q8_0":
        qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, nb * 32)
        return QuantWeights(kind, torch.from_numpy(qs), torch.from_numpy(d))
    raise ValueError(f"unknown block format {kind!r}")


def concat_rows(parts: list[QuantWeights]) -> QuantWeights:
    """Row-wise concatenation (fused q/k/v or gate/up)."""
    kind = parts[0].kind
    if any(p.kind != kind for p in parts):
        raise ValueError("cannot fuse weights of different block formats")
    cat = lambda name: torch.cat([getattr(p, name) for p in parts]) if getattr(parts[0], name) is not None else None  # noqa: E731
    return QuantWeights(kind, cat("qs"), cat("d"), cat("m"))
