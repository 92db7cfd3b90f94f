"""`baton bench ppl`: perplexity on a fixed text, computed as llama.cpp's
`llama-perplexity` computes it by default, so the numbers compare with it on the
same GGUF.

The convention (tools/perplexity/perplexity.cpp, `perplexity()`, ppl_stride 0):

- the whole text is tokenized once, with the special tokens the tokenizer adds
  (`common_tokenize(ctx, params.prompt, true)`: a BOS where the vocabulary says
  add_bos; HF's tokenizer, used here, would also read special-token strings in
  the text as special tokens, which llama.cpp's parse_special=false does not: no
  such string is in the committed text);
- it is cut into n_chunk = len(tokens) // ctx non-overlapping chunks of ctx
  tokens (the tail is dropped); at least 2 * ctx tokens are required;
- where the tokenizer adds a BOS, the first token of every chunk is replaced by
  BOS for the forward (`if (add_bos && j == 0) tokens[seq_start] = bos`); the
  scored targets are the original tokens (position 0 is never a target);
- each chunk is one forward from an empty cache, positions 0..ctx-1;
- with first = ctx // 2, the logits at positions first .. ctx-2 are scored
  against the tokens at positions first+1 .. ctx-1: ctx - first - 1 tokens per
  chunk (255 for ctx 512), `-log softmax(logits[j])[tokens[j+1]]`;
- PPL = exp(sum of NLL / tokens scored) over all chunks so far (the running
  value printed after each chunk), with llama.cpp's uncertainty
  PPL * sqrt((E[nll^2] - E[nll]^2) / (count - 1)).

Log-softmax is taken in float32 whatever the model's dtype; sums in float64.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TEXT = REPO_ROOT / "benchmarks" / "data" / "ppl" / "tinyshakespeare_head.txt"
DEFAULT_QUANTIZATIONS = ("none", "int8", "int4")


# ---------------------------------------------------------------- tokens

def read_text(path) -> str:
    """The file's text as llama.cpp's `-f` reads it: one trailing newline dropped."""
    text = Path(path).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def tokenizer_bos(tokenizer) -> Optional[int]:
    """The BOS id where the tokenizer adds one to an encoded text (llama.cpp's
    add_bos), else None: a model may have a BOS id its tokenizer never adds
    (SmolLM2's GGUF: tokenizer.ggml.add_bos_token false), and llama.cpp then
    replaces nothing."""
    hf = tokenizer.hf
    bos = hf.bos_token_id
    if bos is None:
        return None
    added = hf.encode("a", add_special_tokens=True)[:1] == [bos]
    return bos if added and hf.encode("a", add_special_tokens=False)[:1] != [bos] else None


def tokenize(tokenizer, text: str) -> tuple[list[int], Optional[int]]:
    """(token ids of the whole text with the tokenizer's special tokens, the BOS id
    it adds or None)."""
    if tokenizer is None:
        raise ValueError("perplexity needs a tokenizer: this model directory has no tokenizer files")
    return tokenizer.encode(text), tokenizer_bos(tokenizer)


# ---------------------------------------------------------------- perplexity

def _one_row_cache(model, width: int):
    from ..cache import KVBudget, KVSpec, ShapedKV, resolve_kv_dtype

    spec = KVSpec.of(model.cfg, resolve_kv_dtype("auto", model.dtype), model.device)
    return ShapedKV(spec, KVBudget(spec.reservation_bytes(1, width)), rows=1, width=width)


def chunk_logprobs(model, cache, chunk: Sequence[int], first: int) -> torch.Tensor:
    """One forward over `chunk` (positions 0..T-1, the cache's row 0 from column 0):
    float32 log-probabilities of chunk[j+1] given chunk[..j], for j = first .. T-2."""
    from ..attention import ShapedAttention

    T = len(chunk)
    device = model.device
    ids = torch.tensor([list(chunk)], dtype=torch.long, device=device)
    pos = torch.arange(T, dtype=torch.long, device=device).view(1, T)
    ctx = ShapedAttention(cache, starts=[0], counts=[T])
    rows = torch.arange(first, T - 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = model(ids, pos, ctx, logit_index=(torch.zeros_like(rows), rows))  # [T-1-first, vocab]
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = ids[0, first + 1:]
        return logp.gather(1, targets.view(-1, 1)).view(-1).cpu()


def perplexity_of_ids(model, tokens: Sequence[int], ctx: int = 512, max_chunks: Optional[int] = None,
                      bos_id: Optional[int] = None, progress: bool = True) -> dict:
    """Perplexity of `tokens` (already tokenized, with any BOS at the front) in
    llama.cpp's chunks (see the module docstring); `bos_id` replaces the first
    token of every chunk for the forward, as llama.cpp does where add_bos."""
    from tqdm.auto import tqdm

    if ctx < 4:
        raise ValueError(f"--ctx must be >= 4; got {ctx}")
    tokens = list(tokens)
    if len(tokens) < 2 * ctx:
        raise ValueError(f"perplexity needs at least {2 * ctx} tokens for a context of {ctx} "
                         f"(as llama-perplexity); the text tokenizes to only {len(tokens)}")
    n_chunk = len(tokens) // ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise ValueError(f"--max-chunks must be >= 1; got {max_chunks}")
        n_chunk = min(n_chunk, max_chunks)
    first = ctx // 2
    cache = _one_row_cache(model, ctx)
    nll = nll2 = 0.0
    count = 0
    running = []
    for i in tqdm(range(n_chunk), desc="perplexity", unit="chunk", disable=not progress, leave=False):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        if bos_id is not None:
            chunk[0] = bos_id  # the targets are chunk[first+1:], never position 0
        lp = chunk_logprobs(model, cache, chunk, first).double()
        nll -= lp.sum().item()
        nll2 += lp.square().sum().item()
        count += lp.numel()
        running.append(math.exp(nll / count))
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else None,
            "nll_mean": mean, "tokens_scored": count, "chunks": n_chunk, "ctx": ctx,
            "tokens_total": len(tokens), "bos_replaced": bos_id is not None, "running_ppl": running}


def perplexity(model, tokenizer, text: str, ctx: int = 512, max_chunks: Optional[int] = None,
               progress: bool = True) -> dict:
    """llama-perplexity's default number for `model` on `text` (module docstring):
    {"ppl", "ppl_stderr", "nll_mean", "tokens_scored", "chunks", "ctx", "tokens_total",
    "bos_replaced", "running_ppl" (after each chunk)}."""
    tokens, bos = tokenize(tokenizer, text)
    return perplexity_of_ids(model, tokens, ctx, max_chunks, bos, progress)


# ---------------------------------------------------------------- llama.cpp

_FINAL = re.compile(r"Final estimate:\s*PPL\s*=\s*([0-9.eE+-]+|nan|inf)\s*\+/-\s*([0-9.eE+-]+|nan|inf)")
_RUNNING = re.compile(r"\[(\d+)\]\s*([0-9.eE+-]+|nan|inf),")


def parse_llama_perplexity(output: str) -> dict:
    """{"ppl", "ppl_stderr", "chunks"} from llama-perplexity's output (stdout and
    stderr together): its `Final estimate: PPL = X +/- Y` line, and the count of
    its running `[i]ppl,` values. Without a final line (llama.cpp skips it when the
    variance comes out negative) the last running value is taken."""
    running = _RUNNING.findall(output)
    chunks = max((int(i) for i, _ in running), default=None)
    found = _FINAL.findall(output)
    if found:
        ppl, err = found[-1]
        return {"ppl": float(ppl), "ppl_stderr": float(err), "chunks": chunks}
    if running:
        return {"ppl": float(running[-1][1]), "ppl_stderr": None, "chunks": chunks}
    raise ValueError("no `Final estimate: PPL = ...` line in llama-perplexity's output")


def llama_perplexity_command(binary: str, gguf: str, text_file: str, ctx: int, threads: int,
                             max_chunks: Optional[int] = None) -> list[str]:
    cmd = [str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-t", str(threads)]
    return cmd + (["--chunks", str(max_chunks)] if max_chunks else [])


def run_llama_perplexity(binary: str, gguf: str, text_file: str, ctx: int, threads: int,
                         max_chunks: Optional[int] = None, timeout: Optional[float] = None) -> dict:
    cmd = llama_perplexity_command(binary, gguf, text_file, ctx, threads, max_chunks)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + "\n" + proc.stderr
    try:
        res = parse_llama_perplexity(output)
    except ValueError as e:
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise ValueError(f"{' '.join(cmd)} (exit {proc.returncode}): {e}; output ends:\n{tail}") from None
    half = ctx // 2
    res.update(command=cmd, returncode=proc.returncode, ctx=ctx,
               tokens_scored=res["chunks"] * (ctx - half - 1) if res["chunks"] else None)
    return res


# ---------------------------------------------------------------- report

def _delta(row: dict, base: Optional[dict]) -> tuple[Optional[float], Optional[float]]:
    if base is None:
        return None, None
    d = row["ppl"] - base["ppl"]
    return d, 100.0 * d / base["ppl"]


def format_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["name"] == "none" and r.get("ppl") is not None), None)
    lines = ["| quantization | PPL | ± | Δ vs none | Δ % | tokens scored | chunks |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("ppl") is None:
            lines.append(f"| {r['name']} | error: {r.get('error', '?')} | | | | | |")
            continue
        d, pct = _delta(r, base)
        err = "-" if r.get("ppl_stderr") is None else f"{r['ppl_stderr']:.4f}"
        ds = "-" if d is None else f"{d:+.4f}"
        ps = "-" if pct is None else f"{pct:+.2f}%"
        lines.append(f"| {r['name']} | {r['ppl']:.4f} | {err} | {ds} | {ps} | {r.get('tokens_scored') or '-'} | "
                     f"{r.get('chunks') or '-'} |")
    return "\n".join(lines)


def report_md(result: dict) -> str:
    m = result["machine"]
    t = result["text"]
    chunks = "all chunks" if result["max_chunks"] is None else f"at most {result['max_chunks']} chunks"
    bos = "; BOS replaces the first token of each chunk" if result["bos_replaced"] else ""
    lines = ["# Perplexity (llama.cpp's convention)", "",
             f"Model: `{result['model']}`, dtype {result['dtype']}. Text: `{t['path']}` ({t['chars']} characters as "
             f"read, sha256 {t['sha256'][:16]}..., {result['tokens_total']} tokens). Context {result['ctx']}, "
             f"{chunks}{bos}.", "",
             f"Machine: {m['cpu_model']}, {m['logical_cores']} cores, {m['torch_threads']} torch threads, "
             f"torch {m['torch_version']}, {m['date']}.", "",
             format_table(result["rows"]), "",
             "Scored as `llama-perplexity` does by default: non-overlapping chunks of ctx tokens, one forward "
             "each from an empty cache; in each chunk the logits at positions ctx/2 .. ctx-2 predict the tokens "
             "at ctx/2+1 .. ctx-1 (ctx - ctx/2 - 1 tokens per chunk); PPL = exp(mean NLL); ± is llama.cpp's "
             "uncertainty. Δ is against baton's unquantized row."]
    cmds = [r for r in result["rows"] if r.get("command")]
    if cmds:
        lines += ["", "llama.cpp commands:", ""] + [f"- {r['name']}: `{' '.join(r['command'])}`" for r in cmds]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command

def _is_gguf(path: str) -> bool:
    from ..models.gguf import looks_like_gguf

    p = Path(path)
    return p.is_file() and (p.suffix == ".gguf" or looks_like_gguf(p))


def _named_gguf(text: str) -> tuple[str, str]:
    import argparse

    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH; got {text!r}")
    return name, path


def cmd_ppl(args) -> int:
    from ..models.loader import default_model_path
    from ..platform import configure
    from .report import machine_info
    from .throughput import load_for_bench

    configure("cpu", args.num_threads)
    threads = torch.get_num_threads()
    path = str(args.model or default_model_path())
    text_path = Path(args.text)
    if not text_path.is_file():
        raise ValueError(f"text file not found: {text_path}")
    text = read_text(text_path)
    progress = not args.no_progress
    rows, notes = [], []
    tokens = bos = None
    dtype = None
    for q in args.quantization:
        # The loader's `quantization` keyword ("int8" / "int4"; None = the weights as stored).
        kw = {} if q == "none" else {"quantization": q}
        try:
            loaded = load_for_bench(path, args.dtype, **kw)
        except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
            print(f"WARNING: quantization {q}: could not load: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"name": q, "ppl": None, "error": f"{type(e).__name__}: {e}"})
            continue
        dtype = loaded.dtype
        if tokens is None:
            tokens, bos = tokenize(loaded.tokenizer, text)
        res = perplexity_of_ids(loaded.model, tokens, args.ctx, args.max_chunks, bos, progress)
        rows.append({"name": q, **res})
        print(f"{q}: PPL {res['ppl']:.4f} over {res['tokens_scored']} tokens ({res['chunks']} chunks)")
        del loaded
        gc.collect()
    if args.llama_perplexity:
        targets = []
        if _is_gguf(path):
            targets.append(("llama.cpp", path))
        else:
            notes.append(f"{path} is not a GGUF file: no llama.cpp row for it")
            print(f"note: {notes[-1]}")
        targets += [(f"llama.cpp {name}", p) for name, p in args.llama_gguf]
        for name, gguf in targets:
            try:
                res = run_llama_perplexity(args.llama_perplexity, gguf, str(text_path), args.ctx, threads,
                                           args.max_chunks)
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                print(f"WARNING: {name}: {e}", file=sys.stderr)
                rows.append({"name": name, "ppl": None, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                continue
            rows.append({"name": name, "gguf": gguf, **res})
            print(f"{name}: PPL {res['ppl']:.4f}")
    elif args.llama_gguf:
        notes.append("--llama-gguf given without --llama-perplexity: no llama.cpp rows")
        print(f"note: {notes[-1]}")
    raw = text_path.read_bytes()
    result = {"machine": machine_info(dtype or "unknown", threads), "model": path,
              "dtype": str(dtype).replace("torch.", "") if dtype else args.dtype,
              "text": {"path": str(text_path), "chars": len(text), "sha256": hashlib.sha256(raw).hexdigest()},
              "tokens_total": len(tokens) if tokens is not None else None, "bos_replaced": bos is not None,
              "ctx": args.ctx, "max_chunks": args.max_chunks, "rows": rows, "notes": notes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(report_md(result))
    print(format_table(rows))
    print(f"wrote {out / 'ppl.json'} and {out / 'report.md'}")
    return 1 if any(r.get("ppl") is None for r in rows) else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ppl", help="perplexity per quantization on a fixed text, as llama-perplexity "
                                          "computes it (optionally beside llama.cpp's own)")
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    p.add_argument("--quantization", nargs="+", default=list(DEFAULT_QUANTIZATIONS), metavar="Q",
                   help="none (the weights as stored), int8, int4 ... one row each (default: none int8 int4)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama-perplexity's -c; default 512)")
    p.add_argument("--max-chunks", type=int, default=None, help="score at most N chunks (llama.cpp's --chunks)")
    p.add_argument("--text", default=str(DEFAULT_TEXT),
                   help="UTF-8 text file (default: the first ~60k characters of tinyshakespeare)")
    p.add_argument("--llama-perplexity", default=None, metavar="PATH",
                   help="llama.cpp's llama-perplexity binary: adds a row for it on the same GGUF and text")
    p.add_argument("--llama-gguf", type=_named_gguf, action="append", default=[], metavar="NAME=PATH",
                   help="also run llama-perplexity on this GGUF (e.g. Q8_0=model.Q8_0.gguf): row 'llama.cpp NAME'")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads, and llama.cpp's -t")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="benchmarks/results/ppl")
    p.set_defaults(func=cmd_ppl)
