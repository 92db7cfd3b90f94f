"""Any HF transformers causal LM, unmodified, driven by BATON's vector-shaped batching.

The engine asks a model for one thing: `forward(input_ids, positions, ctx, logit_index)`,
with every attention layer handing its post-rotary q/k/v to `ctx.attend` (the seam
to the caller's cache; see layers.AttentionContext). This module gives an HF model
that seam without touching its code, through the extension point transformers has
for exactly this: the attention interface.

How (transformers 5.x):

- `AttentionInterface.register("baton", baton_attention)` and the model is built with
  `attn_implementation="baton"`. Every decoder family's attention module ends in
  `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)(module, q, k, v,
  mask, scaling=..., [sliding_window=..., softcap=...], **kwargs)`, q/k/v post-rotary in
  [B, heads, T, D]. `baton_attention` turns that call into `ctx.attend(layer, q, k, v)`
  with an `AttentionLayer` read off the HF module and the call (layer_idx, scaling, the
  sliding window, the logit soft-cap), and returns the output in the [B, T, H, D] layout
  HF's o-projection expects. Projections, norms, rotary (per-row `position_ids`), MLPs,
  residuals, the lm_head and any final-logit post-processing (Granite's logits_scaling,
  Gemma 2's final soft-cap, ...) are all the HF model's own code.
- The context reaches the attention function through a thread-local set for the
  duration of the wrapper's forward. Most families pass a forward's extra kwargs down to
  the attention function (that is how flash-attention gets its varlen metadata), but not
  all (StableLM's decoder layer drops them in transformers 5.24), and the thread-local
  asks nothing of the family's code.
- `use_cache=False`: HF's own Cache is not created. No mask function is registered:
  for an attention implementation with no entry in `AttentionMaskInterface`,
  `masking_utils` returns no mask (its documented path for "TGI/vLLM backends, or other
  custom attention without equivalent mask creation"); the 4-D mask is BATON's own,
  per row ([B, 1, T, W], causal at each row's own length, plus the layer's window),
  built and applied by the context. vLLM's transformers backend uses the same route.
- Logits: the HF CausalLM forward with `logits_to_keep` = the time indices of the rows
  to sample (a 1-D tensor over the sequence dim, which for the flat [1, N] layout is
  exactly the flat index); for a [B, 1] decode batch all B rows are kept and indexed.

Why the attention interface and not a Cache subclass. The other non-invasive route is
a `transformers.Cache` whose `update(k, v, layer_idx)` writes into the ShapedKV and
returns the cached K/V, with a 4-D additive mask from `ShapedAttention.mask(window)`
passed as `attention_mask` (HF returns a 4-D mask as is) and HF's sdpa/eager attention
doing the math. That serves one ShapedAttention per forward. It cannot serve the flat
forward of SegmentedAttention (baton-pd's decode batch and prompt chunks, Orca's
requests: several segments, each with its own cache, laid out as one [1, N] row so every
weight is read once for all of them): one `update` must return one K/V tensor and HF
applies one mask to it, so the segments' caches would have to be concatenated every
layer (a copy of all of them) under a block-diagonal mask (every token scored against
every segment's columns: N x sum(rows x width) instead of each token against its own
row), or the step split into one forward per segment (the weights read once per
segment, which is what the flat layout exists to avoid). The attention interface keeps
the flat forward and BATON's kernels, at the price of bypassing the HF cache interface:
the model never sees a Cache object, only its attention function is BATON's.

What a family needs for this to work: attention through `ALL_ATTENTION_FUNCTIONS` (all
decoder families in transformers 5), kwargs passed on to it, a `layer_idx` per layer,
and nothing in attention but q/k/v, a causal mask, a window and a soft-cap (no ALiBi or
learned position bias). Rotary that depends on the whole forward (dynamic NTK scaling
keyed to the largest position id, LongRoPE's short/long switch) sees all rows of a step,
so there results depend on batch mates, as they do in HF's own batched generate.
The load runs a probe forward that checks all of this and reads
the cache geometry (KV heads, head_dim, per-layer windows) from what the layers really
hand over, so a config that says otherwise cannot mis-size the cache.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .layers import AttentionLayer, ModelConfig
from .registry import hf_rope

ATTN_IMPLEMENTATION = "baton"
# The (context, AttentionLayer memo) of the forward running in this thread.
_ACTIVE = threading.local()


class BackendError(RuntimeError):
    """The HF model called attention in a way BATON's contexts cannot serve."""


