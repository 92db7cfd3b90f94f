"""Attention over vector-shaped caches: the contexts the model hands q/k/v to, and
the kernel they run.

- ShapedAttention: rows 0..B-1 of one ShapedKV (the running batch, or a one-row
  cache being prefilled); each row writes its new tokens at its own length.
- SegmentedAttention: several such segments in one forward, their tokens laid
  out flat so the linear layers read each weight once for all of them.

A layer's window (sliding-window attention) and soft-cap are one more mask
condition and one more elementwise op here; the cache layout does not change.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import platform
from .cache import ShapedKV
from .models.layers import AttentionLayer

NEG_INF = float("-inf")


def width_bucket(n: int) -> int:
    """n rounded up to a quarter octave (64, 80, 96, 112, 128, 160, ...); steps of 8 up to 64."""
    if n <= 64:
        return -(-n // 8) * 8
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def attention_over_cache(q, keys, values, mask, scale, softcap: Optional[float] = None):
    """Grouped-query attention written as two matmuls.

    q: [B, T, H, D]; keys/values: [B, KVH, W, D] (may be a strided view of a larger
    cache); mask: additive float [B, 1, T, W] or None. Returns [B, T, H*D] in q's dtype.
    Queries are viewed as [B, KVH, G*T, D] so each KV head is read once for its group,
    with no repeat_interleave of the cache.
    """
    B, T, H, D = q.shape
    if keys.dtype != torch.float32 and platform.upcast_attention(B, T, keys.shape[2], keys.device):
        keys, values = keys.float(), values.float()
    kvh = keys.shape[1]
    G = H // kvh
    qg = q.view(B, T, kvh, G, D).permute(0, 2, 3, 1, 4).reshape(B, kvh, G * T, D).to(keys.dtype)
    scores = torch.matmul(qg, keys.transpose(-1, -2))
    W = keys.shape[2]
    if softcap is not None:
        scores = torch.tanh(scores * (scale / softcap)) * softcap
        scale = 1.0
    if mask is None:
        scores = scores * scale if scale != 1.0 else scores
    elif T == 1:  # decode: the [B, 1, 1, W] mask broadcasts over heads directly
        scores = torch.add(mask, scores, alpha=scale)
    else:
        scores = torch.add(mask.unsqueeze(1), scores.view(B, kvh, G, T, W), alpha=scale).view(B, kvh, G * T, W)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values)  # [B, KVH, G*T, D]
    return out.view(B, kvh, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D).to(q.dtype)


class ShapedAttention:
    """AttentionContext over rows 0..B-1 of a ShapedKV, columns 0..W-1."""

    def __init__(self, cache: ShapedKV, starts: list[int], counts: list[int], fused: bool = True):
        device = cache.device
        B = len(starts)
        T = max(max(counts), 1)
        self.cache, self.B, self.T = cache, B, T
        self.W = max(s + c for s, c in zip(starts, counts)) if any(counts) else max(starts) + 1
        self.W = max(self.W, 1)
        starts_t = torch.tensor(starts, device=device)
        self.starts_t = starts_t
        # One row feeding a run of tokens (a prefill or a chunk of one): contiguous
        # columns, written by slicing and attended with SDPA's fused kernel.
        self.span = (starts[0], starts[0] + T) if B == 1 and T > 1 and counts[0] == T else None
        if self.span is None and not platform.upcast_attention(B, T, self.W, device):
            if self.W < cache.width <= 2 * self.W:
                # Attend over every allocated column: a slice of rows of the full-width cache
                # is contiguous, which spares the copy the CPU's bf16 batched matmul makes of
                # a strided operand (K^T and V, every layer); up to 2x masked columns cost less.
                self.W = cache.width
            else:
                # The bf16 matmul keeps state per shape that is never freed (see
                # runner.shape_bucket), and rows x width take many values: widths are rounded
                # to quarter octaves (at most 25% more columns, all masked).
                self.W = min(cache.width, width_bucket(self.W))
        # One row decoding one token (Orca's requests, a pool entry's last token): the
        # columns attended are exactly the row's tokens, so no mask and a slice write.
        self.single = (starts[0], starts[0] + 1) if B == 1 and counts == [1] and self.W == starts[0] + 1 else None
        self.decode_kernel = None
        if T == 1 and all(c == 1 for c in counts):
            # Decode: every row writes one token at its own length.
            self.dst = (torch.arange(B, device=device), starts_t)
            self.src = None
            # The fused kernel writes and attends per row, from the rows' lengths alone.
            if fused:
                self.decode_kernel = platform.decode_attention_kernel(cache.dtype, device)
        else:
            b_idx = [b for b in range(B) for _ in range(counts[b])]
            t_idx = [t for b in range(B) for t in range(counts[b])]
            b_t = torch.tensor(b_idx, dtype=torch.long, device=device)
            t_t = torch.tensor(t_idx, dtype=torch.long, device=device)
            self.dst = (b_t, starts_t[b_t] + t_t)
            self.src = (b_t, t_t)
        # Token t of row b sits at column (= position) starts[b]+t and sees columns
        # <= its own; the rest (other queries' padding, stale data of a reused row)
        # is masked out. A sliding window also hides columns <= position - window.
        self.cols = torch.arange(self.W, device=device).view(1, 1, self.W)
        self.limit = (starts_t.view(B, 1) + torch.arange(T, device=device).view(1, T)).unsqueeze(-1)  # [B, T, 1]
        self._masks: dict = {}

    def allowed(self, window: Optional[int]) -> torch.Tensor:
        """Boolean [B, 1, T, W]: which columns each token may attend."""
        key = ("allowed", window)
        if key not in self._masks:
            ok = self.cols <= self.limit
            if window is not None:
                ok = ok & (self.cols > self.limit - window)
            self._masks[key] = ok.unsqueeze(1)
        return self._masks[key]

    def mask(self, window: Optional[int]) -> torch.Tensor:
        """Additive float form of allowed(window)."""
        key = ("mask", window)
        if key not in self._masks:
            allowed = self.allowed(window)
            self._masks[key] = torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, NEG_INF)
        return self._masks[key]

    def attend(self, layer: AttentionLayer, q, k, v):
        kc, vc = self.cache.k[layer.index], self.cache.v[layer.index]
        if self.src is None and self.decode_kernel is not None and q.dtype == torch.float32:
            return self.decode_kernel(q, kc, vc, k, v, self.starts_t, layer.scale, layer.window or 0,
                                      layer.softcap or 0.0)
        k, v = k.to(kc.dtype), v.to(kc.dtype)
        window = layer.window if layer.window is not None and layer.window < self.W else None
        if self.span is not None and layer.softcap is None:
            a, b = self.span
            kc[0, :, a:b] = k[0].transpose(0, 1)
            vc[0, :, a:b] = v[0].transpose(0, 1)
            causal = a == 0 and window is None
            mask = None if causal else self.allowed(window)[..., :b]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2).to(kc.dtype), kc[:1, :, :b], vc[:1, :, :b],
                attn_mask=mask, is_causal=causal, scale=layer.scale, enable_gqa=True)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1).to(q.dtype)
        if self.single is not None and window is None:
            a, b = self.single
            kc[0, :, a] = k[0, 0]
            vc[0, :, a] = v[0, 0]
            return attention_over_cache(q, kc[:1, :, :b], vc[:1, :, :b], None, layer.scale, layer.softcap)
        if self.src is None:
            kc[self.dst[0], :, self.dst[1]] = k[:, 0]
            vc[self.dst[0], :, self.dst[1]] = v[:, 0]
        else:
            kc[self.dst[0], :, self.dst[1]] = k[self.src]
            vc[self.dst[0], :, self.dst[1]] = v[self.src]
        W = self.W
        return attention_over_cache(q, kc[: self.B, :, :W], vc[: self.B, :, :W], self.mask(window),
                                    layer.scale, layer.softcap)


class SegmentedAttention:
    """Several segments in one forward. Their tokens are laid out flat ([1, N]), so
    the linear layers read each weight once for all of them (decode rows and prompt
    chunks alike); attention runs per segment, each over its own shaped cache."""

    def __init__(self, parts: list[tuple[Optional[ShapedAttention], int, int]]):
        self.parts = parts  # (context, B, T) per segment, in token order; None: padding

    def attend(self, layer: AttentionLayer, q, k, v):
        outs, off = [], 0
        for ctx, B, T in self.parts:
            n = B * T
            if ctx is None:  # padding tokens: attend to nothing, write no KV
                outs.append(q.new_zeros(1, n, q.shape[2] * q.shape[3]))
            else:
                piece = [x[0, off:off + n].view(B, T, *x.shape[2:]) for x in (q, k, v)]
                outs.append(ctx.attend(layer, *piece).reshape(1, n, -1))
            off += n
        return torch.cat(outs, dim=1)
