"""Llama-family decoder in plain PyTorch (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5).

One readable model in the gpt-fast style. The model knows nothing about batching
policy: each attention layer hands its new q/k/v to an `AttentionContext` supplied
by the caller, which writes K/V into whatever cache layout the policy uses and
returns the attention output. That keeps one model for every policy, so benchmarks
compare scheduling and nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol

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

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, per element byte."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


class AttentionContext(Protocol):
    """Stores new K/V for one layer and returns attention over the cache.

    q: [B, T, H, D]; k, v: [B, T, KVH, D] (rotary already applied).
    Returns [B, T, H * D].
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, with the sign of rotate_half folded into sin:
    swapping the two halves is one flip, and the multiply-add one addcmul."""
    *lead, D = x.shape
    swapped = x.view(*lead, 2, D // 2).flip(-2).view(*lead, D)
    return torch.addcmul(x * cos, swapped, sin_signed)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (accumulates in float32 for low-precision inputs).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


# At or below this many tokens the int4 GEMV beats the dense GEMM (engine decode on
# this machine: batch 6 +10%, batch 8 +10-20%, batch 12 -5%).
INT4_MAX_TOKENS = 8
_int4_mm = getattr(torch, "_weight_int4pack_mm_for_cpu", None)
_packed_linear = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None


_packable: dict[torch.dtype, bool] = {}


def _cpu_can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked GEMM runs on this CPU for `dtype`: its bf16 path
    needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT and raises elsewhere (seen on an AVX2
    Zen 3 host), so probe once with a tiny weight instead of parsing CPU flags."""
    if dtype not in _packable:
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
            _packed_linear(torch.zeros(1, 16, dtype=dtype), w, None, "none", [], "")
            _packable[dtype] = True
        except RuntimeError:
            _packable[dtype] = False
    return _packable[dtype]


def pack_linear_weight(w: torch.Tensor, batch_hint: int = 32) -> Optional[torch.Tensor]:
    """`w` ([out, in]) reordered into oneDNN's blocked layout for `packed_linear`,
    or None where that GEMM does not apply (not CPU, not bf16/fp32, no oneDNN, or
    a CPU whose oneDNN lacks the dtype's kernel)."""
    if _packed_linear is None or w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float32):
        return None
    if not _cpu_can_pack(w.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)


