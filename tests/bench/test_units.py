"""Workloads, arrivals and metric arithmetic (no model)."""
from __future__ import annotations

import json
import math

import pytest

from baton.bench.metrics import RequestRecord, parse_goodput, percentile, run_metrics, summarize
from baton.bench.workloads import (arrival_offsets, jsonl_workload, make_workload, mixed_workload,
                                   random_workload)


def test_arrivals_all_at_once_and_rescaled():
    assert arrival_offsets(5, float("inf")) == [0.0] * 5
    offs = arrival_offsets(50, 10.0, burstiness=1.0, seed=1)
    assert len(offs) == 50 and offs == sorted(offs)
    assert math.isclose(offs[-1], 50 / 10.0)
    bursty = arrival_offsets(50, 10.0, burstiness=0.2, seed=1)
    assert math.isclose(bursty[-1], 5.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, -1.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, burstiness=0)


def test_workloads_lengths_and_determinism():
    r = random_workload(10, 32, 8, vocab_size=256, seed=3)
    assert all(x.prompt_len == 32 == len(x.prompt) and x.output_len == 8 for x in r)
    assert all(16 <= t < 256 for x in r for t in x.prompt)  # low (special) ids avoided
    rr = random_workload(200, 100, 50, vocab_size=1000, range_ratio=0.5, seed=3)
    assert all(50 <= x.prompt_len <= 150 and 25 <= x.output_len <= 75 for x in rr)
    m = mixed_workload(64, 49152, (16, 512), (8, 256), seed=0)
    assert m[0].prompt == mixed_workload(64, 49152, (16, 512), (8, 256), seed=0)[0].prompt
    assert all(16 <= x.prompt_len <= 512 and 8 <= x.output_len <= 256 for x in m)
    assert max(x.output_len for x in m) == 256 and max(x.prompt_len for x in m) == 512
    assert len({x.output_len for x in m}) > 10  # widely varying


def test_jsonl_workload(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text("\n".join(json.dumps(d) for d in [{"prompt": [5, 6, 7], "output_len": 4},
                                                   {"prompt_len": 9, "output_len": 2}, {}][:2]) + "\n")
    w = make_workload(str(f), 10, vocab_size=256)
    assert [(x.prompt_len, x.output_len) for x in w] == [(3, 4), (9, 2)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "text needs a tokenizer", "output_len": 3}) + "\n")
    with pytest.raises(ValueError, match="tokenizer"):
        jsonl_workload(bad, 256)


def test_metrics_definitions():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    s = summarize([1.0, 3.0], 1000)
    assert s["mean"] == 2000 and s["median"] == 2000 and s["std"] == 1000
    a = RequestRecord(prompt_len=10, output_len=5, send_time=0.0, ttft=0.1, latency=0.5,
                      itl=[0.1] * 4, success=True)
    b = RequestRecord(prompt_len=20, output_len=1, send_time=1.0, ttft=0.2, latency=0.2, success=True)
    c = RequestRecord(prompt_len=5, error="boom")
    m = run_metrics([a, b, c], duration=2.0, slos={"ttft": 150, "tpot": 200})
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 6
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0
    assert m["request_goodput"] == 0.5  # only `a` meets ttft <= 150 ms
    assert math.isclose(m["mean_tpot_ms"], 100.0)  # TPOT only for requests with > 1 token
    assert math.isclose(m["mean_itl_ms"], 100.0)
    assert m["max_concurrent_requests"] == 1
    for k in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert f"{stat}_{k}_ms" in m


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:1000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 1000.0}
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])
    with pytest.raises(ValueError):
        parse_goodput(["ttft=5"])
