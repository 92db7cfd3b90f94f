"""Decode and prefill speed at fixed batch sizes, against HF transformers `generate`
and the machine's roofline, all in one run (issue 5's targets 1, 3 and 4).

For each batch size B: B requests of `prompt_len` prompt tokens and `output_len`
output tokens (forced with ignore_eos, greedy), all at t=0.
- baton: one engine (baton-pd, max_num_seqs=B). Prefill tok/s = prompt tokens /
  time until every request has its first token; decode tok/s = tokens produced in
  the iterations after that / their time; end-to-end output tok/s = all output
  tokens / total time. The engine's own split of step time (model forward vs
  scheduling, input shaping, sampling, detokenization) is the overhead share.
  Run with the int4 small-batch GEMV (GGUF Q4_1 weights) and dense only, and
  with a float32 KV cache instead of the model's dtype.
- HF transformers `generate` on the same B requests as one static batch, same
  weights, dtype and thread count: end-to-end output tok/s.
  Run twice: as shipped (the issue's baseline) and with its linear layers
  given baton's oneDNN-prepacked GEMM, so the kernel is not what differs.
- llama.cpp (optional: `--llama-cpp-bench PATH` to its llama-batched-bench): measured
  in the same run, after baton's rows, on a GGUF (the model itself when it is one),
  same batches, prompt and output lengths and thread count, F16 KV cache; see
  llama_cpp.py for what it times. Its decode steps feed random tokens and sample
  nothing, so its decode tok/s is the model's step speed without a sampler.
"""
from __future__ import annotations

import gc
import time
from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..engine import EngineConfig, LLMEngine
from ..platform.cpu import INT4_MAX_TOKENS, set_int4
from ..sampling import SamplingParams

LLAMA_CPP = "llama.cpp"
BATON_NATIVE = "baton (C++ kernels)"
BATON_EAGER = "baton (eager PyTorch, same weights)"
HF_SHIPPED = "HF transformers generate"
HF_SAME_KERNELS = "HF transformers generate, linears prepacked as baton's"


def prompts_for(vocab: int, batch: int, prompt_len: int) -> list[list[int]]:
    lo = max(vocab // 16, 1)
    return [[lo + (b * 131 + j * 7) % (vocab - lo - 1) for j in range(prompt_len)] for b in range(batch)]


def fixed_batch_engine(model, tok, batch: int, prompt_len: int, kv_cache_dtype: str = "auto") -> LLMEngine:
    """baton-pd sized so that `batch` prompts of `prompt_len` are prefilled together and run as one batch."""
    return LLMEngine(EngineConfig(policy="baton-pd", max_num_seqs=batch, pool_size=batch, kv_cache_dtype=kv_cache_dtype,
                                  max_prefill_tokens=prompt_len * batch, kv_cache_bytes=2 << 30),
                     model=model, tokenizer=tok)


def add_fixed_requests(engine: LLMEngine, batch: int, prompt_len: int, output_len: int) -> None:
    """`batch` greedy requests of `prompt_len` prompt tokens and exactly `output_len` output tokens."""
    for i, p in enumerate(prompts_for(engine.cfg.vocab_size, batch, prompt_len)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True))


def baton_speed(model, tok, batch: int, prompt_len: int, output_len: int, kv_cache_dtype: str = "auto") -> dict:
    engine = fixed_batch_engine(model, tok, batch, prompt_len, kv_cache_dtype)
    t0 = time.perf_counter()
    add_fixed_requests(engine, batch, prompt_len, output_len)
    started: set[str] = set()
    produced = 0
    while len(started) < batch:
        for o in engine.step():
            started.add(o.request_id)
            produced += len(o.new_token_ids)
    t_prefill = time.perf_counter() - t0
    s0 = engine.stats()
    t1 = time.perf_counter()
    decode_tokens = 0
    while engine.has_unfinished_requests():
        decode_tokens += sum(len(o.new_token_ids) for o in engine.step())
    t_decode = time.perf_counter() - t1
    s1 = engine.stats()
    step_s, fwd_s, kv_s, sample_s = (s1[k] - s0[k] for k in
                                     ("step_seconds", "forward_seconds", "kv_copy_seconds", "sample_seconds"))
    total = produced + decode_tokens
    assert total == batch * output_len
    return {"batch": batch, "prefill_tok_s": batch * prompt_len / t_prefill, "decode_tok_s": decode_tokens / t_decode,
            "e2e_output_tok_s": total / (t_prefill + t_decode), "total_time_s": t_prefill + t_decode,
            "decode_step_ms": 1000 * t_decode / max(s1["iterations"] - s0["iterations"], 1),
            "decode_overhead_share": 1 - fwd_s / step_s if step_s else 0.0,
            "decode_forward_share": fwd_s / step_s if step_s else 0.0,
            # the overhead's parts: KV allocation and copies (embedding prefilled queries,
            # growing columns, refilling freed rows), the sampler, scheduling and Python
            "decode_kv_copy_share": kv_s / step_s if step_s else 0.0,
            "decode_sampler_share": sample_s / step_s if step_s else 0.0,
            "decode_scheduler_share": (step_s - fwd_s - kv_s - sample_s) / step_s if step_s else 0.0}


