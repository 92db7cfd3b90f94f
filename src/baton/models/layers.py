"""What the decoder families share: the config, the seam to the caller's KV cache
(AttentionContext), linear layers, norms, rotary embeddings and MLPs.

Layers say what they compute. Which kernel runs a Linear on a given device
(oneDNN prepacking, quantized blocks, ...) is chosen by `baton.platform`, which
installs a kernel on the layer; with none, it is plain F.linear (the reference).
Likewise the platform may hand norms, the MLP's activation and the rotary a
fused-kernel module (`native`: platform/native.py); without one they run the
eager PyTorch below, the reference those kernels are tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    architecture: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Per layer: the sliding window (keys a query may see, itself included) or None
    # for global attention; empty = every layer global.
    sliding_windows: list = field(default_factory=list)
    hidden_act: str = "silu"
    # Families that need more (Gemma's soft-caps, Phi-3's LongRoPE factors, ...)
    # keep their fields here, read by their own model file.
    extra: dict = field(default_factory=dict)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, per element byte."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def window(self, layer: int) -> Optional[int]:
        return self.sliding_windows[layer] if self.sliding_windows else None


@dataclass(frozen=True)
class AttentionLayer:
    """What attention one layer computes, beyond q/k/v: handed to the context with
    them, so the cache layout never needs to know the family."""
    index: int                       # the layer's KV in the cache
    scale: float                     # scores multiplier (head_dim ** -0.5 unless the family says)
    window: Optional[int] = None     # sliding window: a query sees its last `window` keys
    softcap: Optional[float] = None  # Gemma 2: scores = cap * tanh(scores / cap)


class AttentionContext(Protocol):
    """Stores new K/V for one layer and returns attention over the cache.

    q: [B, T, H, D]; k, v: [B, T, KVH, D] (rotary already applied).
    Returns [B, T, H * D].
    """

    def attend(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------- linear

class Linear(nn.Linear):
    """nn.Linear whose kernel a platform may replace (`kernel(x2d) -> y2d`); the
    plain F.linear is the fallback and the reference kernels are tested against."""

    kernel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def dense_weight(self) -> torch.Tensor:
        """The layer's weight values as a dense [out, in] tensor: the parameter, or,
        where the platform's kernel holds them instead (quantized blocks, bf16
        values) and the parameter was freed, the kernel's copy."""
        if self.weight.numel() or self.kernel is None:
            return self.weight
        return self.kernel.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel is not None:
            if getattr(kernel, "nd", False):  # takes [..., in] as it is
                return kernel(x)
            return kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    """RMSNorm; `offset` 1.0 gives Gemma's (1 + weight) form (weights stored as w - 1)."""

    native = None  # fused kernels (set by the platform for float32 on CPU)

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim) if not offset else torch.zeros(dim))
        self._scale: Optional[torch.Tensor] = None

    def add_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]):
        """(norm(x + residual), x + residual); with residual None, (norm(x), x). The
        fused kernel adds into `residual` in place: it must be the stream's own tensor."""
        if residual is None:
            return self.forward(x), x
        native = self.native
        if native is not None:
            return native.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = x + residual
        return self.forward(residual), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = self.native
        if native is not None:
            return native.rms_norm(x, self.weight, self.eps)
        if not self.offset:
            # One fused kernel (accumulates in float32 for low-precision inputs).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Gemma computes in float32 and multiplies by (1 + w) before casting back.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


# ---------------------------------------------------------------- rotary

def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None,
                  rotary_dim: Optional[int] = None) -> torch.Tensor:
    """Inverse frequencies for default, linear and llama3 scaling (LongRoPE is Phi-3's
    own, see phi3.py). float32, [rotary_dim / 2]."""
    dim = rotary_dim or head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        # Llama 3.1 frequency-dependent scaling (same formula as HF transformers).
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
    return inv_freq.float()


class Rotary(nn.Module):
    """cos / sin tables for per-row positions ([B, T] -> [B, T, 1, D]), computed in
    float32 each forward (positions are per row, so no table is shared by rows)."""

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float = 1.0):
        super().__init__()
        self.attention_factor = attention_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return torch.cat((cos, cos), -1).to(dtype).unsqueeze(2), torch.cat((-sin, sin), -1).to(dtype).unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, with the sign of rotate_half folded into sin:
    swapping the two halves is one flip, and the multiply-add one addcmul."""
    *lead, D = x.shape
    swapped = x.view(*lead, 2, D // 2).flip(-2).view(*lead, D)
    return torch.addcmul(x * cos, swapped, sin_signed)


# ---------------------------------------------------------------- MLP

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused in one GEMM (SwiGLU, GeGLU)."""

    act_mul = None  # fused act(gate) * up on [..., 2I] (set by the platform where one exists)

    def __init__(self, hidden: int, intermediate: int, act: str = "silu"):
        super().__init__()
        self.gate_up = Linear(hidden, 2 * intermediate, bias=False)
        self.down = Linear(intermediate, hidden, bias=False)
        self.act = activation(act)
        self.act_name = act

    def forward(self, x):
        act_mul = self.act_mul
        if act_mul is not None:
            return self.down.forward(act_mul(self.gate_up.forward(x)))
        gate, up = self.gate_up.forward(x).chunk(2, dim=-1)
        return self.down.forward(self.act(gate) * up)


# ---------------------------------------------------------------- the model shell

class DecoderModel(nn.Module):
    """What every family's model shares: the call the model runner makes,
    dtype/device, and the per-layer attention descriptions."""

    cfg: ModelConfig

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def linears(self):
        return [m for m in self.modules() if isinstance(m, Linear)]
