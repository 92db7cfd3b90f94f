"""Smoke test of `baton bench beyond --quick` on a tiny model: structure only, no timings."""
from __future__ import annotations

import json

from baton.bench.beyond import main


def test_beyond_quick_report(tmp_path):
    from testutil import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", "llama", max_position_embeddings=1024)
    out = tmp_path / "out"
    data = main(model_dir, "float32", quick=True, out_dir=str(out), num_threads=None)
    saved = json.loads((out / "beyond.json").read_text())
    assert set(saved["priority"]["results"]) == {"no preemption", "preemption"}
    assert saved["priority"]["results"]["preemption"]["preemptions"] > 0
    assert saved["priority"]["results"]["no preemption"]["preemptions"] == 0
    assert set(saved["prefill"]["results"]) == {"unbounded prefill", "prefill bound 256"}
    assert len(saved["memory"]["results"]) == 5
    for r in saved["memory"]["results"].values():
        assert r["kv_peak_bytes"] <= r["kv_budget_bytes"]
    for png in ("priority.png", "prefill_itl.png", "memory_budget.png"):
        assert (out / png).stat().st_size > 1000
    assert "(b) Inter-token latency" in (out / "report.md").read_text()
    assert data["machine"]["cpu_model"]
