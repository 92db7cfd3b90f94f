"""CPU kernel choices, measured on the 2-core hosts this project runs on.

- oneDNN prepacked GEMM for every linear layer (bf16 and fp32), probed per dtype.
- Packed int4 GEMV for few-token steps where a GGUF's Q4_1 weights are kept.
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

    def __init__(self):
        self.int4_max_tokens = INT4_MAX_TOKENS


class Int4Linear:
    """Packed int4 weights (a GGUF Q4_1 tensor: groups of 32 with scale and min,
    mapped without further loss) for steps of at most `options.int4_max_tokens`
    tokens, the dense kernel otherwise. Small-batch decode is bound by reading
    weights, and int4 reads 4x fewer bytes than bf16."""

    __slots__ = ("packed", "scales_zeros", "group", "dense", "options")

    def __init__(self, q, d, m, group: int, dense, options: KernelOptions):
        # The widening and the scale/zero layout in numpy (single-threaded): as torch
        # ops, each of the 120 layers' few small ops paid for an OpenMP region, which
        # cost 1.5-3 s of a model load whenever the host's other core was busy.
        q, d, m = (np.asarray(x.detach().cpu()) if isinstance(x, torch.Tensor) else np.asarray(x) for x in (q, d, m))
        self.packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 8)
        # The kernel computes (q - 8) * scale + zero, so zero = m + 8 * d.
        d, m = d.astype(np.float32, copy=False), m.astype(np.float32, copy=False)
        self.scales_zeros = torch.from_numpy(np.stack([d.T, (m + 8 * d).T], axis=-1)).to(torch.bfloat16)
        self.group, self.dense, self.options = group, dense, options

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_zeros.numel() * self.scales_zeros.element_size()

    def __call__(self, x2d):
        if x2d.shape[0] <= self.options.int4_max_tokens:
            return _int4_mm(x2d, self.packed, self.group, self.scales_zeros)
        return self.dense(x2d)


def int4_applies(linear: nn.Linear) -> bool:
    # The CPU int4 kernel is only fast with bf16 activations, and has no bias.
    return (_int4_mm is not None and linear.weight.dtype == torch.bfloat16
            and linear.weight.device.type == "cpu" and linear.bias is None)


def prepare_model(model, int4_parts: Optional[dict] = None, prepack: bool = True) -> dict:
    """Install CPU kernels on the model's Linear layers. int4_parts: module name ->
    (q, d, m, group) from a GGUF's Q4_1 tensors. Returns counts."""
    from ..models.layers import Linear

    options = KernelOptions()
    model.kernel_options = options
    packed = int4 = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        dense = None
        if prepack and can_pack(mod.weight.dtype):
            dense = PackedLinear(mod.weight, mod.bias)
            packed += 1
        parts = (int4_parts or {}).get(name)
        if parts is not None and int4_applies(mod):
            mod.kernel = Int4Linear(*parts, dense=dense or DenseLinear(mod.weight, mod.bias), options=options)
            int4 += 1
        elif dense is not None:
            mod.kernel = dense
    return {"prepacked": packed, "int4": int4}


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