def packed_linear(x2d: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2d @ W.T (+ bias) with W from pack_linear_weight."""
    return _packed_linear(x2d, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that can also hold its weight as packed int4 (from a GGUF Q4_1
    tensor: groups of 32 with scale and min, mapped without further loss), used when
    few tokens pass through. Small-batch decode is bound by reading weights, and
    int4 reads 4x fewer bytes than bf16; larger batches use the dense weight."""

    int4 = None  # (packed weight, scales-and-zeros, group size)
    int4_max_tokens = INT4_MAX_TOKENS
    packed = None  # (weight reordered for oneDNN (CPU), bias), see prepack

    def prepack(self) -> bool:
        """Keep a copy of the weight in oneDNN's blocked layout. On CPU,
        F.linear on the plain [out, in] weight ran 1.1-3.7x slower than oneDNN's
        prepacked GEMM at 1-32 tokens (bf16 and fp32; the lm_head GEMV most of
        all), for the same weights and arithmetic."""
        packed = pack_linear_weight(self.weight)
        if packed is None:
            return False
        self.packed = (packed, self.bias)
        return True

    def attach_int4(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int) -> bool:
        """q: [N, K] ints 0..15; d, m: [N, K/group] with w = d*q + m."""
        if self.weight.dtype != torch.bfloat16 or self.weight.device.type != "cpu" or self.bias is not None:
            return False  # the CPU int4 kernel is only fast with bf16 activations, and has no bias
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 8)
        # The kernel computes (q - 8) * scale + zero, so zero = m + 8 * d.
        sz = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(torch.bfloat16).contiguous()
        self.int4 = (packed, sz, group)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hot path at small batch: attributes read here are plain ones (parameters
        # go through nn.Module.__getattr__), so the packed bias travels with `packed`.
        if self.int4 is not None and x.numel() <= self.int4_max_tokens * self.in_features:
            packed, sz, group = self.int4
            y = _int4_mm(x.reshape(-1, self.in_features), packed, group, sz)
            return y.view(*x.shape[:-1], self.out_features)
        if self.packed is not None:
            weight, bias = self.packed
            y = packed_linear(x.reshape(-1, self.in_features), weight, bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # Fused QKV: one GEMM instead of three small ones.
        self.qkv = Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        self.o = Linear(q_out, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        B, T, _ = x.shape
        qkv = self.qkv.forward(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        # Rotary on q and k together: one set of ops for both.
        qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], cos, sin)
        q, k = qk.split((self.n_heads, self.n_kv), dim=2)
        v = qkv[:, :, self.n_heads + self.n_kv:]
        return self.o.forward(ctx.attend(self.layer, q, k, v))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up.forward(x).chunk(2, dim=-1)
        return self.down.forward(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, ctx):
        # Submodules' forward is called directly: nn.Module.__call__'s hook checks
        # cost ~2 us each, ~9 per layer, a tenth of a batch-1 decode step.
        x = x + self.attn.forward(self.attn_norm.forward(x), cos, sin, ctx)
        return x + self.mlp.forward(self.mlp_norm.forward(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def prepack(self) -> int:
        """Prepack every linear layer's weight for the CPU GEMM (see Linear.prepack);
        returns how many were packed (0 off CPU)."""
        return sum(m.prepack() for m in self.modules() if isinstance(m, Linear))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def rope(self, positions: torch.Tensor):
        # Angles in float32 for every position in the batch (positions are per row).
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        dt = self.dtype
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), -1).to(dt).unsqueeze(2), torch.cat((-sin, sin), -1).to(dt).unsqueeze(2)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        logit_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """input_ids, positions: [B, T]. Returns logits (in the model's dtype; the
        sampler upcasts only what it needs) only at `logit_index` = (batch idx,
        time idx) -> [N, vocab]; all positions if None."""
        x = self.embed(input_ids)
        cos, sin = self.rope(positions)
        for block in self.layers:
            x = block.forward(x, cos, sin, ctx)
        x = x[logit_index] if logit_index is not None else x
        return self.lm_head(self.norm(x))


FP32_ATTENTION_MAX_TOKENS = 8    # query rows (B*T)
FP32_ATTENTION_MAX_KEYS = 2048   # cached columns over all rows (B*W)


def upcast_attention(B: int, T: int, W: int, device: torch.device) -> bool:
    """Whether attention over a [B, kv_heads, W, D] low-precision cache slice runs
    in float32. With few query rows, the CPU's bf16 batched matmul has a large
    fixed cost and copies strided operands, and casting the slice is cheaper
    (38 vs 47 us per layer at batch 1, 128 columns); once the slice is large the
    cast costs more than it saves (engine decode at batch 8: 565 vs 544 tok/s at
    ~110 columns, 434 vs 455 at ~370)."""
    return device.type == "cpu" and B * T <= FP32_ATTENTION_MAX_TOKENS and B * W <= FP32_ATTENTION_MAX_KEYS


def attention_over_cache(q, keys, values, mask, scale):
    """Grouped-query attention written as two matmuls.

    q: [B, T, H, D]; keys/values: [B, KVH, W, D] (may be a strided view of a larger
    cache); mask: additive float [B, 1, T, W] or None. Returns [B, T, H*D] in q's dtype.
    Queries are viewed as [B, KVH, G*T, D] so each KV head is read once for its group,
    with no repeat_interleave of the cache.
    """
    B, T, H, D = q.shape
    if keys.dtype != torch.float32 and upcast_attention(B, T, keys.shape[2], keys.device):
        keys, values = keys.float(), values.float()
    kvh = keys.shape[1]
    G = H // kvh
    qg = q.view(B, T, kvh, G, D).permute(0, 2, 3, 1, 4).reshape(B, kvh, G * T, D).to(keys.dtype)
    scores = torch.matmul(qg, keys.transpose(-1, -2))
    W = keys.shape[2]
    if mask is None:
        scores = scores * scale
    elif T == 1:  # decode: the [B, 1, 1, W] mask broadcasts over heads directly
        scores = torch.add(mask, scores, alpha=scale)
    else:
        scores = torch.add(mask.unsqueeze(1), scores.view(B, kvh, G, T, W), alpha=scale).view(B, kvh, G * T, W)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values)  # [B, KVH, G*T, D]
    return out.view(B, kvh, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D).to(q.dtype)
