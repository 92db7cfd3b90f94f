"""llama.cpp measured in the same run: its own `llama-batched-bench` tool, run as a
subprocess on a GGUF, its markdown table parsed into rows like baton's.

What llama-batched-bench times (tools/batched-bench/batched-bench.cpp): for each
batch size B (-npl), B independent sequences of PP random prompt tokens (-npp)
decoded at once (prefill, timed until synchronized), then TG steps (-ntg) that
each decode one token per sequence (random tokens, no sampling). Its columns:
S_PP = B*PP / T_PP, S_TG = B*TG / T_TG and S = (B*PP + B*TG) / (T_PP + T_TG).

Context: rows whose B*(PP+TG) exceed the context are skipped silently by the tool,
so -c is sized for the largest batch; and with the KV cache not unified (-no-kvu,
this version's default for this tool) every sequence gets its own KV stream of
n_ctx / max(B) cells, as baton keeps one KV per request, so attention of one
sequence does not scan the other sequences' cells.

Warm-up: the tool warms up with only 16 tokens, and its first row still pays
one-time costs (its first prefill ran several times slower than the same shape
run again), as baton's and HF's first run of a shape would; baton's rows are
measured after an untimed run of each shape. So by default the first batch size
is run once more at the front of -npl, untimed: a later row of the same batch
replaces it when parsed.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

COLUMNS = ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s")
# table column -> row key
KEYS = {"PP": "prompt_len", "TG": "output_len", "B": "batch", "N_KV": "n_kv", "T_PP s": "prefill_s",
        "S_PP t/s": "prefill_tok_s", "T_TG s": "decode_s", "S_TG t/s": "decode_tok_s", "T s": "total_time_s",
        "S t/s": "e2e_tok_s"}
INT_KEYS = {"prompt_len", "output_len", "batch", "n_kv"}
CTX_PAD = 256  # llama.cpp pads n_ctx (and, without a unified KV cache, n_ctx per sequence) to this


class LlamaCppBenchError(RuntimeError):
    """llama-batched-bench is missing, failed, or printed no usable table."""


def _tail(text: str, lines: int = 25, chars: int = 4000) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])[-chars:]


def context_size(batches: Iterable[int], prompt_len: int, output_len: int) -> int:
    """A context that holds max(batches) sequences of prompt_len + output_len tokens, padded as llama.cpp pads it."""
    need = max(batches) * (prompt_len + output_len)
    return -(-need // CTX_PAD) * CTX_PAD


def build_command(binary: str | os.PathLike, gguf: str | os.PathLike, batches: Sequence[int], prompt_len: int,
                  output_len: int, threads: int, flash_attn: bool = True, extra_args: Sequence[str] = (),
                  warmup: bool = True) -> list[str]:
    """The llama-batched-bench command line: one run over all `batches` (after an untimed
    warm-up row of the first, when `warmup`), F16 KV cache, per-sequence KV streams."""
    batches = [int(b) for b in batches]
    npl = batches[:1] + batches if warmup else batches
    return [str(binary), "-m", str(gguf), "-c", str(context_size(batches, prompt_len, output_len)),
            "-b", "2048", "-ub", "512", "-npp", str(prompt_len), "-ntg", str(output_len),
            "-npl", ",".join(str(b) for b in npl), "-t", str(threads), "-fa", "on" if flash_attn else "off",
            "-ctk", "f16", "-ctv", "f16", "-no-kvu", *[str(a) for a in extra_args]]


def parse_table(text: str) -> list[dict]:
    """Rows of llama-batched-bench's markdown table, in the order printed (a batch size
    printed twice, as after a warm-up row, appears twice). Each row has the
    table's numbers under baton's names (batch, prefill_tok_s = S_PP, decode_tok_s = S_TG,
    e2e_tok_s = S, prompt_len, output_len, n_kv, prefill_s, decode_s, total_time_s) and
    e2e_output_tok_s = B*TG / T, output tokens per second as baton's rows count it.
    Lines outside the table (model loading, llama_perf_context_print) are ignored."""
    header: list[str] | None = None
    rows: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            if "S_TG t/s" in cells and "B" in cells:
                header = cells
            continue
        if len(cells) != len(header) or all(set(c) <= set("-: ") for c in cells):
            continue  # the |---|---| rule, or a stray line
        try:
            values = {h: float(c) for h, c in zip(header, cells)}
        except ValueError:
            continue
        row = {KEYS.get(h, h): int(v) if KEYS.get(h) in INT_KEYS else v for h, v in values.items()}
        if row.get("total_time_s"):
            row["e2e_output_tok_s"] = row["batch"] * row["output_len"] / row["total_time_s"]
        rows.append(row)
    return rows


def version(binary: str | os.PathLike, timeout: float = 60) -> dict:
    """What `binary --version` prints ("version: 1 (build 1, commit abc)" then "built with ..."):
    {"text", "version", "build", "commit"}, the parts it printed; {} when it printed none."""
    try:
        p = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    text = "\n".join(re.findall(r"(?:version:|built with) [^\n]*", p.stdout + "\n" + p.stderr))
    if not text:
        return {}
    out = {"text": text}
    m = re.search(r"version:\s*([^\s(]+)(?:\s*\(build\s*(\d+),\s*commit\s*([^)\s]+)\))?", text)
    if m:
        out["version"] = m.group(1)
        if m.group(2):
            out["build"], out["commit"] = int(m.group(2)), m.group(3)
    return out


def run_batched_bench(binary: str | os.PathLike, gguf: str | os.PathLike, batches: Sequence[int], prompt_len: int,
                      output_len: int, threads: int, flash_attn: bool = True, extra_args: Sequence[str] = (),
                      warmup: bool = True, timeout: float | None = None) -> list[dict]:
    """Run llama-batched-bench once over all `batches` (the command of `build_command`) and
    return one parsed row per batch, in the order of `batches` (the last row printed for
    each batch size, so not the warm-up row)."""
    binary, gguf = Path(binary), Path(gguf)
    if not binary.is_file():
        raise LlamaCppBenchError(f"llama-batched-bench not found at {binary}")
    if not os.access(binary, os.X_OK):
        raise LlamaCppBenchError(f"llama-batched-bench at {binary} is not executable")
    if not gguf.is_file():
        raise LlamaCppBenchError(f"GGUF for llama.cpp not found at {gguf}")
    cmd = build_command(binary, gguf, batches, prompt_len, output_len, threads, flash_attn, extra_args, warmup)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise LlamaCppBenchError(f"{binary} timed out after {timeout} s; stderr tail:\n{_tail(err)}") from None
    except OSError as e:
        raise LlamaCppBenchError(f"could not run {binary}: {e}") from None
    if p.returncode != 0:
        raise LlamaCppBenchError(f"{binary} exited with status {p.returncode}: {' '.join(cmd)}\n"
                                 f"stderr tail:\n{_tail(p.stderr)}")
    rows = {r["batch"]: r for r in parse_table(p.stdout)}
    missing = [b for b in batches if int(b) not in rows]
    if missing:
        raise LlamaCppBenchError(f"{binary} printed no result for batch {missing}: {' '.join(cmd)}\n"
                                 f"stdout tail:\n{_tail(p.stdout)}\nstderr tail:\n{_tail(p.stderr)}")
    return [rows[int(b)] for b in batches]
