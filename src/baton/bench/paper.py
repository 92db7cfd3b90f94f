"""`baton bench paper`: the BATON paper's experiments, re-run here in one go.

- Table 1 analog: total completion time of a mixed workload for static, orca,
  baton and baton-pd (and the HF transformers baselines on the same requests).
- Table 2 analog: throughput of baton and baton-pd over static at batch sizes
  4, 8, 16, 32.
- Figure 8 analog: KV memory allocated / in use over time per policy.
- The machine's roofline, measured in the same run, and each policy's decode
  throughput as a fraction of its compute and bandwidth ceilings.

Writes paper.json, report.md and PNGs into the output directory.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import plots, report, roofline
from .hf_baselines import run_hf_baselines
from .throughput import ALL_POLICIES, format_table, load_for_bench, run_policy
from .workloads import mixed_workload, make_workload, workload_summary

TABLE2_POLICIES = ("static", "baton", "baton-pd")


@dataclass
class PaperConfig:
    model: Optional[str] = None
    dtype: str = "auto"
    out: str = "benchmarks/results/paper"
    quick: bool = False
    dataset: str = "mixed"
    num_requests: int = 48
    prompt_range: tuple = (16, 512)
    output_range: tuple = (8, 256)
    batch_size: int = 16
    batch_sizes: tuple = (4, 8, 16, 32)
    table2_num_requests: Optional[int] = None  # None: the Table 1 workload
    kv_cache_bytes: Optional[int] = None
    max_prefill_tokens: int = 1024
    seed: int = 0
    num_threads: Optional[int] = None
    hf: bool = True
    progress: bool = True
    wait_quiet: float = 0.0  # before each timed run, wait up to this long for other processes to go quiet
    policies: tuple = field(default=ALL_POLICIES)

    @classmethod
    def quick_defaults(cls, **kw) -> "PaperConfig":
        base = dict(quick=True, num_requests=12, prompt_range=(8, 64), output_range=(4, 32), batch_size=4)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


def _run_row(loaded, policy, reqs, cfg: PaperConfig, batch: int, timeline: bool, desc: str, log=None) -> dict:
    quiet = report.wait_for_quiet(cfg.wait_quiet, log=log) if cfg.wait_quiet else {}
    mon = report.CpuMonitor().start()
    try:
        row = run_policy(loaded, policy, reqs, max_num_seqs=batch, kv_cache_bytes=cfg.kv_cache_bytes,
                         max_prefill_tokens=cfg.max_prefill_tokens, record_timeline=timeline,
                         progress=cfg.progress, desc=desc)
    except Exception as e:  # noqa: BLE001 - one failing policy must not lose the others' results
        row = {"policy": policy, "max_num_seqs": batch, "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8)}
    row["other_cpu_share"] = mon.stop()["other_processes_cpu_share"]
    row.update(quiet)
    return row


def run_paper(cfg: PaperConfig) -> dict:
    t_start = time.monotonic()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    threads = torch.get_num_threads()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    monitor = report.CpuMonitor().start()

    def log(msg):
        tqdm.write(f"[bench paper {time.monotonic() - t_start:6.1f}s] {msg}")

    log("loading the model")
    loaded = load_for_bench(cfg.model, cfg.dtype)
    machine = report.machine_info(loaded.dtype, threads)
    vocab = loaded.cfg.vocab_size
    max_len = loaded.cfg.max_position_embeddings
    prange = (min(cfg.prompt_range[0], max_len // 4), min(cfg.prompt_range[1], max_len // 2))
    orange = (min(cfg.output_range[0], max_len // 4), min(cfg.output_range[1], max_len // 2))
    if cfg.dataset == "mixed":
        reqs = mixed_workload(cfg.num_requests, vocab, prange, orange, seed=cfg.seed)
    else:
        reqs = make_workload(cfg.dataset, cfg.num_requests, vocab, seed=cfg.seed, tokenizer=loaded.tokenizer)
    reqs2 = reqs[: cfg.table2_num_requests] if cfg.table2_num_requests else reqs

    log("measuring the roofline")
    roof_batches = sorted({1, 32, *cfg.batch_sizes, cfg.batch_size})
    try:
        roof = roofline.measure(loaded.model, loaded.dtype, roof_batches, quick=cfg.quick)
    except Exception as e:  # noqa: BLE001
        roof = {"error": f"{type(e).__name__}: {e}"}

    jobs = [("t1", p, cfg.batch_size) for p in cfg.policies]
    jobs += [("t2", p, b) for b in cfg.batch_sizes for p in TABLE2_POLICIES
             if not (reqs2 is reqs and b == cfg.batch_size and p in cfg.policies)]
    results: dict = {}
    outer = tqdm(total=len(jobs) + (1 if cfg.hf else 0), desc="bench paper", unit="run", disable=not cfg.progress)
    for kind, pol, b in jobs:
        work = reqs if kind == "t1" else reqs2
        outer.set_postfix_str(f"{pol} batch {b}")
        row = _run_row(loaded, pol, work, cfg, b, timeline=(kind == "t1"), desc=f"{pol} b={b}", log=log)
        results[(kind, pol, b)] = row
        if row.get("error"):
            log(f"{pol} batch {b}: ERROR {row['error']}")
        else:
            log(f"{pol} batch {b}: {row['total_time_s']:.2f} s, {row['output_throughput']:.1f} out tok/s, "
                f"idle {row['idle_share']:.1%}, other processes' CPU {row['other_cpu_share']:.0%}")
        outer.update(1)

    table1 = []
    for pol in cfg.policies:
        r = dict(results[("t1", pol, cfg.batch_size)])
        r["name"] = pol
        table1.append(r)
    table2 = []
    for b in cfg.batch_sizes:
        for pol in TABLE2_POLICIES:
            r = results.get(("t2", pol, b)) or results.get(("t1", pol, b))
            if r is None:
                continue
            r = {k: v for k, v in r.items() if k != "timeline"}
            table2.append(r)

    hf = {}
    if cfg.hf:
        outer.set_postfix_str("HF transformers baselines")
        log("HF transformers baselines (loading the same weights)")
        if cfg.wait_quiet:
            report.wait_for_quiet(cfg.wait_quiet, log=log)
        mon = report.CpuMonitor().start()
        hf = run_hf_baselines(loaded.path, loaded.dtype, reqs, cfg.batch_size, loaded.tokenizer, cfg.progress,
                              baton_model=loaded.model)
        share = mon.stop()["other_processes_cpu_share"]
        for r in hf.values():
            r["other_cpu_share"] = share
        for key, r in hf.items():
            row = dict(r)
            row["name"] = r.get("system", key)
            table1.append(row)
            if r.get("error"):
                log(f"{row['name']}: ERROR {r['error']}")
            else:
                log(f"{row['name']}: {r['total_time_s']:.2f} s, {r['output_throughput']:.1f} out tok/s")
        outer.update(1)
    outer.close()

    fr = []
    if "error" not in roof:
        for r in table1:
            if r.get("decode_tok_s"):
                fr.append({"name": r["name"], **roofline.fractions(roof, r["decode_tok_s"], r["mean_decode_batch"])})

    contention = monitor.stop()
    paper = {
        "machine": machine,
        "config": {"model": loaded.path, "dtype": machine["dtype"], "quick": cfg.quick, "dataset": cfg.dataset,
                   "num_requests": len(reqs), "batch_size": cfg.batch_size, "batch_sizes": list(cfg.batch_sizes),
                   "prompt_range": list(prange), "output_range": list(orange), "seed": cfg.seed,
                   "kv_cache_bytes": cfg.kv_cache_bytes, "max_prefill_tokens": cfg.max_prefill_tokens,
                   "policies": list(cfg.policies), "table2_policies": list(TABLE2_POLICIES)},
        "workload": workload_summary(reqs),
        "table2_workload": workload_summary(reqs2),
        "requests": [{"prompt_len": r.prompt_len, "output_len": r.output_len} for r in reqs],
        "roofline": roof,
        "roofline_fractions": fr,
        "table1": table1,
        "table2": table2,
        "hf_baselines": {k: {kk: vv for kk, vv in v.items() if kk != "traceback"} for k, v in hf.items()},
        "contention": contention,
        "elapsed_s": time.monotonic() - t_start,
    }
    title = f"{Path(loaded.path).name}, {machine['dtype']}, {machine['torch_threads']} threads"
    plots.kv_timeline([r for r in table1 if r.get("timeline")], out / "fig8_kv_memory.png",
                      f"KV cache over time, batch {cfg.batch_size} ({title})")
    plots.table1_bars(table1, out / "table1.png", f"Total completion time, {len(reqs)} mixed requests, "
                                                  f"batch {cfg.batch_size} ({title})")
    plots.table2_plot(table2, out / "table2.png", f"Throughput vs batch size ({title})")
    paper["elapsed_s"] = time.monotonic() - t_start
    (out / "paper.json").write_text(json.dumps(paper, indent=1, default=str))
    (out / "report.md").write_text(report.render(paper))
    return paper


def summary_text(paper: dict) -> str:
    cols = [("name", "system", "{}"), ("total_time_s", "time s", "{:.2f}"), ("request_throughput", "req/s", "{:.3f}"),
            ("output_throughput", "out tok/s", "{:.1f}"), ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"),
            ("median_tpot_ms", "TPOT p50 ms", "{:.1f}"), ("idle_share", "idle", "{:.1%}"),
            ("kv_padding_waste", "KV pad waste", "{:.1%}")]
    lines = [f"Table 1 (batch {paper['config']['batch_size']}, {paper['workload']['num_requests']} mixed requests):",
             format_table([r for r in paper["table1"] if not r.get("error")], cols)]
    for r in paper["table1"]:
        if r.get("error"):
            lines.append(f"  {r['name']}: error: {r['error'].splitlines()[0][:200]}")
    by = {(r["policy"], r["max_num_seqs"]): r for r in paper["table2"] if not r.get("error")}
    rows = []
    for b in paper["config"]["batch_sizes"]:
        s = by.get(("static", b))
        row = {"batch": b}
        for pol in TABLE2_POLICIES:
            r = by.get((pol, b))
            row[pol] = r["output_throughput"] if r else None
            if pol != "static" and r and s and s["output_throughput"]:
                row[pol + " gain"] = r["output_throughput"] / s["output_throughput"] - 1
        rows.append(row)
    lines.append("Table 2 (output tok/s, gain over static):")
    lines.append(format_table(rows, [("batch", "batch", "{}"), ("static", "static", "{:.1f}"),
                                     ("baton", "baton", "{:.1f}"), ("baton-pd", "baton-pd", "{:.1f}"),
                                     ("baton gain", "baton gain", "{:+.1%}"),
                                     ("baton-pd gain", "baton-pd gain", "{:+.1%}")]))
    roof = paper.get("roofline") or {}
    if "copy_bandwidth_gbs" in roof:
        gemm = ", ".join("b{}={:.1f}".format(g["batch"], g["gflops"]) for g in roof["gemm"])
        lines.append(f"Roofline: GEMM {gemm} GFLOP/s; "
                     f"peak matmul {roof['peak_matmul_gflops']:.1f} GFLOP/s; copy bandwidth "
                     f"{roof['copy_bandwidth_gbs']:.1f} GB/s; compute ceiling {roof['compute_ceiling_tok_s']:.0f} tok/s")
        for f in paper.get("roofline_fractions", []):
            lines.append(f"  {f['name']}: decode {f['decode_tok_s']:.1f} tok/s at mean batch "
                         f"{f['mean_decode_batch']:.1f} = {f['frac_of_compute']:.1%} of compute ceiling, "
                         f"{f['frac_of_bandwidth']:.1%} of bandwidth ceiling")
    c = paper.get("contention") or {}
    lines.append(f"Other processes' CPU share during the run: {c.get('other_processes_cpu_share', 0):.1%}; "
                 f"elapsed {paper['elapsed_s']:.0f} s")
    return "\n".join(lines)