GEMM_OPS = {"mkldnn::_linear_pointwise", "aten::_weight_int4pack_mm_for_cpu", "aten::mm", "aten::addmm"}
ATTENTION_OPS = {"aten::bmm", "aten::_softmax", "aten::_index_put_impl_",
                 "aten::_scaled_dot_product_flash_attention_for_cpu"}


def profile_split(model, tok, batch: int, steps: int = 20, prompt_len: int = 64) -> dict:
    """Where a decode step's wall time goes, from torch.profiler over `steps` engine
    steps at a full batch: linear-layer GEMMs, attention kernels, other tensor ops
    (self time of each op), and the rest: Python, the scheduler, sampling and
    dispatch between ops. The profiler's own cost inflates the rest somewhat."""
    from torch.profiler import ProfilerActivity, profile

    engine = fixed_batch_engine(model, tok, batch, prompt_len)
    add_fixed_requests(engine, batch, prompt_len, steps + 8)
    for _ in range(4):  # prefill, embed, warm
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    split = {"linear GEMMs": 0.0, "attention kernels": 0.0, "other tensor ops": 0.0}
    for e in prof.key_averages():
        us = e.self_cpu_time_total
        key = "linear GEMMs" if e.key in GEMM_OPS else "attention kernels" if e.key in ATTENTION_OPS \
            else "other tensor ops"
        split[key] += us / 1e6
    split["Python, scheduler, sampling, dispatch"] = max(wall - sum(split.values()), 0.0)
    return {"batch": batch, "steps": steps, "wall_s": wall, "step_ms": 1000 * wall / steps,
            "seconds": split, "shares": {k: v / wall for k, v in split.items()}}


