"""PNG figures for the paper benchmark (matplotlib, Agg backend, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"static": "#7f7f7f", "orca": "#1f77b4", "baton": "#ff7f0e", "baton-pd": "#2ca02c",
          "hf-generate": "#9467bd", "hf-continuous-batching": "#8c564b"}
MIB = 1 << 20


def kv_timeline(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Figure 8 analog: KV bytes allocated (solid) and holding live tokens (dashed) per iteration."""
    rows = [r for r in rows if r.get("timeline")]
    n = max(len(rows), 1)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n + 0.6), sharex=True, squeeze=False)
    ymax = max((a for r in rows for _, a, _ in r["timeline"]), default=1) / MIB * 1.08 or 1
    for ax, r in zip(axes[:, 0], rows):
        t = [p[0] for p in r["timeline"]]
        ax.plot(t, [p[1] / MIB for p in r["timeline"]], color=COLORS.get(r["policy"], None), lw=1.4,
                label="allocated", drawstyle="steps-post")
        ax.plot(t, [p[2] / MIB for p in r["timeline"]], color="black", lw=0.9, ls="--", label="in use (live tokens)",
                drawstyle="steps-post")
        ax.set_ylim(0, ymax)
        ax.set_ylabel("KV MiB")
        ax.set_title(f"{r['policy']}  (total {r.get('total_time_s', 0):.1f} s)", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time since the first request (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table1_bars(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Total completion time per system."""
    rows = [r for r in rows if r.get("total_time_s") is not None and not r.get("error")]
    names = [r["name"] for r in rows]
    vals = [r["total_time_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 1), 3.6))
    bars = ax.bar(names, vals, color=[COLORS.get(n, "#17becf") for n in names])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.1f}s", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("total completion time (s)")
    ax.set_title(title or "Total completion time, mixed workload", fontsize=10)
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table2_plot(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Left: output tok/s per policy vs batch size. Right: speed-up over static."""
    rows = [r for r in rows if not r.get("error")]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    batches = sorted({r["max_num_seqs"] for r in rows})
    by = {(r["policy"], r["max_num_seqs"]): r for r in rows}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for p in policies:
        xs = [b for b in batches if (p, b) in by]
        a1.plot(xs, [by[(p, b)]["output_throughput"] for b in xs], marker="o", label=p, color=COLORS.get(p))
        if p != "static":
            ys = [by[(p, b)]["output_throughput"] / by[("static", b)]["output_throughput"]
                  for b in xs if ("static", b) in by and by[("static", b)]["output_throughput"]]
            a2.plot(xs[: len(ys)], ys, marker="o", label=p, color=COLORS.get(p))
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(batches)
        a.set_xticklabels([str(b) for b in batches])
        a.set_xlabel("batch size (max_num_seqs)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    a1.set_ylabel("output tokens/s")
    a2.axhline(1.0, color="black", lw=0.8)
    a2.set_ylabel("throughput / static")
    fig.suptitle(title or "Throughput vs batch size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perf_bars(perf: dict, path: Path, baselines: Sequence[str], decode_baselines: Sequence[str] = ()) -> Path:
    """Decode speed per batch: end-to-end output tok/s of baton against the
    `baselines` rows of perf["rows"] (left), decode-only tok/s against the
    `decode_baselines` rows, such as llama.cpp measured in the same run (right)."""
    rows, batches = perf["rows"], [r["batch"] for r in next(iter(perf["rows"].values()))]
    baton_name = next(iter(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(batches))

    def group(ax, series, ylabel, title):
        w = 0.8 / len(series)
        for i, (label, vals, color) in enumerate(series):
            bars = ax.bar([j + (i - (len(series) - 1) / 2) * w for j in x], vals, w, label=label, color=color)
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [f"batch {b}" for b in batches])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)

    e2e = [(baton_name, [r["e2e_output_tok_s"] for r in rows[baton_name]], COLORS["baton-pd"])]
    e2e += [(name, [r["e2e_output_tok_s"] for r in rows[name]], color)
            for name, color in zip(baselines, (COLORS["hf-generate"], "#c5b0d5")) if name in rows]
    group(left, e2e, "end-to-end output tok/s", "baton vs HF transformers, same requests")
    decode = [(baton_name, [r["decode_tok_s"] for r in rows[baton_name]], COLORS["baton-pd"])]
    for name, color in zip(decode_baselines, ("#7f7f7f", "#bcbd22", "#17becf")):
        by_batch = {r["batch"]: r["decode_tok_s"] for r in rows.get(name, [])}
        if all(b in by_batch for b in batches):
            decode.append((f"{name} (measured)", [by_batch[b] for b in batches], color))
    group(right, decode, "decode-only tok/s", "decode speed" + (" vs " + ", ".join(
        n for n in decode_baselines if n in rows) if any(n in rows for n in decode_baselines) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
