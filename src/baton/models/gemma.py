"""Gemma 2 and Gemma 3 (text) decoders.

What they add to the Llama layout (checked against transformers' modeling_gemma2.py
and modeling_gemma3.py):
- embeddings scaled by sqrt(hidden_size), rounded to the model dtype first;
- (1 + w) RMSNorms, computed in float32 (RMSNorm(offset=1.0)), four per block:
  before and after attention, before and after the MLP (the "after" norms are on
  the branch, before the residual add);
- GeGLU MLP (gelu_pytorch_tanh);
- attention scale query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- alternating sliding-window and global layers (HF's layer_types; else Gemma 2's
  every other layer, Gemma 3's sliding_window_pattern);
- Gemma 2: soft-capped attention scores and final logits (cap * tanh(x / cap));
- Gemma 3: q/k RMSNorms over head_dim (also (1 + w)) before rotary, and two rotary
  bases: rope_local_base_freq on sliding layers, rope_theta (+ rope_scaling) on
  global ones.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import (AttentionContext, AttentionLayer, DecoderModel, GatedMLP, Linear, ModelConfig, RMSNorm,
                     Rotary, apply_rope, rope_inv_freq)
from .registry import Family, hf_eos, hf_rope, register

# Defaults of transformers' Gemma2Config / Gemma3TextConfig for keys a config may omit.
DEFAULTS = {
    "gemma2": dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sliding_window=4096, pattern=2, rope_theta=10000.0),
    "gemma3_text": dict(query_pre_attn_scalar=256, attn_logit_softcapping=None, final_logit_softcapping=None,
                        sliding_window=4096, pattern=6, rope_theta=1_000_000.0),
}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        ex = cfg.extra
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.spec = AttentionLayer(layer, ex["query_pre_attn_scalar"] ** -0.5, cfg.window(layer),
                                   ex["attn_logit_softcapping"])
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv = Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        self.o = Linear(q_out, cfg.hidden_size, bias=cfg.attention_bias)
        self.qk_norm = ex["qk_norm"]
        if self.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, offset=1.0)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, offset=1.0)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        B, T, _ = x.shape
        qkv = self.qkv.forward(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k, v = qkv.split((self.n_heads, self.n_kv, self.n_kv), dim=2)
            q = apply_rope(self.q_norm.forward(q), cos, sin)
            k = apply_rope(self.k_norm.forward(k), cos, sin)
        else:
            qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], cos, sin)
            q, k = qk.split((self.n_heads, self.n_kv), dim=2)
            v = qkv[:, :, self.n_heads + self.n_kv:]
        return self.o.forward(ctx.attend(self.spec, q, k, v))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.local_rope = cfg.extra["local_rope"][layer]
        self.attn_norm = RMSNorm(h, eps, offset=1.0)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(h, eps, offset=1.0)
        self.mlp_norm = RMSNorm(h, eps, offset=1.0)
        self.mlp = GatedMLP(h, cfg.intermediate_size, cfg.hidden_act)
        self.post_mlp_norm = RMSNorm(h, eps, offset=1.0)

    def forward(self, x, cos, sin, ctx):
        x = x + self.post_attn_norm.forward(self.attn.forward(self.attn_norm.forward(x), cos, sin, ctx))
        return x + self.post_mlp_norm.forward(self.mlp.forward(self.mlp_norm.forward(x)))


class GemmaModel(DecoderModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ex = cfg.extra
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.final_softcap: Optional[float] = ex["final_logit_softcapping"]
        self.rotary = Rotary(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        # Gemma 3's sliding layers rotate with their own base (and no scaling).
        self.rotary_local = None
        if any(ex["local_rope"]):
            self.rotary_local = Rotary(rope_inv_freq(cfg.head_dim, ex["rope_local_theta"],
                                                             ex["rope_local_scaling"]))
        self._embed_scale: dict = {}

    def embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden_size) rounded to the model dtype, as HF multiplies by it."""
        if dtype not in self._embed_scale:
            self._embed_scale[dtype] = float(torch.tensor(self.cfg.hidden_size ** 0.5).to(dtype))
        return self._embed_scale[dtype]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                logit_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        dtype = self.dtype
        x = self.embed(input_ids) * self.embed_scale(dtype)
        rope = self.rotary.forward(positions, dtype)
        rope_local = self.rotary_local.forward(positions, dtype) if self.rotary_local is not None else rope
        for block in self.layers:
            cos, sin = rope_local if block.local_rope else rope
            x = block.forward(x, cos, sin, ctx)
        x = x[logit_index] if logit_index is not None else x
        logits = self.lm_head.forward(self.norm.forward(x))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


