"""Does RSS grow with requests or with distinct tensor shapes?

    .venv/bin/python benchmarks/rss_shapes.py --rounds 12

One engine (baton-pd, 16 rows), rounds of 32 requests run to completion; RSS and
the number of gc-tracked Python objects after each round. Once with every
request the same length (128-token prompt, 64 output tokens), once with mixed
lengths (prompts 16-256, outputs 8-96). Writes benchmarks/results/soak/rss_shapes.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
from pathlib import Path

import psutil


def run(mixed: bool, rounds: int) -> list[dict]:
    from baton.engine import EngineConfig, LLMEngine
    from baton.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(policy="baton-pd", max_num_seqs=16))
    proc, rng, n, out = psutil.Process(), random.Random(0), 0, []
    for r in range(rounds):
        for _ in range(32):
            p, o = (rng.randint(16, 256), rng.randint(8, 96)) if mixed else (128, 64)
            engine.add_request(str(n), [rng.randint(100, 40000) for _ in range(p)],
                               SamplingParams(max_tokens=o, temperature=0, ignore_eos=True))
            n += 1
        while engine.has_unfinished_requests():
            engine.step()
        gc.collect()
        out.append({"round": r, "rss_mib": proc.memory_info().rss / 2 ** 20, "py_objects": len(gc.get_objects())})
        print(("mixed" if mixed else "fixed"), out[-1], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/soak/rss_shapes.json")
    args = ap.parse_args()
    import subprocess

    result = {}
    for mode in ("fixed", "mixed"):  # separate processes: each starts from a fresh heap
        code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import rss_shapes; "
                f"print('RESULT', json.dumps(rss_shapes.run({mode == 'mixed'}, {args.rounds})))")
        text = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        result[mode] = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT"))[7:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for mode, rows in result.items():
        print(mode, " ".join(f"{r['rss_mib']:.0f}" for r in rows), "MiB; python objects",
              rows[0]["py_objects"], "->", rows[-1]["py_objects"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
