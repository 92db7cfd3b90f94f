"""Native model files vs the generic HF transformers backend: the same engine, the same
weights, the same fixed greedy workload (`baton bench impls`).

For each batch size B: B requests of `prompt_len` prompt tokens and exactly `output_len`
output tokens, all at t=0, run by one baton-pd engine sized to B (perf.fixed_batch_engine)
over each model implementation:
- native: baton's own family file (fused QKV and gate/up GEMMs, oneDNN-prepacked linears,
  and on bf16 GGUF weights the int4 small-batch GEMV; also run dense-only then);
- transformers: the unmodified HF model through models/transformers_backend.py (the HF
  layers' nn.Linear as shipped, the HF Python per layer; attention is baton's contexts);
- transformers, linears prepacked: a second copy of the HF model with its nn.Linear layers
  given baton's prepacked GEMM (platform.cpu.prepack_foreign_linears), so what remains
  between it and the native (dense) row is the model code (unfused projections, HF's
  Python per layer), not the kernel.
Prefill, decode and end-to-end tok/s as perf.baton_speed measures them; ratios are
transformers / native (below 1: the backend is slower).
"""
from __future__ import annotations

import gc
from typing import Iterable, Optional

import torch

from .perf import baton_speed

NATIVE = "native"
NATIVE_DENSE = "native (dense only)"
TF = "transformers backend"
TF_PREPACKED = "transformers backend, linears prepacked as baton's"


def greedy_agreement(native, tf, tok, batch: int, prompt_len: int, output_len: int) -> float:
    """Share of output tokens the two implementations agree on (position by position)
    for the benchmark's own requests: a check that the rows compare the same work."""
    from .perf import add_fixed_requests, fixed_batch_engine

    outs = []
    for model in (native, tf):
        engine = fixed_batch_engine(model, tok, batch, prompt_len)
        add_fixed_requests(engine, batch, prompt_len, output_len)
        got = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        outs.append(got)
    same = total = 0
    for rid, a in outs[0].items():
        b = outs[1][rid]
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return same / max(total, 1)


def run_impls(model_path: Optional[str] = None, dtype: str = "auto", batches: Iterable[int] = (1, 8, 32),
              prompt_len: int = 64, output_len: int = 64, same_kernels: bool = True, wait_quiet: float = 0.0,
              progress: bool = True) -> dict:
    """Rows per implementation ({name: [baton_speed row per batch]}) and, per batch, the
    transformers / native ratios. Implementations take turns at each batch size (so a
    change in machine load hits them alike), each timed run after an untimed one of the
    same shapes (4 output tokens: one-time kernel setup is not timed). Each row records
    the CPU share other processes took while it ran (report.CpuMonitor); with
    wait_quiet > 0 each timed run first waits up to that long for the machine to go quiet."""
    from tqdm.auto import tqdm

    from ..models.loader import default_model_path, load_model
    from ..platform.cpu import prepack_foreign_linears, set_int4
    from ..tokenizer import load_tokenizer
    from .report import CpuMonitor, wait_for_quiet

    path = model_path or default_model_path()
    batches = list(batches)
    native, cfg = load_model(path, dtype)
    tf, _ = load_model(path, dtype, model_impl="transformers")
    tok = load_tokenizer(path, cfg.eos_token_ids)
    has_int4 = set_int4(native, True) > 0
    # (row name, model, int4 small-batch path on)
    variants = [(NATIVE, native, True)] + ([(NATIVE_DENSE, native, False)] if has_int4 else []) + [(TF, tf, False)]
    prepacked = 0
    if same_kernels:
        # A second copy, so that every implementation can run at every batch size in turn.
        tf_packed, _ = load_model(path, dtype, model_impl="transformers")
        prepacked = prepack_foreign_linears(tf_packed.hf)
        if prepacked:
            variants.append((TF_PREPACKED, tf_packed, False))
    rows: dict[str, list] = {name: [] for name, _, _ in variants}
    bar = tqdm(total=len(batches) * len(variants), desc="impls", disable=not progress)
    for b in batches:
        for name, model, int4 in variants:
            set_int4(model, int4)
            gc.collect()
            baton_speed(model, tok, b, prompt_len, 4)
            quiet = wait_for_quiet(wait_quiet) if wait_quiet else {}
            mon = CpuMonitor().start()
            row = baton_speed(model, tok, b, prompt_len, output_len)
            row["other_processes_cpu_share"] = mon.stop()["other_processes_cpu_share"]
            row.update(quiet)
            rows[name].append(row)
            bar.update(1)
    set_int4(native, True)
    bar.close()
    agreement = greedy_agreement(native, tf, tok, min(batches[-1], 8), prompt_len, min(output_len, 16))
    ratios = {}
    dense = rows.get(NATIVE_DENSE, rows[NATIVE])
    keys = ("prefill_tok_s", "decode_tok_s", "e2e_output_tok_s")
    for i, b in enumerate(batches):
        n, t = rows[NATIVE][i], rows[TF][i]
        entry = {f"{k}_tf_vs_native": t[k] / n[k] for k in keys}
        if TF_PREPACKED in rows:
            p = rows[TF_PREPACKED][i]
            entry.update({f"{k}_tf_prepacked_vs_native_dense": p[k] / dense[i][k] for k in keys})
        ratios[b] = entry
    shares = [r["other_processes_cpu_share"] for rs in rows.values() for r in rs]
    return {"model": str(path), "dtype": str(native.dtype).replace("torch.", ""), "prompt_len": prompt_len,
            "output_len": output_len, "batches": batches, "threads": torch.get_num_threads(),
            "hf_class": tf.cfg.extra.get("hf_class"), "int4": has_int4, "prepacked_hf_linears": prepacked,
            "greedy_token_agreement": agreement, "max_other_processes_cpu_share": max(shares),
            "rows": rows, "ratios": ratios}


