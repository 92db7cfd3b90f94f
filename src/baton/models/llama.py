"""Llama-family decoder in plain PyTorch (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5).

One readable model in the gpt-fast style. The model knows nothing about batching
policy or kernels: each attention layer hands its new q/k/v to an `AttentionContext`
supplied by the caller, which writes K/V into whatever cache layout the policy uses
and returns the attention output. That keeps one model for every policy, so
benchmarks compare scheduling and nothing else.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import (AttentionContext, AttentionLayer, DecoderModel, GatedMLP, Linear, ModelConfig, RMSNorm,
                     Rotary, apply_rope, rope_inv_freq)
from .registry import Family, hf_eos, hf_rope, register


class Attention(nn.Module):
    rope_ = None  # fused in-place rotary (qkv, cos, sin, heads), set by the platform where one exists

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.spec = AttentionLayer(layer, cfg.head_dim ** -0.5, cfg.window(layer))
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # Fused QKV: one GEMM instead of three small ones.
        self.qkv = Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        # HF Llama puts a bias on o_proj too when attention_bias is set; Qwen2 does not.
        self.o = Linear(q_out, cfg.hidden_size, bias=cfg.extra.get("o_proj_bias", False))

    def forward(self, x, cos, sin, ctx: AttentionContext):
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        qkv = self.qkv.forward(x).view(B, T, H + 2 * KV, self.head_dim)
        if self.rope_ is not None:
            self.rope_(qkv, cos, sin, H + KV)
            q, k, v = qkv.split((H, KV, KV), dim=2)
        else:  # rotary on q and k together: one set of ops for both
            qk = apply_rope(qkv[:, :, : H + KV], cos, sin)
            q, k = qk.split((H, KV), dim=2)
            v = qkv[:, :, H + KV:]
        return self.o.forward(ctx.attend(self.spec, q, k, v))


class Block(nn.Module):
    attention_class = Attention  # families that differ only in attention subclass with their own
    # The platform's fused halves of this block (norm + QKV + rotary, then O + norm +
    # MLP) around the attention context; None: the code below.
    fused = None

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = self.attention_class(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, residual, cos, sin, ctx):
        """(this block's MLP output, the residual stream before it): the residual add
        is left to the next norm, which does it in the same kernel."""
        fused = self.fused
        if fused is not None:
            q, k, v, residual = fused.pre(x, residual, cos, sin)
            return fused.post(ctx.attend(self.attn.spec, q, k, v), residual)
        # Submodules' forward is called directly: nn.Module.__call__'s hook checks
        # cost ~2 us each, ~9 per layer, a tenth of a batch-1 decode step.
        h, residual = self.attn_norm.add_forward(x, residual)
        h, residual = self.mlp_norm.add_forward(self.attn.forward(h, cos, sin, ctx), residual)
        return self.mlp.forward(h), residual


class LlamaModel(DecoderModel):
    block_class = Block

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.block_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = self.make_rotary(cfg)

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> Rotary:
        return Rotary(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                logit_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """input_ids, positions: [B, T]. Returns logits (in the model's dtype; the
        sampler upcasts only what it needs) only at `logit_index` = (batch idx,
        time idx) -> [N, vocab]; all positions if None."""
        x = self.embed(input_ids)
        cos, sin = self.rotary.forward(positions, self.dtype)
        residual = None
        for block in self.layers:
            x, residual = block.forward(x, residual, cos, sin, ctx)
        if logit_index is not None:
            x, residual = x[logit_index], residual[logit_index]
        return self.lm_head.forward(self.norm.add_forward(x, residual)[0])


# ---------------------------------------------------------------- checkpoints

def config_from_hf(d: dict) -> ModelConfig:
    heads = d["num_attention_heads"]
    arch = d["model_type"]
    theta, scaling = hf_rope(d)
    window = d.get("sliding_window")
    if arch == "qwen2" and not d.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window that is off unless use_sliding_window
    layers = d["num_hidden_layers"]
    windows = []
    if window:
        # Qwen2 applies the window from layer max_window_layers on (HF's layer_types).
        types = d.get("layer_types")
        if types:
            windows = [window if t == "sliding_attention" else None for t in types]
        elif arch == "qwen2":
            first = d.get("max_window_layers", layers)
            windows = [window if i >= first else None for i in range(layers)]
        else:
            windows = [window] * layers
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=layers, num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", arch == "qwen2"), architecture=arch,
        bos_token_id=d.get("bos_token_id"), eos_token_ids=hf_eos(d), sliding_windows=windows,
        hidden_act=d.get("hidden_act", "silu"),
        extra={"o_proj_bias": arch == "llama" and bool(d.get("attention_bias", False))})


def config_from_gguf(g, arch: str) -> ModelConfig:
    """g(key, default) reads `{arch}.{key}` from the GGUF's metadata; g.meta(key) any key."""
    hidden, heads = g("embedding_length"), g("attention.head_count")
    rope_scaling = None
    if g("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    window = g("attention.sliding_window")
    layers = g("block_count")
    return ModelConfig(
        vocab_size=g("vocab_size") or g.vocab_size, hidden_size=hidden, intermediate_size=g("feed_forward_length"),
        num_layers=layers, num_heads=heads, num_kv_heads=g("attention.head_count_kv") or heads,
        head_dim=g("attention.key_length") or hidden // heads,
        rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=g("rope.freq_base", 10000.0),
        rope_scaling=rope_scaling, max_position_embeddings=g("context_length", 2048),
        tie_word_embeddings="output.weight" not in g.tensor_names,
        attention_bias="blk.0.attn_q.bias" in g.tensor_names, architecture=arch,
        bos_token_id=g.meta("tokenizer.ggml.bos_token_id"), eos_token_ids=g.eos_token_ids(),
        sliding_windows=[window] * layers if window else [],
        extra={"o_proj_bias": "blk.0.attn_output.bias" in g.tensor_names})


def hf_weight_map(cfg: ModelConfig, qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  gate_up=("mlp.gate_proj", "mlp.up_proj")) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensors it is made of (concatenated on dim 0).
    `qkv`, `gate_up`: the HF modules fused into our qkv and gate_up (one each where
    the checkpoint already fuses them, as Phi-3's does)."""
    m = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        m[o + "attn_norm.weight"] = [p + "input_layernorm.weight"]
        m[o + "mlp_norm.weight"] = [p + "post_attention_layernorm.weight"]
        m[o + "attn.qkv.weight"] = [p + f"{x}.weight" for x in qkv]
        if cfg.attention_bias:
            m[o + "attn.qkv.bias"] = [p + f"{x}.bias" for x in qkv]
        m[o + "attn.o.weight"] = [p + "self_attn.o_proj.weight"]
        if cfg.extra.get("o_proj_bias"):
            m[o + "attn.o.bias"] = [p + "self_attn.o_proj.bias"]
        m[o + "mlp.gate_up.weight"] = [p + f"{x}.weight" for x in gate_up]
        m[o + "mlp.down.weight"] = [p + "mlp.down_proj.weight"]
    return m


# GGUF tensor names (llama.cpp's) -> HF names, shared by the families llama.cpp
# writes in this layout (per-block names after "blk.N.").
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rope(w, n_heads: int):
    """llama.cpp's converter interleaves the two rotary halves of Q/K rows for the
    "llama" architecture; undo it to get HF's rotate_half layout (numpy, any dtype)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_fixup(cfg: ModelConfig, hf_name: str, arr):
    """Undo what llama.cpp's converter changed for this family (applied to dequantized
    weights and to raw int4 parts alike, row-wise)."""
    if cfg.architecture == "llama":
        if hf_name.endswith("q_proj.weight"):
            return unpermute_rope(arr, cfg.num_heads)
        if hf_name.endswith("k_proj.weight"):
            return unpermute_rope(arr, cfg.num_kv_heads)
    return arr


register(Family(
    name="llama", architectures=("llama", "mistral", "qwen2"), model_class=LlamaModel,
    config_from_hf=config_from_hf, hf_weight_map=hf_weight_map,
    gguf_architectures=("llama", "mistral", "qwen2"), config_from_gguf=config_from_gguf,
    gguf_names=GGUF_NAMES, gguf_fixup=gguf_fixup))
