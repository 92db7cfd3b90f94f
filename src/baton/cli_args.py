"""Command-line flags shared by `baton generate | chat | serve | bench` (a leaf
module: the subcommands import it, it imports none of them)."""
from __future__ import annotations

import argparse

QUANTIZATION_CHOICES = ("none", "int8", "int4")
QUANTIZATION_HELP = ("weight-only group-wise quantization of the linear layers at load time (int8: 8-bit, int4: "
                     "4-bit with scale and min per 32 weights, llama.cpp's Q8_0/Q4_1 layouts); none keeps the "
                     "checkpoint's weights")


def add_quantization_arg(p: argparse.ArgumentParser) -> None:
    """--quantization / -q {none,int8,int4} (as vLLM's flag; quantization_value() maps none to None)."""
    p.add_argument("--quantization", "-q", default="none", choices=QUANTIZATION_CHOICES,
                   help=QUANTIZATION_HELP + " (default none)")


def quantization_value(args):
    """args.quantization as the loaders take it: None, "int8" or "int4"."""
    q = getattr(args, "quantization", None)
    return None if q in (None, "none") else q


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policy", default="baton-pd", choices=["static", "orca", "baton", "baton-pd"])
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 where the CPU computes it natively, else float32), float32 or bfloat16. "
                        "In bfloat16, greedy output can depend on which other requests share the batch (the "
                        "kernels round differently per batch shape: 16 of 32 prompts differed alone vs batched in "
                        "one measurement); float32 output does not")
    add_quantization_arg(p)
    p.add_argument("--batch-invariant", action="store_true",
                   help="greedy output independent of the batch for a bfloat16/float16 model: compute in "
                        "float32 over the checkpoint's weights (bf16 values kept at half the bytes) with baton's "
                        "row-independent CPU kernels; float32 (the default where the CPU lacks native bf16) "
                        "already is")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--model-impl", default="auto", choices=["auto", "native", "transformers"],
                   help="auto: baton's own model file for the architecture when there is one, else HF "
                        "transformers' model driven through baton's caches; native / transformers: force one")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the prefilled K/V of shared prompt prefixes (system prompts, chat history) under "
                        "baton-pd and orca (default on; --no-enable-prefix-caching: off)")
    p.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="most KV budget bytes the prefix cache may hold (default: half the budget); it is "
                        "evicted first whenever a query needs the room")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the model's dtype")
    p.add_argument("--max-prefill-tokens", type=int, default=1024,
                   help="prompt tokens prefilled per iteration; longer prompts are chunked (stall-free decode)")
    p.add_argument("--pool-size", type=int, default=4, help="baton-pd: prefilled queries kept ready")
    p.add_argument("--max-preemptions", type=int, default=2,
                   help="baton-pd: how often one query may be preempted by higher-priority ones (0: never)")
    p.add_argument("--num-threads", type=int, default=None)


def engine_kwargs(args) -> dict:
    return dict(model=args.model, policy=args.policy, dtype=args.dtype, quantization=quantization_value(args),
                batch_invariant=getattr(args, "batch_invariant", False),
                device=args.device,
                model_impl=args.model_impl,
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                kv_cache_bytes=args.kv_cache_bytes, kv_cache_dtype=args.kv_cache_dtype,
                max_prefill_tokens=args.max_prefill_tokens,
                pool_size=args.pool_size, max_preemptions=args.max_preemptions, num_threads=args.num_threads,
                enable_prefix_caching=args.enable_prefix_caching, prefix_cache_bytes=args.prefix_cache_bytes)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