def render_impls(res: dict) -> str:
    lines = [f"Model {res['model']} ({res['dtype']}; HF class {res['hf_class']}), {res['threads']} threads. "
             f"Requests: B x ({res['prompt_len']}-token prompt, {res['output_len']} output tokens), all at t=0, "
             "greedy, one baton-pd engine per run.", "",
             f"Greedy tokens the native and transformers implementations agree on (the benchmark's own "
             f"requests): {res['greedy_token_agreement']:.1%}.", "",
             "Other processes' CPU share during each timed run is in the last column: rows taken while it "
             "is well above 0 are not trustworthy timings.", "",
             "| implementation | batch | prefill tok/s | decode tok/s | end-to-end out tok/s | decode step ms "
             "| decode forward share | other processes' CPU |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in res["rows"].items():
        for r in rows:
            lines.append(f"| {name} | {r['batch']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                         f"{r['e2e_output_tok_s']:.1f} | {r['decode_step_ms']:.1f} | "
                         f"{r['decode_forward_share']:.0%} | {r['other_processes_cpu_share']:.0%} |")
    keys = list(next(iter(res["ratios"].values())))
    lines += ["", "Ratios (transformers / native; the prepacked row against native dense-only):", "",
              "| batch | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for b, r in res["ratios"].items():
        lines.append(f"| {b} | " + " | ".join(f"{r[k]:.2f}x" for k in keys) + " |")
    return "\n".join(lines)


def cmd_impls(args) -> int:
    import json
    from pathlib import Path

    from .report import machine_info

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    batches = (1, 8) if args.quick else (1, 8, 32)
    wait = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 60.0)
    res = run_impls(args.model, args.dtype, batches, args.prompt_len, 16 if args.quick else args.output_len,
                    same_kernels=not args.no_prepacked, wait_quiet=wait, progress=not args.no_progress)
    res["machine"] = machine_info(res["dtype"], torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "impls.json").write_text(json.dumps(res, indent=2, default=str))
    text = render_impls(res)
    (out / "report.md").write_text(f"# Native model files vs the HF transformers backend\n\n"
                                   f"Machine: {res['machine']}\n\n{text}\n")
    print(text)
    print(f"wrote {out / 'impls.json'} and {out / 'report.md'}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("impls", help="native model files vs the HF transformers backend, same engine and "
                                            "workload, at batch 1, 8, 32")
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quick", action="store_true", help="batches 1 and 8, 16 output tokens")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--no-prepacked", action="store_true",
                   help="skip the run with the HF linears given baton's prepacked GEMM")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                   help="before each timed run wait up to S seconds for other processes to leave the CPU "
                        "(default 60; quick 0)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="benchmarks/results/impls")
    p.set_defaults(func=cmd_impls)
