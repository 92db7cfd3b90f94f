"""CPU kernel choices, measured on the 2-core hosts this project runs on.

- baton's fused C++ kernels (platform/native.py) for float32 models where the
  CPU has AVX2: RMSNorm (+ residual add), rotary in place, SiLU * mul, decode
  attention over the shaped cache, and linear layers on quantized blocks
  (a GGUF's Q4_1 / Q8_0, or --quantization int4 / int8) or bf16 weights.
- oneDNN prepacked GEMM for every linear layer (bf16 and fp32), probed per dtype.
- Packed int4 GEMV (PyTorch's) for few-token steps of bf16 models with Q4_1 weights.
- float32 attention over a low-precision cache slice when few query rows attend.
- Greedy argmax by blocks (PyTorch's CPU argmax over a long row is scalar).
- Process setup (threads, oneDNN primitive-cache caps), applied when an engine
  starts, never at import.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import native as native_kernels
from .quant import QuantWeights, quantize, take_quantized_values

# At or below this many tokens the int4 GEMV beats the dense GEMM (engine decode on
# a Zen 5 host: batch 6 +10%, batch 8 +10-20%, batch 12 -5%).
INT4_MAX_TOKENS = 8
_int4_mm = getattr(torch, "_weight_int4pack_mm_for_cpu", None)
_packed_linear = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None

# oneDNN compiles a primitive per distinct GEMM/matmul shape and keeps it in two
# caches (its own and PyTorch's ideep LRU), 1024 entries each by default. Attention
# shapes (rows x width) keep appearing for minutes under mixed lengths, and native
# heap in use grew ~4 MiB per 32 requests until both caches filled (RSS still rising
# after 5 minutes of serving). 64 entries hold a step's working set; re-creating an
# evicted primitive costs ~0.4 ms (~55 ms per 32 mixed requests).
PRIMITIVE_CACHE_CAPACITY = "64"


def configure_process(num_threads: Optional[int] = None) -> None:
    """Called where an engine starts. The cache caps are read when oneDNN is first
    used, so they apply if no model has run yet in this process; a value the user
    set in the environment is kept. Threads change only when asked for."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, PRIMITIVE_CACHE_CAPACITY)
    if num_threads:
        torch.set_num_threads(num_threads)


# ---------------------------------------------------------------- linear kernels

_packable: dict[torch.dtype, bool] = {}


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked GEMM runs on this CPU for `dtype`: its bf16 path
    needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT and raises elsewhere (seen on an AVX2
    Zen 3 host), so probe once with a tiny weight instead of parsing CPU flags."""
    if _packed_linear is None or dtype not in (torch.bfloat16, torch.float32):
        return False
    if dtype not in _packable:
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
            _packed_linear(torch.zeros(1, 16, dtype=dtype), w, None, "none", [], "")
            _packable[dtype] = True
        except RuntimeError:
            _packable[dtype] = False
    return _packable[dtype]


class PackedLinear:
    """x2d @ W.T (+ bias) on a copy of W in oneDNN's blocked layout. On CPU,
    F.linear on the plain [out, in] weight ran 1.1-3.7x slower than this at 1-32
    tokens (bf16 and fp32; the lm_head GEMV most of all), same arithmetic."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], batch_hint: int = 32):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = bias

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x2d, self.weight, self.bias, "none", [], "")


class DenseLinear:
    __slots__ = ("weight", "bias")

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def __call__(self, x2d):
        return F.linear(x2d, self.weight, self.bias)


class KernelOptions:
    """Switches shared by every kernel of one model (the benchmarks flip them)."""

    def __init__(self, native: bool = False):
        self.int4_max_tokens = INT4_MAX_TOKENS
        self.native = native  # baton's C++ kernels run this model (read by the model runner)