def baton_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                    sliding_window: Optional[int] = None, softcap: Optional[float] = None, **kwargs):
    """The attention function registered as attn_implementation="baton".

    query: [B, H, T, D], key/value: [B, KVH, T, D] (post-rotary, this step's tokens
    only: the model runs with use_cache=False). Returns ([B, T, H, D], None)."""
    active = getattr(_ACTIVE, "call", None)
    if active is None:
        raise BackendError(f"attention of {type(module).__name__} was called outside a BATON forward: a model "
                           "loaded with attn_implementation='baton' only runs under TransformersModel")
    ctx, memo = active
    if attention_mask is not None:
        raise BackendError(f"{type(module).__name__} was handed a mask its family built outside masking_utils; "
                           "baton would ignore it (its contexts apply their own causal, per-row mask)")
    if kwargs.get("position_bias") is not None or kwargs.get("alibi") is not None:
        raise BackendError(f"{type(module).__name__} adds a position bias to its attention scores; "
                           "baton's attention contexts do not support that")
    B, H, T, D = query.shape
    layer = _attention_layer(memo, module, scaling, sliding_window, softcap)
    # [B, H, T, D] -> [B, T, H, D]; the contexts view q/k/v per segment, so they must be dense.
    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
    out = ctx.attend(layer, q, k, v)  # [B, T, H * D]
    return out.view(B, T, H, D), None


def _attention_layer(memo: Optional[dict], module: nn.Module, scaling, window, softcap) -> AttentionLayer:
    """The AttentionLayer of this HF attention module and call. `memo` (the wrapper's)
    keeps one per module and call signature, so a step builds none; the HF modules
    themselves get no attribute."""
    key = (id(module), scaling, window, softcap)
    layer = memo.get(key) if memo is not None else None
    if layer is None:
        if window is None:
            window = getattr(module, "sliding_window", None)
        if softcap is None:
            softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
        index = getattr(module, "layer_idx", None)
        if index is None:
            raise BackendError(f"{type(module).__name__} has no layer_idx: "
                               "baton cannot tell which layer's cache it uses")
        head_dim = getattr(module, "head_dim", None)
        scale = scaling if scaling is not None else (head_dim ** -0.5 if head_dim else None)
        if scale is None:
            raise BackendError(f"{type(module).__name__} passed no scaling and has no head_dim")
        layer = AttentionLayer(int(index), float(scale), int(window) if window else None,
                               float(softcap) if softcap else None)
        if memo is not None:
            memo[key] = layer
    return layer


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, baton_attention)


# ---------------------------------------------------------------- the model the engine runs

