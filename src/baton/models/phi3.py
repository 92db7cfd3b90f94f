"""Phi-3 / Phi-3.5 (and Phi-4-mini, model_type "phi3"): the Llama layout with q/k/v
and gate/up fused in the checkpoint itself (qkv_proj, gate_up_proj: they map 1:1
onto our fused Linears), rotary on the first partial_rotary_factor of each head,
and LongRoPE ("longrope", formerly "su") for the long-context models.

LongRoPE. HF scales the inverse frequencies by short_factor while the sequence is
within original_max_position_embeddings and by long_factor beyond it, and multiplies
cos/sin by sqrt(1 + log(s) / log(original)), s = max_position_embeddings / original
(or the config's factor / attention_factor). HF decides by the largest position in
the forward, for all of its tokens. Positions here are per row, and rows of
different sequences share forwards, so the choice is made per token instead:
position p uses the long factors iff p >= original_max_position_embeddings. That
keeps a sequence's result independent of its batch, and:
- within the original context it is HF exactly (all short);
- past it, it is what HF's model forward does with a cache, token by token (each
  decode step's seq_len is its own position + 1):
  keys cached before the crossing keep their short-factor rotation;
- it differs from HF's `generate`, which drops the cache once the sequence is longer
  than the original context and recomputes every key with the long factors
  (Phi3ForCausalLM.prepare_inputs_for_generation), and from a single HF forward over
  a prompt longer than the original context (long factors from its first token).
  Matching those would take re-prefilling the sequence at the crossing (an engine
  decision), with the choice made per sequence rather than per token.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import llama
from .layers import AttentionContext, AttentionLayer, Linear, ModelConfig, Rotary, apply_rope, rope_inv_freq
from .registry import Family, hf_eos, register


class LongRotary(Rotary):
    """Rotary with LongRoPE's two frequency sets: `inv_freq` (short factors) for
    positions below `original`, `long_inv_freq` from it on."""

    def __init__(self, short_inv_freq: torch.Tensor, long_inv_freq: torch.Tensor, original: int,
                 attention_factor: float):
        super().__init__(short_inv_freq, attention_factor)
        self.original = original
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        p = positions.unsqueeze(-1)
        inv_freq = torch.where(p >= self.original, self.long_inv_freq, self.inv_freq)
        freqs = p.float() * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return torch.cat((cos, cos), -1).to(dtype).unsqueeze(2), torch.cat((-sin, sin), -1).to(dtype).unsqueeze(2)


def longrope_inv_freq(rotary_dim: int, theta: float, factors: list) -> torch.Tensor:
    """HF's _compute_longrope_parameters: 1 / (factor_i * theta ** (2i / dim)), float32."""
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta ** shape)


def make_rotary(cfg: ModelConfig) -> Rotary:
    rd, lr = cfg.extra["rotary_dim"], cfg.extra.get("longrope")
    if lr is None:
        return Rotary(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, rotary_dim=rd))
    return LongRotary(longrope_inv_freq(rd, cfg.rope_theta, lr["short_factor"]),
                      longrope_inv_freq(rd, cfg.rope_theta, lr["long_factor"]),
                      lr["original_max_position_embeddings"], lr["attention_factor"])