def gemm_share(model, batch: int, step_ms: float, reps: int = 10) -> dict:
    """A decode step's linear-layer time, replayed: every Linear's kernel, in model
    order, on a [batch, in] input, `reps` times (weights stream from memory as in a
    step). non-GEMM share = 1 - that / the engine's measured step time: kernels
    other than GEMMs, dispatch, Python and the engine."""
    from ..models.layers import Linear

    calls = []
    for mod in model.modules():
        if isinstance(mod, Linear):
            x = torch.randn(batch, mod.in_features, dtype=model.dtype)
            calls.append((mod, x))
    for mod, x in calls:
        mod.forward(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        for mod, x in calls:
            mod.forward(x)
    gemm_ms = 1000 * (time.perf_counter() - t0) / reps
    return {"decode_gemm_ms": gemm_ms, "decode_non_gemm_share": max(0.0, 1 - gemm_ms / step_ms)}


def hf_speed(hf_model, batch: int, prompt_len: int, output_len: int, vocab: int) -> dict:
    from .hf_baselines import hf_generate_static
    from .workloads import BenchRequest

    reqs = [BenchRequest(prompt=p, prompt_len=prompt_len, output_len=output_len)
            for p in prompts_for(vocab, batch, prompt_len)]
    r = hf_generate_static(hf_model, reqs, batch, progress=False)
    return {"batch": batch, "e2e_output_tok_s": r["output_throughput"], "total_time_s": r["total_time_s"]}


def llama_cpp_ratios(baton_rows: list[dict], llama_rows: list[dict]) -> dict[int, dict]:
    """Per batch: baton's decode and prefill tok/s over llama.cpp's, from rows measured in the same run."""
    by_batch = {r["batch"]: r for r in llama_rows}
    out = {}
    for r in baton_rows:
        lc = by_batch.get(r["batch"])
        out[r["batch"]] = {f"{k}_vs_llama_cpp": r[f"{k}_tok_s"] / lc[f"{k}_tok_s"]
                           if lc and lc.get(f"{k}_tok_s") else None for k in ("decode", "prefill")}
    return out


def run_perf(loaded, batches: Iterable[int] = (1, 8, 32), prompt_len: int = 64, output_len: int = 64,
             hf_models: dict | None = None, roof: dict | None = None, progress: bool = True,
             llama_cpp: dict | None = None, roofline_on: bool = True, profile_on: bool = True,
             eager_model=None) -> dict:
    """All measurements of the perf section, in this process, one after the other.
    hf_models: row name -> HF model; HF_SHIPPED is the issue's baseline, HF_SAME_KERNELS
    the same model with baton's prepacked linears.
    llama_cpp: {"binary", "gguf", "extra_args" (optional)}: run llama-batched-bench after
    baton's and HF's rows, as the LLAMA_CPP rows; its failure is recorded in
    perf["llama_cpp"]["error"] and leaves the other rows.
    roofline_on, profile_on: False skips the roofline and the torch.profiler split.
    eager_model: the same weights loaded without baton's C++ kernels, measured as
    BATON_EAGER (the "before" of the kernels, in the same run)."""
    hf_models = hf_models or {}
    from . import llama_cpp as lcpp
    from . import roofline

    batches = list(batches)
    model, tok = loaded.model, loaded.tokenizer
    has_int4 = set_int4(model, True) > 0
    native = getattr(getattr(model, "kernel_options", None), "native", False)
    # (name, model, int4 small-batch path, KV cache dtype); the first is the default configuration
    if has_int4:
        variants = [(f"baton (int4 GEMV at <= {INT4_MAX_TOKENS} tokens)", model, True, "auto"),
                    ("baton (dense only)", model, False, "auto")]
    else:
        variants = [(BATON_NATIVE if native else "baton", model, False, "auto")]
    if eager_model is not None:
        variants.append((BATON_EAGER, eager_model, False, "auto"))
    if model.dtype != torch.float32:
        variants.append((variants[0][0] + ", float32 KV cache", model, has_int4, "float32"))
    rows: dict[str, list] = {name: [] for name, _, _, _ in variants}
    bar = tqdm(total=len(batches) * (len(variants) + len(hf_models)), desc="perf", disable=not progress)
    for b in batches:
        # Every system first runs the same shapes untimed (4 output tokens): the first
        # prefill of a shape pays one-time kernel setup, not the system's speed.
        for name, m, int4, kv_dtype in variants:
            set_int4(m, int4)
            gc.collect()
            baton_speed(m, tok, b, prompt_len, 4, kv_dtype)
            rows[name].append(baton_speed(m, tok, b, prompt_len, output_len, kv_dtype))
            if name in (BATON_NATIVE, BATON_EAGER) and m.device.type == "cpu":
                rows[name][-1].update(gemm_share(m, b, rows[name][-1]["decode_step_ms"]))
            bar.update(1)
        for hf_name, hf_model in hf_models.items():
            gc.collect()
            hf_speed(hf_model, b, prompt_len, 4, model.cfg.vocab_size)
            rows.setdefault(hf_name, []).append(hf_speed(hf_model, b, prompt_len, output_len, model.cfg.vocab_size))
            bar.update(1)
    set_int4(model, True)
    bar.close()
    threads = torch.get_num_threads()
    lc_info = None
    if llama_cpp:
        extra = tuple(llama_cpp.get("extra_args", ()))
        lc_info = {"binary": str(llama_cpp["binary"]), "gguf": str(llama_cpp["gguf"]),
                   "version": lcpp.version(llama_cpp["binary"]),
                   "command": lcpp.build_command(llama_cpp["binary"], llama_cpp["gguf"], batches, prompt_len,
                                                 output_len, threads, extra_args=extra),
                   "note": "llama-batched-bench: B random prompts prefilled at once, then output_len steps of one "
                           "random token per sequence (no sampling); F16 KV cache, one KV stream per sequence; "
                           "the first -npl entry is an untimed warm-up row"}
        gc.collect()
        try:
            rows[LLAMA_CPP] = lcpp.run_batched_bench(llama_cpp["binary"], llama_cpp["gguf"], batches, prompt_len,
                                                     output_len, threads, extra_args=extra)
        except lcpp.LlamaCppBenchError as e:
            lc_info["error"] = str(e)
            print(f"perf: llama.cpp failed, its rows are left out:\n{e}")
    on_cpu = model.device.type == "cpu"  # the profile split and the roofline are CPU measurements
    profiles = [profile_split(model, tok, b) for b in (batches[0], batches[-1])] if on_cpu and profile_on else []
    roof = roof or (roofline.measure(model, batches=batches) if on_cpu and roofline_on else None)
    ceilings = {g["batch"]: g["gemm_ceiling_tok_s"] for g in roof["gemm"]} if roof else {}
    best = rows[variants[0][0]]
    hf, hf_same = rows.get(HF_SHIPPED), rows.get(HF_SAME_KERNELS)
    vs_llama = llama_cpp_ratios(best, rows[LLAMA_CPP]) if LLAMA_CPP in rows else {}
    ratios = {}
    for i, b in enumerate(batches):
        r = best[i]
        entry = {"decode_share_of_gemm_ceiling": r["decode_tok_s"] / ceilings[b] if b in ceilings else None,
                 "decode_share_of_bandwidth_floor_bf16": r["decode_tok_s"] / (b * roof["bandwidth_ceiling_tok_s_per_row"])
                 if roof else None,
                 **vs_llama.get(b, {"decode_vs_llama_cpp": None, "prefill_vs_llama_cpp": None})}
        if hf:
            entry["e2e_vs_hf_generate"] = r["e2e_output_tok_s"] / hf[i]["e2e_output_tok_s"]
            dense = rows.get("baton (dense only)")
            if dense:
                entry["dense_e2e_vs_hf_generate"] = dense[i]["e2e_output_tok_s"] / hf[i]["e2e_output_tok_s"]
        if hf_same:
            entry["e2e_vs_hf_same_kernels"] = r["e2e_output_tok_s"] / hf_same[i]["e2e_output_tok_s"]
        ratios[b] = entry
    perf = {"prompt_len": prompt_len, "output_len": output_len, "rows": rows, "ratios": ratios, "roofline": roof,
            "profile": profiles, "threads": threads}
    if lc_info:
        perf["llama_cpp"] = lc_info
    return perf


def render_perf(perf: dict) -> str:
    lines = [f"Requests: B x ({perf['prompt_len']}-token prompt, {perf['output_len']} output tokens), "
             f"all at t=0; {perf['threads']} threads.", "",
             "Decode steps' time outside the model's forward (overhead), and its parts: KV allocation and "
             "copies, the sampler, and scheduling and Python (the rest).", "",
             "| system | batch | prefill tok/s | decode tok/s | end-to-end out tok/s | decode overhead share "
             "| KV copies | sampler | scheduler and Python |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in perf["rows"].items():
        for r in rows:
            f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
            lines.append(f"| {name} | {r['batch']} | {f('prefill_tok_s')} | {f('decode_tok_s')} | "
                         f"{f('e2e_output_tok_s')} | {f('decode_overhead_share', '{:.1%}')} | "
                         f"{f('decode_kv_copy_share', '{:.1%}')} | {f('decode_sampler_share', '{:.1%}')} | "
                         f"{f('decode_scheduler_share', '{:.1%}')} |")
    lc = perf.get("llama_cpp")
    if lc:
        if lc.get("skipped"):
            lines += ["", f"llama.cpp: not run ({lc['skipped']})."]
        else:
            ver = (lc.get("version") or {}).get("text", "version not printed").replace("\n", "; ")
            lines += ["", f"llama.cpp: measured in this run with {lc['binary']} ({ver}) on {lc['gguf']}; "
                          f"{lc['note']}; its end-to-end out tok/s is B x output tokens / (prefill + decode time)."]
            if lc.get("error"):
                lines.append(f"llama.cpp failed: {lc['error'].splitlines()[0]}")
    lines += ["", "| batch | baton e2e / HF generate | dense-only e2e / HF | baton e2e / HF with baton's GEMMs "
                  "| decode / GEMM ceiling (model's GEMM shapes) | decode / bf16 bandwidth floor "
                  "| decode / llama.cpp | prefill / llama.cpp |",
              "|---|---|---|---|---|---|---|---|"]
    for b, r in perf["ratios"].items():
        g = lambda k, fmt="{:.2f}x": fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {b} | {g('e2e_vs_hf_generate')} | {g('dense_e2e_vs_hf_generate')} | "
                     f"{g('e2e_vs_hf_same_kernels')} | "
                     f"{g('decode_share_of_gemm_ceiling', '{:.0%}')} | "
                     f"{g('decode_share_of_bandwidth_floor_bf16', '{:.0%}')} | {g('decode_vs_llama_cpp')} | "
                     f"{g('prefill_vs_llama_cpp')} |")
    shares = [(name, r) for name, rs in perf["rows"].items() for r in rs if "decode_non_gemm_share" in r]
    if shares:
        lines += ["", "Decode step: linear layers' time (each layer's kernel replayed in model order on a "
                      "[batch, in] input) against the engine's measured step; the rest (other kernels, dispatch, "
                      "Python, the engine) is the non-GEMM share.", "",
                  "| system | batch | step ms | GEMM ms | non-GEMM share |", "|---|---|---|---|---|"]
        for name, r in shares:
            lines.append(f"| {name} | {r['batch']} | {r['decode_step_ms']:.2f} | {r['decode_gemm_ms']:.2f} | "
                         f"{r['decode_non_gemm_share']:.1%} |")
    if perf.get("profile"):
        keys = list(perf["profile"][0]["shares"])
        lines += ["", "Decode step split (torch.profiler, self time per op category; the rest is Python, "
                      "scheduling, sampling and dispatch between ops, inflated by the profiler itself):", "",
                  "| batch | step ms (profiled) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for pr in perf["profile"]:
            lines.append(f"| {pr['batch']} | {pr['step_ms']:.1f} | "
                         + " | ".join(f"{pr['shares'][k]:.1%}" for k in keys) + " |")
    return "\n".join(lines)


def cmd_perf(args) -> int:
    import json
    from pathlib import Path

    from . import plots
    from ..platform.cpu import prepack_foreign_linears
    from .hf_baselines import load_hf_model
    from .report import machine_info
    from .throughput import load_for_bench

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    batches = parse_batches(args.batches) if args.batches else (1, 4) if args.quick else (1, 8, 32)
    loaded = load_for_bench(args.model, args.dtype, args.device)
    # The eager path over the same weights, measured beside the kernels ("before" and "after").
    eager = None
    if getattr(getattr(loaded.model, "kernel_options", None), "native", False):
        eager = load_for_bench(args.model, args.dtype, args.device, native_kernels=False).model
    llama_cpp, lc_skipped = None, None
    if args.llama_cpp_bench:
        gguf = args.llama_cpp_gguf or (loaded.path if str(loaded.path).lower().endswith(".gguf") else None)
        if gguf is None:
            lc_skipped = (f"the model {loaded.path} is not a GGUF and no --llama-cpp-gguf was given")
            print(f"perf: llama.cpp skipped: {lc_skipped}")
        else:
            # fail before the long baton runs, not after them (a ValueError: `baton` prints it, exit status 2)
            for what, path in (("llama-batched-bench", args.llama_cpp_bench), ("GGUF for llama.cpp", gguf)):
                if not Path(path).is_file():
                    raise ValueError(f"{what} not found at {path}")
            # on the CPU, keep a GPU build of llama.cpp on the CPU too
            llama_cpp = {"binary": str(Path(args.llama_cpp_bench).resolve()), "gguf": str(Path(gguf).resolve()),
                         "extra_args": ("-ngl", "0") if loaded.model.device.type == "cpu" else ()}
    hf = {}
    if not args.no_hf and loaded.model.device.type != "cpu":
        print("perf: the HF transformers baselines run on the CPU only; skipped on", loaded.model.device)
    elif not args.no_hf:
        hf[HF_SHIPPED] = load_hf_model(loaded.path, loaded.dtype)
        hf[HF_SAME_KERNELS] = load_hf_model(loaded.path, loaded.dtype)
        prepack_foreign_linears(hf[HF_SAME_KERNELS])
    perf = run_perf(loaded, batches, 16 if args.quick else 64, 8 if args.quick else 64, hf_models=hf,
                    llama_cpp=llama_cpp, roofline_on=not args.no_roofline, profile_on=not args.no_profile,
                    eager_model=eager)
    if lc_skipped:
        perf["llama_cpp"] = {"skipped": lc_skipped}
    perf["machine"] = machine_info(loaded.dtype, torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(perf, indent=2, default=str))
    text = render_perf(perf)
    plots.perf_bars(perf, out / "perf.png", [HF_SHIPPED, HF_SAME_KERNELS], decode_baselines=[LLAMA_CPP])
    (out / "report.md").write_text(f"# Decode and prefill speed\n\nMachine: {perf['machine']}\n\n![speed](perf.png)\n\n"
                                   f"{text}\n")
    print(text)
    return 1 if (perf.get("llama_cpp") or {}).get("error") else 0


def parse_batches(text: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32]."""
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batches takes positive integers separated by commas, not {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches takes positive integers separated by commas, not {text!r}")
    return batches


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("perf", help="decode/prefill tok/s at batch 1, 8, 32 vs HF generate, llama.cpp "
                                           "and the roofline")
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda: no HF baseline, profile or roofline)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--batches", default=None, help="batch sizes, e.g. 1,8,32 (default: 1,8,32; with --quick 1,4)")
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline measurement")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler decode-step split")
    p.add_argument("--llama-cpp-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-batched-bench binary: measure llama.cpp in this run too")
    p.add_argument("--llama-cpp-gguf", default=None, metavar="PATH",
                   help="the GGUF llama.cpp runs (default: the model, when it is a .gguf)")
    p.add_argument("--out", default="benchmarks/results/perf")
    p.set_defaults(func=cmd_perf)