class TransformersModel(nn.Module):
    """An HF `*ForCausalLM`, unmodified, behind BATON's model call.

    Its attention function is BATON's (`baton_attention`, via the attention interface);
    its HF Cache interface is bypassed (use_cache=False): the KV lives in the engine's
    vector-shaped cache, which the context writes and attends. See the module docstring
    for why this route and not a Cache subclass."""

    def __init__(self, hf: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.hf = hf
        self.cfg = cfg
        self._layers: dict = {}  # (id(HF attention module), scaling, window, softcap) -> AttentionLayer

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx,
                logit_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """input_ids, positions: [B, T] (per-row positions; the flat multi-segment layout
        is [1, N] with per-token positions). Returns logits at `logit_index` = (batch idx,
        time idx) -> [N, vocab]; [B, T, vocab] if None."""
        B = input_ids.shape[0]
        if logit_index is None:
            keep = 0  # HF: 0 keeps every position
        elif B == 1:
            keep = logit_index[1]  # 1-D indices over the sequence dim, in the caller's order
        else:
            keep = 0  # a decode batch ([B, 1]): every row, then the rows asked for
        logits = run_hf(self.hf, input_ids, positions, keep, ctx, self._layers)
        if logit_index is None:
            return logits
        return logits[0] if B == 1 else logits[logit_index]


def run_hf(hf: nn.Module, input_ids, positions, keep, ctx, memo: Optional[dict]) -> torch.Tensor:
    """The HF CausalLM forward with `ctx` as every attention layer's context."""
    prev = getattr(_ACTIVE, "call", None)
    _ACTIVE.call = (ctx, memo)
    try:
        return hf(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=keep).logits
    finally:
        _ACTIVE.call = prev


class _ProbeContext:
    """Records what each attention call hands over; attends to nothing."""

    def __init__(self):
        self.calls: list = []

    def attend(self, layer: AttentionLayer, q, k, v):
        self.calls.append((layer, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])


def _eos_ids(*values) -> list[int]:
    out: list[int] = []
    for v in values:
        for e in ([v] if isinstance(v, int) else list(v or [])):
            if e not in out:
                out.append(int(e))
    return out


def _config(hf: nn.Module, probe: _ProbeContext, vocab: int, source: str) -> ModelConfig:
    from .registry import ModelLoadError

    text = hf.config.get_text_config()
    arch = getattr(text, "model_type", None) or hf.config.model_type
    layers = getattr(text, "num_hidden_layers", None)
    seen: dict[int, tuple] = {}
    for layer, qs, ks, vs in probe.calls:
        if layer.index in seen:
            raise ModelLoadError(f"{source}: two attention calls of {arch!r} use cache layer {layer.index}")
        seen[layer.index] = (layer, qs, ks, vs)
    if not seen:
        raise ModelLoadError(f"{source}: {arch!r} never called the attention interface: it cannot run on "
                             "baton's caches through the transformers backend")
    if sorted(seen) != list(range(len(seen))) or (layers is not None and len(seen) != layers):
        raise ModelLoadError(f"{source}: {arch!r}'s attention layers have indices {sorted(seen)}; "
                             f"expected 0..{(layers or len(seen)) - 1}")
    first = seen[0]
    heads, kv_heads, head_dim = first[1][2], first[2][2], first[2][3]
    for i, (layer, qs, ks, vs) in seen.items():
        if (qs[2], ks[2], ks[3], vs[2], vs[3], qs[3]) != (heads, kv_heads, head_dim, kv_heads, head_dim, head_dim):
            raise ModelLoadError(f"{source}: {arch!r} layer {i} has q {qs}, k {ks}, v {vs}; baton's cache needs "
                                 "the same K/V heads and head size in every layer, and q's head size equal to K/V's")
    windows = [seen[i][0].window for i in range(len(seen))]
    theta, scaling = hf_rope(text.to_dict())
    gen = getattr(hf, "generation_config", None)
    max_pos = (getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
               or getattr(text, "max_sequence_length", None) or 2048)
    return ModelConfig(
        vocab_size=vocab, hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", None) or 0,
        num_layers=len(seen), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_eps", None) or 1e-5,
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=int(max_pos),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(text, "attention_bias", False)), architecture=arch,
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_ids=_eos_ids(getattr(text, "eos_token_id", None), getattr(gen, "eos_token_id", None)),
        sliding_windows=windows if any(w is not None for w in windows) else [],
        hidden_act=str(getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", None) or "silu"),
        extra={"impl": "transformers", "hf_class": type(hf).__name__,
               "softcaps": [seen[i][0].softcap for i in range(len(seen))],
               "scales": [seen[i][0].scale for i in range(len(seen))]})


def _wrap(hf: nn.Module, device, source: str) -> TransformersModel:
    """Move, probe (one 2-token forward) and wrap a loaded HF model."""
    from .registry import ModelLoadError

    hf = hf.to(device).eval()
    hf.requires_grad_(False)
    probe = _ProbeContext()
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    try:
        with torch.inference_mode():
            logits = run_hf(hf, ids, torch.arange(2, device=device).view(1, 2), torch.tensor([1], device=device),
                            probe, None)
    except BackendError as e:
        raise ModelLoadError(f"{source}: {e}") from e
    cfg = _config(hf, probe, int(logits.shape[-1]), source)
    return TransformersModel(hf, cfg)


def _from_pretrained(source: str, arch: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    from .registry import ModelLoadError

    register()
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
                                                    **kwargs)
    except (ValueError, KeyError, OSError, ImportError, TypeError) as e:
        raise ModelLoadError(f"transformers cannot load {arch!r} from {source} as a causal LM with a custom "
                             f"attention function: {type(e).__name__}: {e}") from e


def load_transformers_model(p: Path, config_dict: dict, dtype: torch.dtype, device) -> TransformersModel:
    """An HF model directory (config.json + safetensors), any architecture transformers knows."""
    arch = config_dict.get("model_type", "?")
    hf = _from_pretrained(str(p), arch, dtype)
    return _wrap(hf, device, str(p))


def load_transformers_gguf(p: Path, arch: str, dtype: torch.dtype, device) -> TransformersModel:
    """A GGUF file, dequantized by transformers' own GGUF loader (`gguf_file=`)."""
    hf = _from_pretrained(str(p.parent), arch, dtype, gguf_file=p.name)
    return _wrap(hf, device, str(p))