# ---------------------------------------------------------------- checkpoints

def _pattern_types(layers: int, pattern: int) -> list[str]:
    """HF's default layer_types: every `pattern`-th layer global, the rest sliding."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _scaling(rope: Optional[dict]) -> Optional[dict]:
    kind = (rope or {}).get("rope_type", (rope or {}).get("type"))
    return rope if kind not in (None, "default") else None


def config_from_hf(d: dict) -> ModelConfig:
    outer = d
    if d.get("model_type") == "gemma3" and "text_config" in d:
        # The multimodal Gemma 3 config: the language model is text_config (weights under
        # language_model.model.*); the vision tower is not loaded.
        d = {**d["text_config"]}
        d.setdefault("model_type", "gemma3_text")
    arch = "gemma2" if d.get("model_type") == "gemma2" else "gemma3_text"
    dflt = DEFAULTS[arch]
    hidden, heads, layers = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
    head_dim = d.get("head_dim") or hidden // heads
    types = d.get("layer_types") or _pattern_types(
        layers, d.get("sliding_window_pattern", d.get("_sliding_window_pattern", dflt["pattern"])))
    window = d.get("sliding_window", dflt["sliding_window"])
    windows = [window if t == "sliding_attention" else None for t in types] if window else []
    rp = d.get("rope_parameters") or {}
    local_theta, local_scaling = 10000.0, None
    if "full_attention" in rp or "sliding_attention" in rp:
        # transformers >= 5 (Gemma 3): rope parameters per layer type.
        glob, loc = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        theta = glob.get("rope_theta", d.get("rope_theta", dflt["rope_theta"]))
        scaling = _scaling(glob)
        local_theta = loc.get("rope_theta", d.get("rope_local_base_freq", local_theta))
        local_scaling = _scaling(loc)
    else:
        theta, scaling = hf_rope(d, dflt["rope_theta"])
        local_theta = d.get("rope_local_base_freq", local_theta)
    gemma3 = arch == "gemma3_text"
    extra = dict(
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", dflt["query_pre_attn_scalar"]),
        attn_logit_softcapping=d.get("attn_logit_softcapping", dflt["attn_logit_softcapping"]),
        final_logit_softcapping=d.get("final_logit_softcapping", dflt["final_logit_softcapping"]),
        qk_norm=gemma3,
        local_rope=[gemma3 and t == "sliding_attention" for t in types],
        rope_local_theta=local_theta, rope_local_scaling=local_scaling,
        weight_prefix="language_model." if outer is not d else "",
    )
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=hidden, intermediate_size=d["intermediate_size"],
        num_layers=layers, num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 8192),
        tie_word_embeddings=outer.get("tie_word_embeddings", d.get("tie_word_embeddings", True)),
        attention_bias=d.get("attention_bias", False), architecture=arch,
        bos_token_id=d.get("bos_token_id", outer.get("bos_token_id")),
        eos_token_ids=hf_eos(outer) or hf_eos(d), sliding_windows=windows,
        hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh", extra=extra)


def hf_weight_map(cfg: ModelConfig) -> dict[str, list[str]]:
    pre = cfg.extra.get("weight_prefix", "")
    m = {"embed.weight": [pre + "model.embed_tokens.weight"], "norm.weight": [pre + "model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = [pre + "lm_head.weight"]
    for i in range(cfg.num_layers):
        p, o = f"{pre}model.layers.{i}.", f"layers.{i}."
        m[o + "attn_norm.weight"] = [p + "input_layernorm.weight"]
        m[o + "post_attn_norm.weight"] = [p + "post_attention_layernorm.weight"]
        m[o + "mlp_norm.weight"] = [p + "pre_feedforward_layernorm.weight"]
        m[o + "post_mlp_norm.weight"] = [p + "post_feedforward_layernorm.weight"]
        m[o + "attn.qkv.weight"] = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        m[o + "attn.o.weight"] = [p + "self_attn.o_proj.weight"]
        if cfg.attention_bias:
            m[o + "attn.qkv.bias"] = [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
            m[o + "attn.o.bias"] = [p + "self_attn.o_proj.bias"]
        if cfg.extra["qk_norm"]:
            m[o + "attn.q_norm.weight"] = [p + "self_attn.q_norm.weight"]
            m[o + "attn.k_norm.weight"] = [p + "self_attn.k_norm.weight"]
        m[o + "mlp.gate_up.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        m[o + "mlp.down.weight"] = [p + "mlp.down_proj.weight"]
    return m


def config_from_gguf(g, arch: str) -> ModelConfig:
    """llama.cpp's gemma2 / gemma3 metadata. What it does not store is what llama.cpp
    hard-codes: the sliding pattern (every 2nd / 6th layer global), the local rotary
    base (10000, unscaled) and the attention scale (head_dim ** -0.5, but
    (hidden / heads) ** -0.5 for the 27B models, recognised by their layer count)."""
    hidden, heads, layers = g("embedding_length"), g("attention.head_count"), g("block_count")
    head_dim = g("attention.key_length") or hidden // heads
    gemma3 = arch == "gemma3"
    big = layers == (62 if gemma3 else 46)  # Gemma 3 27B / Gemma 2 27B
    pattern = g("attention.sliding_window_pattern", 6 if gemma3 else 2)
    if isinstance(pattern, int):
        sliding = [i % pattern < pattern - 1 for i in range(layers)]
    else:  # per-layer booleans (True: sliding)
        sliding = [bool(s) for s in pattern]
    window = g("attention.sliding_window")
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    extra = dict(
        query_pre_attn_scalar=hidden / heads if big else head_dim,
        attn_logit_softcapping=g("attn_logit_softcapping"),
        final_logit_softcapping=g("final_logit_softcapping"),
        qk_norm=gemma3, local_rope=[gemma3 and s for s in sliding],
        rope_local_theta=g("rope.freq_base_swa", 10000.0), rope_local_scaling=None)
    return ModelConfig(
        vocab_size=g("vocab_size") or g.vocab_size, hidden_size=hidden, intermediate_size=g("feed_forward_length"),
        num_layers=layers, num_heads=heads, num_kv_heads=g("attention.head_count_kv") or heads,
        head_dim=head_dim, rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=g("rope.freq_base", 1_000_000.0 if gemma3 else 10000.0), rope_scaling=scaling,
        max_position_embeddings=g("context_length", 8192),
        tie_word_embeddings="output.weight" not in g.tensor_names,
        attention_bias="blk.0.attn_q.bias" in g.tensor_names, architecture="gemma3_text" if gemma3 else "gemma2",
        bos_token_id=g.meta("tokenizer.ggml.bos_token_id"), eos_token_ids=g.eos_token_ids(),
        sliding_windows=[window if s else None for s in sliding] if window else [],
        hidden_act="gelu_pytorch_tanh", extra=extra)


GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_fixup(cfg: ModelConfig, hf_name: str, arr):
    # llama.cpp's converter stores Gemma's norm weights as 1 + w (its RMSNorm multiplies
    # by the weight); RMSNorm(offset=1) keeps w.
    if hf_name.endswith("norm.weight"):
        return arr - 1
    return arr


register(Family(
    name="gemma", architectures=("gemma2", "gemma3_text", "gemma3"), model_class=GemmaModel,
    config_from_hf=config_from_hf, hf_weight_map=hf_weight_map,
    gguf_architectures=("gemma2", "gemma3"), config_from_gguf=config_from_gguf,
    gguf_names=GGUF_NAMES, gguf_fixup=gguf_fixup))
