"""Qwen3 (dense): the Llama layout plus a per-head RMSNorm on q and k (over head_dim,
before rotary), no q/k/v bias by default, and head_dim from the config (it need
not be hidden / heads)."""
from __future__ import annotations


from . import llama
from .layers import AttentionContext, Linear, ModelConfig, RMSNorm, apply_rope
from .registry import Family, register


class Attention(llama.Attention):
    """Llama's attention plus per-head RMSNorm on q and k, before rotary."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        # Unlike Qwen2, HF's Qwen3 puts attention_bias on o_proj as well.
        self.o = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        B, T, _ = x.shape
        qkv = self.qkv.forward(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split((self.n_heads, self.n_kv, self.n_kv), dim=2)
        q = apply_rope(self.q_norm.forward(q), cos, sin)
        k = apply_rope(self.k_norm.forward(k), cos, sin)
        return self.o.forward(ctx.attend(self.spec, q, k, v))


class Block(llama.Block):
    attention_class = Attention


class Qwen3Model(llama.LlamaModel):
    """LlamaModel's forward over Qwen3 blocks."""

    block_class = Block


# ---------------------------------------------------------------- checkpoints

def qwen_windows(d: dict) -> list:
    """Per-layer sliding windows of a Qwen2/Qwen3 config: off unless use_sliding_window;
    then HF's layer_types, or the layers from max_window_layers on."""
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    if not window:
        return []
    layers = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types:
        windows = [window if t == "sliding_attention" else None for t in types]
    else:
        first = d.get("max_window_layers", layers)
        windows = [window if i >= first else None for i in range(layers)]
    return windows if any(w is not None for w in windows) else []


def config_from_hf(d: dict) -> ModelConfig:
    cfg = llama.config_from_hf({**d, "sliding_window": None})
    cfg.attention_bias = bool(d.get("attention_bias", False))
    cfg.sliding_windows = qwen_windows(d)
    return cfg


def hf_weight_map(cfg: ModelConfig) -> dict[str, list[str]]:
    m = llama.hf_weight_map(cfg)
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        m[o + "attn.q_norm.weight"] = [p + "self_attn.q_norm.weight"]
        m[o + "attn.k_norm.weight"] = [p + "self_attn.k_norm.weight"]
        if cfg.attention_bias:
            m[o + "attn.o.bias"] = [p + "self_attn.o_proj.bias"]
    return m


def config_from_gguf(g, arch: str) -> ModelConfig:
    # llama.cpp's qwen3 keeps HF's rotary layout (no Q/K permutation) and writes
    # head_dim as attention.key_length; its converter writes no sliding window.
    cfg = llama.config_from_gguf(g, arch)
    cfg.sliding_windows = []
    return cfg


GGUF_NAMES = {
    **llama.GGUF_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
}


register(Family(
    name="qwen3", architectures=("qwen3",), model_class=Qwen3Model,
    config_from_hf=config_from_hf, hf_weight_map=hf_weight_map,
    gguf_architectures=("qwen3",), config_from_gguf=config_from_gguf, gguf_names=GGUF_NAMES))
