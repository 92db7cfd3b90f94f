"""The machine's roofline, measured in the same run as the engine.

- GEMM rate in the model's dtype with the model's own GEMM shapes (every
  nn.Linear of the loaded model, run on its real weight as F.linear(x[b, in], W)
  and as oneDNN's prepacked GEMM, the faster counted), at several batch sizes: the time of one token-step's worth of GEMMs
  at batch b gives the GEMM-only ceiling b / t(b) tokens/s.
- Peak GEMM rate on a large square matmul (reference only).
- Memory bandwidth from a large tensor copy (bytes read + written per second).

Floors (ceilings, in tokens/s) for decode at batch b:
- compute: GEMM rate / FLOPs per token, FLOPs per token = 2 x (parameters the
  GEMMs multiply by; with tied embeddings the embedding matrix counts once, as
  the LM head). Attention FLOPs are left out (small at these context lengths).
- bandwidth: every decode step reads every weight once, so at most
  b x bandwidth / weight bytes tokens/s (KV reads left out).
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..platform.cpu import Bf16WeightLinear, Int4Linear, NativeQuantLinear, PackedLinear, can_pack


def _linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def model_sizes(model: nn.Module) -> dict:
    """Parameters and bytes of the dense model (a linear layer whose values only its
    kernel holds counts at its dense size, so ceilings compare like with like)."""
    seen, params, nbytes = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        params += p.numel()
        nbytes += p.numel() * p.element_size()
    dtype_size = next(model.parameters()).element_size()
    for mod in _linears(model):
        if mod.weight.numel() == 0:  # freed: the kernel holds the values
            params += mod.in_features * mod.out_features
            nbytes += mod.in_features * mod.out_features * dtype_size
    gemm_params = sum(m.in_features * m.out_features for m in _linears(model))
    return {"parameters": params, "weight_bytes": nbytes, "gemm_parameters": gemm_params,
            "flops_per_token": 2 * gemm_params}


def _time(fn, min_time: float = 0.15, min_reps: int = 3, max_reps: int = 200) -> float:
    """Best time of one call over repeated runs (after one warm-up call)."""
    fn()
    best, total, reps = float("inf"), 0.0, 0
    while reps < min_reps or (total < min_time and reps < max_reps):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best = min(best, dt)
        total += dt
        reps += 1
    return best


def _compact(mod: nn.Module) -> bool:
    """Whether the layer's kernel computes with its own compact copy of the weights
    (packed int4, quantized blocks, bf16 values)."""
    return isinstance(getattr(mod, "kernel", None), (Int4Linear, NativeQuantLinear, Bf16WeightLinear))


def model_linear_groups(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """(first module, count) per distinct (weight shape, compact kernel or not)."""
    counts: Counter = Counter()
    first: dict[tuple, nn.Module] = {}
    for mod in _linears(model):
        key = (mod.out_features, mod.in_features, _compact(mod))
        counts[key] += 1
        first.setdefault(key, mod)
    return [(first[k], c) for k, c in counts.items()]


def compact_path_bytes(model: nn.Module) -> Optional[int]:
    """Bytes a decode step reads when the Linear layers use their kernels' compact
    weights; None if the model has none."""
    if not any(_compact(m) for m in model.modules()):
        return None
    seen, total = set(), 0
    for mod in _linears(model):
        if _compact(mod):
            total += mod.kernel.nbytes
        elif mod.weight.data_ptr() not in seen:
            total += mod.weight.numel() * mod.weight.element_size()
        seen.add(mod.weight.data_ptr())
    return total


@torch.inference_mode()
def gemm_step_time(model: nn.Module, batch: int, dtype: torch.dtype, min_time: float = 0.15,
                   own_kernels: bool = False) -> dict:
    """One token-step's GEMMs at `batch` rows on the real weights: the faster of
    dense F.linear and oneDNN's prepacked GEMM (the machine's best dense kernel we
    know for these shapes), or (own_kernels) each Linear module's own forward,
    which may pick its compact weights (packed int4, quantized blocks, bf16)."""
    groups = model_linear_groups(model)
    total_t, total_flops = 0.0, 0
    for mod, count in groups:
        w = mod.dense_weight().detach().to(dtype)
        x = torch.randn(batch, w.shape[1], dtype=dtype)
        share = min_time / max(len(groups), 1)
        if own_kernels:
            t = _time(lambda: mod(x), min_time=share)
        else:
            t = _time(lambda: F.linear(x, w), min_time=share)
            if w.device.type == "cpu" and can_pack(w.dtype):
                packed = PackedLinear(w, None, batch)
                t = min(t, _time(lambda: packed(x), min_time=share))
        total_t += t * count
        total_flops += 2 * batch * w.numel() * count
    return {"batch": batch, "step_gemm_time_s": total_t, "gflops": total_flops / total_t / 1e9,
            "gemm_ceiling_tok_s": batch / total_t}


@torch.inference_mode()
def peak_matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = _time(lambda: torch.mm(a, b), min_time=0.3, min_reps=2)
    return 2 * n ** 3 / t / 1e9


@torch.inference_mode()
def copy_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), min_time=0.3, min_reps=3)
    return 2 * nbytes / t / 1e9


def measure(model: nn.Module, dtype: Optional[torch.dtype] = None, batches: Iterable[int] = (1, 32),
            quick: bool = False) -> dict:
    dtype = dtype or next(model.parameters()).dtype
    sizes = model_sizes(model)
    min_time = 0.05 if quick else 0.2
    gemm = [gemm_step_time(model, b, dtype, min_time) for b in sorted(set(batches))]
    compact_bytes = compact_path_bytes(model)
    if compact_bytes is not None:
        # the model's own Linear forward (its kernels' compact weights where they run)
        for g in gemm:
            own = gemm_step_time(model, g["batch"], dtype, min_time, own_kernels=True)
            g["own_kernels_step_gemm_time_s"] = own["step_gemm_time_s"]
            g["own_kernels_gflops"] = own["gflops"]
            g["own_kernels_ceiling_tok_s"] = own["gemm_ceiling_tok_s"]
    bw = copy_bandwidth_gbs(64 << 20 if quick else 256 << 20)
    peak = peak_matmul_gflops(dtype, 512 if quick else 2048)
    big = max(gemm, key=lambda g: g["batch"])
    return {
        "dtype": str(dtype).replace("torch.", ""),
        **sizes,
        "gemm": gemm,
        "peak_matmul_gflops": peak,
        "peak_matmul_n": 512 if quick else 2048,
        "copy_bandwidth_gbs": bw,
        "compute_ceiling_tok_s": big["gflops"] * 1e9 / sizes["flops_per_token"],
        "compute_ceiling_batch": big["batch"],
        "bandwidth_ceiling_tok_s_per_row": bw * 1e9 / sizes["weight_bytes"],
        "compact_path_weight_bytes": compact_bytes,
        "compact_path_bandwidth_ceiling_tok_s_per_row": bw * 1e9 / compact_bytes if compact_bytes else None,
    }


def gemm_ceiling_at(roof: dict, batch: float) -> float:
    """GEMM-only ceiling (tok/s) at `batch`, the step time interpolated linearly
    between the measured batch sizes (clamped at the ends)."""
    pts = sorted((g["batch"], g["step_gemm_time_s"]) for g in roof.get("gemm", []))
    if not pts or batch <= 0:
        return 0.0
    if batch <= pts[0][0]:
        t = pts[0][1]
    elif batch >= pts[-1][0]:
        t = pts[-1][1] * batch / pts[-1][0]
    else:
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if b0 <= batch <= b1:
                t = t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
                break
    return batch / t


def fractions(roof: dict, decode_tok_s: float, mean_batch: float) -> dict:
    """A policy's decode throughput as a fraction of the compute and bandwidth ceilings."""
    comp = roof["compute_ceiling_tok_s"]
    bw = roof["bandwidth_ceiling_tok_s_per_row"] * max(mean_batch, 0.0)
    floor = min(comp, bw) if bw else comp
    return {
        "decode_tok_s": decode_tok_s,
        "mean_decode_batch": mean_batch,
        "compute_ceiling_tok_s": comp,
        "bandwidth_ceiling_tok_s": bw,
        "roofline_tok_s": floor,
        "gemm_ceiling_tok_s": gemm_ceiling_at(roof, mean_batch),
        "frac_of_compute": decode_tok_s / comp if comp else 0.0,
        "frac_of_bandwidth": decode_tok_s / bw if bw else 0.0,
        "frac_of_roofline": decode_tok_s / floor if floor else 0.0,
        "frac_of_gemm_ceiling": decode_tok_s / gemm_ceiling_at(roof, mean_batch) if mean_batch > 0 else 0.0,
    }
