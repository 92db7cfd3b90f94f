"""Attention over shaped caches against a naive per-row reference: causal mask,
sliding window, soft-cap, rows at different lengths, decode and prefill."""
from __future__ import annotations

import math

import pytest
import torch

from baton.attention import ShapedAttention
from baton.cache import KVBudget, KVSpec, ShapedKV
from baton.models.layers import AttentionLayer

H, KVH, D = 4, 2, 8


def naive(q, keys, values, pos, scale, window, softcap):
    """One row: q [T, H, D] at positions pos[t]; keys/values [W, KVH, D] for positions 0..W-1."""
    out = []
    for t in range(q.shape[0]):
        heads = []
        for h in range(H):
            kh = h // (H // KVH)
            s = (keys[:, kh] @ q[t, h]) * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            j = torch.arange(keys.shape[0])
            ok = (j <= pos[t]) & ((j > pos[t] - window) if window else True)
            s = s.masked_fill(~ok, -math.inf)
            heads.append(torch.softmax(s, -1) @ values[:, kh])
        out.append(torch.cat(heads))
    return torch.stack(out)


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0), (4, 2.0)])
@pytest.mark.parametrize("counts", [[1, 1, 1], [6, 1, 3], [9], [1]])
def test_shaped_attention_matches_naive(window, softcap, counts):
    torch.manual_seed(0)
    spec = KVSpec(num_layers=1, num_kv_heads=KVH, head_dim=D, dtype=torch.float32, device=torch.device("cpu"))
    starts = [7, 2, 11][: len(counts)] if len(counts) > 1 else [4]
    B, T = len(counts), max(counts)
    cache = ShapedKV(spec, KVBudget(1 << 24), rows=B, width=32)
    history = torch.randn(B, KVH, 32, D)
    cache.k[0].copy_(history)
    cache.v[0].copy_(-history * 0.5)
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, KVH, D), torch.randn(B, T, KVH, D)
    layer = AttentionLayer(0, D ** -0.5, window, softcap)
    out = ShapedAttention(cache, starts, counts).attend(layer, q, k, v).view(B, T, H * D)
    for b in range(B):
        n, s = counts[b], starts[b]
        keys = history[b].transpose(0, 1).clone()[: s + n]
        values = (-history[b] * 0.5).transpose(0, 1).clone()[: s + n]
        keys[s:s + n], values[s:s + n] = k[b, :n], v[b, :n]
        ref = naive(q[b, :n], keys, values, list(range(s, s + n)), D ** -0.5, window, softcap)
        assert torch.allclose(out[b, :n], ref, atol=1e-5), (b, (out[b, :n] - ref).abs().max())
        # the new K/V went to each row's own columns
        assert torch.equal(cache.k[0][b, :, s:s + n], k[b, :n].transpose(0, 1))
