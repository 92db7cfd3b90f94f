"""Soak: `baton serve` under continuous load for a fixed time; is its RSS flat?

    .venv/bin/python benchmarks/soak.py --minutes 10 --out benchmarks/results/soak

Starts the server on a free loopback port, runs `baton bench serve` rounds back
to back (Poisson arrivals, mixed lengths) until the time is up, samples the
server's RSS every few seconds, then stops the server. Writes soak.json and
rss.png; prints the RSS at the end of warm-up and at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (MiB per minute) over (seconds, bytes) samples."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (r - mr) for t, r in samples) / var * 60 / 2**20 if var else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--out", default="benchmarks/results/soak")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    baton = [sys.executable, "-m", "baton.cli"]
    server = subprocess.Popen(baton + ["serve", "--port", str(port), "--max-num-seqs", "16"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(server.pid)
    samples, stop = [], threading.Event()
    t0 = time.monotonic()

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic() - t0, proc.memory_info().rss))
            stop.wait(5)

    threading.Thread(target=sample, daemon=True).start()
    rounds = 0
    round_dir = tempfile.mkdtemp(prefix="soak-rounds-")  # per-round JSONs: not results, just load
    try:
        deadline = t0 + 60 * args.minutes
        while time.monotonic() < deadline:
            subprocess.run(baton + ["bench", "serve", "--port", str(port), "--dataset", "mixed", "--num-prompts", "32",
                                    "--prompt-range", "16:256", "--output-range", "8:128",
                                    "--request-rate", str(args.rate), "--seed", str(rounds),
                                    "--wait-for-server", "120", "--no-progress", "--out", round_dir],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rounds += 1
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(round_dir, ignore_errors=True)
    warm_samples = [(t, r) for t, r in samples if t >= 60] or samples
    warm = [r for _, r in warm_samples]
    result = {"minutes": args.minutes, "rounds": rounds, "requests": rounds * 32,
              "rss_after_warmup_mib": warm[0] / 2**20, "rss_end_mib": samples[-1][1] / 2**20,
              "rss_min_after_warmup_mib": min(warm) / 2**20, "rss_max_after_warmup_mib": max(warm) / 2**20,
              "rss_slope_after_warmup_mib_per_min": slope_per_minute(warm_samples), "samples": samples}
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([t / 60 for t, _ in samples], [r / 2**20 for _, r in samples])
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"baton serve under load: {rounds * 32} requests")
    fig.tight_layout()
    fig.savefig(out / "rss.png", dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