def native_block_args(quant: QuantWeights) -> tuple:
    """The kernel's operands for these blocks: a row's block count padded to even
    (a zero block), q4_1 repacked into block pairs, scales as float16; then K."""
    n, k = quant.shape
    pad = (k // 32) % 2

    def padded(t, width):
        return torch.cat([t, t.new_zeros(n, width)], dim=1) if pad else t.contiguous()
    if quant.kind == "q4_1":
        pairs = native_kernels.kernels().repack_q4_1(padded(quant.qs, 16))
        return pairs, padded(quant.d, 1).half(), padded(quant.m, 1).half(), k
    return padded(quant.qs, 32), padded(quant.d, 1).half(), k


class NativeQuantLinear:
    """Linear on quantized blocks (platform/quant.py) with int8 activations, for
    every step: one kernel whatever the token count, so a row's result does not
    depend on the batch it runs in (and no dense copy is kept). Few-token steps
    are bound by reading weights: Q4_1 reads 5 bits per weight, float32 32."""

    __slots__ = ("quant", "bias", "fn", "args", "exact")
    nd = True  # takes [..., K] input (Linear skips its reshapes)

    def __init__(self, quant: QuantWeights, bias, float_activations: bool = False):
        """float_activations (q8_0 only): no int8 rounding of the input, for the output
        layer: with it, SmolLM2's greedy answer to "What is the capital of France?"
        changed from "The capital of France is Paris." to a French word salad, at the
        same perplexity (40.26 vs 40.24 eager, 8 chunks of the ppl text)."""
        kernels = native_kernels.kernels()
        self.quant, self.bias = quant, bias
        self.args = native_block_args(quant)
        self.exact = float_activations and quant.kind == "q8_0"
        self.fn = (kernels.linear_q8_0_f32 if self.exact else
                   kernels.linear_q4_1 if quant.kind == "q4_1" else kernels.linear_q8_0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args if isinstance(t, torch.Tensor))

    def dense_weight(self) -> torch.Tensor:
        return self.quant.dequantize()

    def __call__(self, x):
        return self.fn(x, *self.args, self.bias)


class Bf16WeightLinear:
    """float32 activations x bf16 weights, for float32 models whose weights are bf16
    values (a BF16 checkpoint run in float32 where the CPU has no bf16 arithmetic):
    the same values in half the bytes, every step (as NativeQuantLinear)."""

    __slots__ = ("weight", "bias", "fn")
    nd = True

    def __init__(self, weight: torch.Tensor, bias):
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.bias = bias
        self.fn = native_kernels.kernels().linear_bf16

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * 2

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float()

    def __call__(self, x):
        return self.fn(x, self.weight, self.bias)


class Int4Linear:
    """Packed int4 weights (a GGUF Q4_1 tensor: groups of 32 with scale and min,
    mapped without further loss) for steps of at most `options.int4_max_tokens`
    tokens of a bf16 model, the dense kernel otherwise. Small-batch decode is bound
    by reading weights, and int4 reads 4x fewer bytes than bf16."""

    __slots__ = ("packed", "scales_zeros", "group", "dense", "options")

    def __init__(self, quant: QuantWeights, dense, options: KernelOptions):
        # The widening and the scale/zero layout in numpy (single-threaded): as torch
        # ops, each of the 120 layers' few small ops paid for an OpenMP region, which
        # cost 1.5-3 s of a model load whenever the host's other core was busy.
        qs = quant.qs.numpy()
        n, half = qs.shape
        blocks = qs.reshape(n, half // 16, 16)
        q = np.concatenate([blocks & 0x0F, blocks >> 4], axis=-1).reshape(n, half * 2)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 8)
        # The kernel computes (q - 8) * scale + zero, so zero = m + 8 * d.
        d, m = quant.d.numpy(), quant.m.numpy()
        self.scales_zeros = torch.from_numpy(np.stack([d.T, (m + 8 * d).T], axis=-1)).to(torch.bfloat16)
        self.group, self.dense, self.options = 32, dense, options

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_zeros.numel() * self.scales_zeros.element_size()

    def __call__(self, x2d):
        if x2d.shape[0] <= self.options.int4_max_tokens:
            return _int4_mm(x2d, self.packed, self.group, self.scales_zeros)
        return self.dense(x2d)


_int4_checked: list = []


def int4_works() -> bool:
    """Whether torch's CPU int4 kernel computes what Int4Linear packs for it, probed
    once on a small random layer against its dequantized values: on an AVX-512
    (Zen 4) host, torch 2.13's kernel returned errors as large as the outputs
    themselves (the default model answered with garbage), where on AVX2 it matched."""
    if _int4_mm is None:
        return False
    if not _int4_checked:
        from .quant import quantize
        gen = torch.Generator().manual_seed(0)
        q = quantize(torch.randn(64, 128, generator=gen), "q4_1")
        x = torch.randn(4, 128, generator=gen).to(torch.bfloat16)
        try:
            got = Int4Linear(q, dense=None, options=KernelOptions(False))(x).float()
            want = x.float() @ q.dequantize().T
            ok = bool(((got - want).abs().max() <= 0.05 * want.abs().max()).item())
        except RuntimeError:
            ok = False
        _int4_checked.append(ok)
    return _int4_checked[0]


def int4_applies(linear: nn.Linear) -> bool:
    # The CPU int4 kernel is only fast with bf16 activations, and has no bias.
    return (linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
            and linear.bias is None and int4_works())


def native_applies(dtype: torch.dtype) -> bool:
    """Whether baton's C++ kernels run a model of this dtype here (float32, AVX2)."""
    return dtype == torch.float32 and native_kernels.kernels() is not None


def wants_quant_blocks(dtype: torch.dtype, native: bool = True) -> bool:
    """Whether a GGUF's quantized blocks are worth keeping for a CPU model of `dtype`."""
    return (native and native_applies(dtype)) or (dtype == torch.bfloat16 and int4_works())


def is_bf16_exact(w: torch.Tensor) -> bool:
    return w.dtype == torch.float32 and bool(torch.equal(w.to(torch.bfloat16).float(), w))


def _is_tied(model, mod) -> bool:
    embed = getattr(model, "embed", None)
    return embed is not None and mod.weight is getattr(embed, "weight", None)


def _drop_weight(model, mod) -> None:
    """The kernel holds the layer's values: free the float32 copy (not a tied lm_head's,
    which is the embedding). Linear.dense_weight() still gives the values."""
    if not _is_tied(model, mod):
        mod.weight = nn.Parameter(mod.weight.new_empty(0), requires_grad=False)


def prepare_model(model, quant_blocks: Optional[dict] = None, prepack: bool = True,
                  quantization: Optional[str] = None, native: bool = True) -> dict:
    """Install CPU kernels on the model's layers. quant_blocks: module name ->
    QuantWeights from a GGUF (the dense weights hold the same values).
    quantization ("int8" / "int4"): quantize every linear layer's weight now.
    native: use baton's C++ kernels where they apply (float32, AVX2); with them,
    a layer with quantized blocks or bf16-valued weights keeps only those. Returns counts."""
    from ..models.layers import GatedMLP, Linear, RMSNorm
    from ..models.llama import Attention
    from .quant import KINDS

    native = native and native_applies(model.dtype)
    options = KernelOptions(native)
    model.kernel_options = options
    counts = {"prepacked": 0, "int4": 0, "quantized": 0, "bf16_weights": 0, "fused": 0, "fused_blocks": 0}
    kernels = native_kernels.kernels() if native else None
    bf16_values = native and quantization is None and not quant_blocks
    for name, mod in model.named_modules():
        if isinstance(mod, RMSNorm) and native and not mod.offset:
            mod.native = kernels
            counts["fused"] += 1
        elif isinstance(mod, GatedMLP) and native and mod.act_name == "silu":
            mod.act_mul = kernels.silu_mul
            counts["fused"] += 1
        elif isinstance(mod, Attention) and native:
            mod.rope_ = kernels.rope_
            counts["fused"] += 1
        if not isinstance(mod, Linear):
            continue
        quant = None
        output_layer = mod is getattr(model, "lm_head", None)
        if quantization is not None and mod.in_features % 32 == 0:
            counts["quantized"] += 1
            if native:  # the output layer in 8 bits with float activations (llama.cpp keeps it wider too)
                quant = quantize(mod.weight, "q8_0" if output_layer else KINDS[quantization])
            else:  # no kernel: the weight takes the quantized values, then the dense kernel below
                take_quantized_values(mod, KINDS[quantization])
        elif quant_blocks:
            quant = quant_blocks.get(name)
            if quant is None and _is_tied(model, mod):
                quant = quant_blocks.get("embed")  # a tied lm_head reads the embedding's blocks
            counts["quantized"] += quant is not None and native
        if native and quant is not None:
            mod.kernel = NativeQuantLinear(quant, mod.bias, float_activations=output_layer)
            _drop_weight(model, mod)
            continue
        if bf16_values and mod.in_features % 8 == 0 and is_bf16_exact(mod.weight):
            mod.kernel = Bf16WeightLinear(mod.weight, mod.bias)
            _drop_weight(model, mod)
            counts["bf16_weights"] += 1
            continue
        dense = None
        if prepack and can_pack(mod.weight.dtype):
            dense = PackedLinear(mod.weight, mod.bias)
            counts["prepacked"] += 1
        if quant is not None and quant.kind == "q4_1" and int4_applies(mod):
            mod.kernel = Int4Linear(quant, dense=dense or DenseLinear(mod.weight, mod.bias), options=options)
            counts["int4"] += 1
        elif dense is not None:
            mod.kernel = dense
    if native:
        counts["fused_blocks"] = install_fused_blocks(model, kernels)
    return counts


def _block_linear(kernels, mod):
    """The C++ block's form of one linear layer, or None."""
    k = getattr(mod, "kernel", None)
    if isinstance(k, NativeQuantLinear):
        return kernels.block_linear(0 if k.quant.kind == "q4_1" else 1, list(k.args[:-1]), k.args[-1], k.bias)
    if isinstance(k, Bf16WeightLinear):
        return kernels.block_linear(2, [k.weight], mod.in_features, k.bias)
    return None


def install_fused_blocks(model, kernels) -> int:
    """Give each plain Llama-family block (SiLU MLP, unit-offset norms, Llama's own
    attention) whose linear layers all run baton's kernels the fused C++ halves."""
    from ..models.llama import Attention, Block

    n = 0
    for mod in model.modules():
        if not isinstance(mod, Block) or type(mod.attn) is not Attention or mod.mlp.act_name != "silu" \
                or mod.attn_norm.offset or mod.mlp_norm.offset or mod.attn_norm.eps != mod.mlp_norm.eps:
            continue
        attn = mod.attn
        parts = [_block_linear(kernels, m) for m in (attn.qkv, attn.o, mod.mlp.gate_up, mod.mlp.down)]
        if any(p is None for p in parts):
            continue
        mod.fused = kernels.FusedBlock(mod.attn_norm.weight.detach(), mod.mlp_norm.weight.detach(),
                                       mod.attn_norm.eps, attn.n_heads, attn.n_kv, attn.head_dim, *parts)
        n += 1
    return n


def set_int4(model, enabled: bool) -> int:
    """Turn the int4 small-batch path on or off; returns how many layers have one."""
    options = getattr(model, "kernel_options", None)
    if options is not None:
        options.int4_max_tokens = INT4_MAX_TOKENS if enabled else 0
    return sum(isinstance(getattr(m, "kernel", None), Int4Linear) for m in model.modules())


def prepack_foreign_linears(module: nn.Module) -> int:
    """Give another library's nn.Linear layers (HF transformers' baseline) the same
    prepacked GEMM baton's use, so a comparison measures engines, not kernels.
    The layer keeps its class and weights; only its forward is replaced."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and can_pack(m.weight.dtype):
            kernel = PackedLinear(m.weight, m.bias)

            def forward(x, kernel=kernel, m=m):
                return kernel(x.reshape(-1, m.in_features)).view(*x.shape[:-1], m.out_features)
            m.forward = forward
            n += 1
    return n


# ---------------------------------------------------------------- attention

FP32_ATTENTION_MAX_TOKENS = 8    # query rows (B*T)
FP32_ATTENTION_MAX_KEYS = 2048   # cached columns over all rows (B*W)


def decode_attention_kernel(cache_dtype: torch.dtype):
    """The fused decode-attention kernel for a cache of this dtype, or None."""
    if cache_dtype not in (torch.float32, torch.bfloat16):
        return None
    kernels = native_kernels.kernels()
    return kernels.decode_attention if kernels is not None else None


def upcast_attention(B: int, T: int, W: int) -> bool:
    """Whether attention over a [B, kv_heads, W, D] low-precision cache slice runs
    in float32. With few query rows, the CPU's bf16 batched matmul has a large
    fixed cost and copies strided operands, and casting the slice is cheaper
    (38 vs 47 us per layer at batch 1, 128 columns); once the slice is large the
    cast costs more than it saves (engine decode at batch 8: 565 vs 544 tok/s at
    ~110 columns, 434 vs 455 at ~370)."""
    return B * T <= FP32_ATTENTION_MAX_TOKENS and B * W <= FP32_ATTENTION_MAX_KEYS


# ---------------------------------------------------------------- sampling

ARGMAX_BLOCK = 128


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) for [N, V] float32, the same index (the first maximum).

    PyTorch's CPU argmax over a long row is scalar (~10 ns per element: 0.46 ms for
    32 x 49152 here), while amax vectorizes: take each block's max, the first block
    holding the row's max, then the argmax inside that block (87 us)."""
    N, V = logits.shape
    if V % ARGMAX_BLOCK:
        return logits.argmax(dim=-1)
    blocks = logits.view(N, V // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)
    inner = blocks[torch.arange(N, device=logits.device), best_block].argmax(dim=-1)
    return best_block * ARGMAX_BLOCK + inner


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available
