"""`baton bench serve` against a fake OpenAI-compatible SSE server started in the test."""
from __future__ import annotations

import json

from baton.bench import serve_client
from baton.bench.workloads import BenchRequest
from baton.cli import main

RESULT_KEYS = [
    "date", "backend", "model_id", "num_prompts", "request_rate", "burstiness", "max_concurrency", "duration",
    "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
    "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
    *[f"{s}_{k}_ms" for k in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99")],
]


def test_serve_cli_poisson_with_concurrency(fake_server, tmp_path):
    url, received = fake_server
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", url, "--vocab-size", "256", "--dataset", "random",
               "--num-prompts", "8", "--input-len", "12", "--output-len", "6", "--request-rate", "40",
               "--burstiness", "0.5", "--max-concurrency", "3", "--goodput", "ttft:60000", "tpot:60000",
               "e2el:60000", "--result-file", str(out), "--no-progress", "--backend", "fake"])
    assert rc == 0
    r = json.loads(out.read_text())
    for k in RESULT_KEYS:
        assert k in r, k
    assert r["backend"] == "fake" and r["model_id"] == "fake-model"
    assert r["completed"] == 8 and r["failed"] == 0
    assert r["total_input_tokens"] == 8 * 12 and r["total_output_tokens"] == 8 * 6
    assert r["request_rate"] == 40.0 and r["max_concurrency"] == 3
    assert 1 <= r["max_concurrent_requests"] <= 3
    assert r["request_goodput"] == r["request_throughput"]  # generous SLOs: every request is good
    assert all(len(itl) == 5 for itl in r["itls"])  # one chunk per token: n - 1 gaps
    assert r["mean_ttft_ms"] > 0 and r["mean_tpot_ms"] > 0 and r["p99_e2el_ms"] >= r["median_e2el_ms"]
    # the payload every server sees
    assert len(received) == 8
    for body in received:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["max_tokens"] == 6 and body["model"] == "fake-model"
        assert len(body["prompt"]) == 12 and all(isinstance(t, int) for t in body["prompt"])


def test_serve_all_at_once_counts_failures(fake_server):
    url, received = fake_server
    reqs = [BenchRequest([20, 21, 22], 3, 4), BenchRequest([13, 14], 2, 4), BenchRequest([30] * 5, 5, 2)]
    r = serve_client.run(url, reqs, request_rate=float("inf"), progress=False, slos={"ttft": 0.0})
    assert r["request_rate"] == "inf"
    assert r["completed"] == 2 and r["failed"] == 1
    assert "HTTP 500" in r["errors"][1] and r["errors"][0] == "" and r["errors"][2] == ""
    assert r["total_output_tokens"] == 6 and r["output_lens"] == [4, 0, 2]
    assert r["request_goodput"] == 0.0  # nobody meets a 0 ms TTFT
    assert r["max_concurrent_requests"] == 2  # both successful ones were in flight together


def test_serve_unreachable_server_is_a_clean_error(tmp_path):
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--vocab-size", "256", "--num-prompts", "2",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 2  # baton: error: cannot reach the server ...