def rope_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rotary_dim = cfg.extra["rotary_dim"]
        self.spec = AttentionLayer(layer, cfg.head_dim ** -0.5, cfg.window(layer))
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv = Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=False)
        self.o = Linear(q_out, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        B, T, _ = x.shape
        qkv = self.qkv.forward(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        qk = rope_partial(qkv[:, :, : self.n_heads + self.n_kv], cos, sin, self.rotary_dim)
        q, k = qk.split((self.n_heads, self.n_kv), dim=2)
        v = qkv[:, :, self.n_heads + self.n_kv:]
        return self.o.forward(ctx.attend(self.spec, q, k, v))


class Block(llama.Block):
    attention_class = Attention


class Phi3Model(llama.LlamaModel):
    """LlamaModel's forward over Phi-3 blocks and (Long)RoPE."""

    block_class = Block
    make_rotary = staticmethod(make_rotary)


# ---------------------------------------------------------------- checkpoints

def longrope_params(short: list, long: list, max_pos: int, original: int, factor: Optional[float] = None,
                    attention_factor: Optional[float] = None) -> dict:
    factor = factor or max_pos / original
    if attention_factor is None:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    return dict(short_factor=[float(x) for x in short], long_factor=[float(x) for x in long],
                original_max_position_embeddings=int(original), attention_factor=float(attention_factor))


def config_from_hf(d: dict) -> ModelConfig:
    hidden, heads, layers = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
    head_dim = d.get("head_dim") or hidden // heads
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type"))
    if kind in ("su", "yarn"):  # older names HF's Phi3Config reads as longrope
        kind = "longrope"
    theta = d.get("rope_theta") or rope.get("rope_theta", 10000.0)
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
    max_pos = d.get("max_position_embeddings", 4096)
    extra: dict = {"rotary_dim": int(head_dim * partial)}
    scaling = None
    if kind == "longrope":
        # HF gives the top-level original_max_position_embeddings priority over the rope dict's.
        original = d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
            or max_pos
        extra["longrope"] = longrope_params(rope["short_factor"], rope["long_factor"], max_pos, original,
                                            rope.get("factor"), rope.get("attention_factor"))
    elif kind not in (None, "default"):
        scaling = rope
    window = d.get("sliding_window")
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=hidden, intermediate_size=d["intermediate_size"],
        num_layers=layers, num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim, rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_pos, tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=False, architecture="phi3", bos_token_id=d.get("bos_token_id"), eos_token_ids=hf_eos(d),
        sliding_windows=[window] * layers if window else [], hidden_act=d.get("hidden_act", "silu"), extra=extra)


def hf_weight_map(cfg: ModelConfig) -> dict[str, list[str]]:
    # The checkpoint fuses qkv and gate_up already (gate rows first, as our GatedMLP).
    return llama.hf_weight_map(cfg, qkv=["self_attn.qkv_proj"], gate_up=["mlp.gate_up_proj"])


def config_from_gguf(g, arch: str) -> ModelConfig:
    """llama.cpp's phi3: LongRoPE factors are the tensors rope_factors_long/short, the
    original context rope.scaling.original_context_length and the attention factor
    rope.scaling.attn_factor; a sliding window of 0 means none (Phi-4)."""
    hidden, heads, layers = g("embedding_length"), g("attention.head_count"), g("block_count")
    head_dim = g("attention.key_length") or hidden // heads
    max_pos = g("context_length", 4096)
    extra: dict = {"rotary_dim": g("rope.dimension_count") or head_dim}
    names = g.tensor_names
    if "rope_factors_long.weight" in names and "rope_factors_short.weight" in names:
        original = g("rope.scaling.original_context_length") or max_pos
        extra["longrope"] = longrope_params(g.f.tensor("rope_factors_short.weight").tolist(),
                                            g.f.tensor("rope_factors_long.weight").tolist(), max_pos, original,
                                            attention_factor=g("rope.scaling.attn_factor"))
    window = g("attention.sliding_window")
    return ModelConfig(
        vocab_size=g("vocab_size") or g.vocab_size, hidden_size=hidden, intermediate_size=g("feed_forward_length"),
        num_layers=layers, num_heads=heads, num_kv_heads=g("attention.head_count_kv") or heads,
        head_dim=head_dim, rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=g("rope.freq_base", 10000.0), max_position_embeddings=max_pos,
        tie_word_embeddings="output.weight" not in names, attention_bias=False, architecture="phi3",
        bos_token_id=g.meta("tokenizer.ggml.bos_token_id"), eos_token_ids=g.eos_token_ids(),
        sliding_windows=[window] * layers if window else [], extra=extra)


GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",  # llama.cpp keeps Phi-3's fused gate_up as ffn_up
    "ffn_down.weight": "mlp.down_proj.weight",
}


register(Family(
    name="phi3", architectures=("phi3",), model_class=Phi3Model,
    config_from_hf=config_from_hf, hf_weight_map=hf_weight_map,
    gguf_architectures=("phi3",), config_from_gguf=config_from_gguf, gguf_names=GGUF_NAMES))
