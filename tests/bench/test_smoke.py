"""Smoke tests of `baton bench throughput` and `baton bench paper --quick` on a tiny
random model (no timing assertions: structure, completeness, every row present)."""
from __future__ import annotations

import json
from pathlib import Path

from baton.cli import main

POLICIES = ["static", "orca", "baton", "baton-pd"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_throughput_all_policies(tiny_model_dir, tmp_path):
    rc = main(["bench", "throughput", "--model", tiny_model_dir, "--quick", "--dataset", "mixed",
               "--num-prompts", "6", "--max-num-seqs", "4", "--num-threads", "1", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "throughput.json").read_text())
    assert [r["policy"] for r in res["rows"]] == POLICIES
    total_out = res["workload"]["output_len"]["total"]
    for r in res["rows"]:
        assert r["completed"] == 6 and r["failed"] == 0 and r["output_len_mismatches"] == 0
        assert r["total_output_tokens"] == total_out
        for k in ("request_throughput", "output_throughput", "total_time_s", "median_ttft_ms", "p99_tpot_ms",
                  "idle_share", "kv_padding_ratio", "kv_padding_waste", "decode_tok_s"):
            assert isinstance(r[k], (int, float)), k
        assert 0.0 <= r["idle_share"] < 1.0
    by = {r["policy"]: r for r in res["rows"]}
    assert by["static"]["idle_share"] > 0.0  # mixed lengths: finished rows keep computing
    assert by["orca"]["idle_share"] == 0.0   # selective batching computes no padding


def test_throughput_poisson_arrivals_and_jsonl(tiny_model_dir, tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text("\n".join(json.dumps({"prompt_len": n, "output_len": o}) for n, o in [(5, 3), (17, 1), (9, 6)]))
    rc = main(["bench", "throughput", "--model", tiny_model_dir, "--dataset", str(f), "--policy", "baton-pd,static",
               "--request-rate", "20", "--num-threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["baton-pd", "static"]
    assert all(r["completed"] == 3 and r["total_output_tokens"] == 10 for r in rows)


def test_paper_quick_report(tiny_model_dir, tmp_path):
    out = tmp_path / "paper"
    rc = main(["bench", "paper", "--quick", "--model", tiny_model_dir, "--num-requests", "8", "--num-threads", "1",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    p = json.loads((out / "paper.json").read_text())
    n = p["config"]["num_requests"]
    assert n == 8 and len(p["requests"]) == 8
    for k in ("cpu_model", "logical_cores", "torch_version", "dtype", "date", "torch_threads"):
        assert p["machine"][k] not in (None, ""), k
    assert p["machine"]["torch_threads"] == 1

    # Table 1: every policy, then both HF baselines (a failure is recorded, not raised)
    names = [r["name"] for r in p["table1"]]
    assert names == POLICIES + ["hf-generate", "hf-continuous-batching", "hf-continuous-batching, baton's GEMMs"]
    for r in p["table1"][:4]:
        assert not r.get("error"), r.get("error")
        assert r["completed"] == n and r["output_len_mismatches"] == 0
        assert r["total_time_s"] > 0 and r["timeline"], r["name"]
    gen = p["table1"][4]
    assert not gen.get("error"), gen.get("error")
    assert gen["completed"] == n and gen["total_output_tokens"] == p["workload"]["output_len"]["total"]
    cb = p["table1"][5]
    assert cb.get("error") or cb["completed"] == n

    # Table 2: static, baton, baton-pd at every batch size
    assert p["config"]["batch_sizes"] == [4, 8, 16, 32]
    got = {(r["policy"], r["max_num_seqs"]) for r in p["table2"] if not r.get("error") and r["completed"] == n}
    assert got == {(pol, b) for pol in ("static", "baton", "baton-pd") for b in (4, 8, 16, 32)}

    # roofline and each policy's fractions of it
    roof = p["roofline"]
    for k in ("gemm", "copy_bandwidth_gbs", "peak_matmul_gflops", "flops_per_token", "weight_bytes",
              "compute_ceiling_tok_s", "bandwidth_ceiling_tok_s_per_row"):
        assert k in roof, k
    assert {g["batch"] for g in roof["gemm"]} >= {1, 32}
    assert [f["name"] for f in p["roofline_fractions"]] == POLICIES
    for f in p["roofline_fractions"]:
        assert f["frac_of_compute"] > 0 and f["frac_of_bandwidth"] > 0

    # the report: sections, machine, embedded figures that exist
    md = (out / "report.md").read_text()
    for heading in ("## Machine", "## Table 1", "## Table 2", "## Figure 8", "## External baselines", "## Roofline"):
        assert heading in md, heading
    assert p["machine"]["cpu_model"] in md and p["machine"]["torch_version"] in md
    for png in ("table1.png", "table2.png", "fig8_kv_memory.png"):
        assert f"]({png})" in md
        assert (out / png).read_bytes()[:8] == PNG
    for pol in POLICIES:
        assert f"| {pol} |" in md
    assert Path(out / "paper.json").stat().st_size > 0


def test_structured_bench_smoke(default_model_path, tmp_path):
    """`baton bench structured`, tiny: both runs through the server, the report and plot written."""
    from baton.bench.structured import SCHEMA, _plot, report, run_bench
    from testutil import make_engine

    engine = make_engine(default_model_path, max_num_seqs=4)
    res = run_bench(engine, num_requests=2, max_tokens=12, rounds=2, progress=False)
    res.update(policy="baton-pd", dtype="float32")
    assert len(res["rounds"]) == 2 and res["median_ratio"] > 0
    for r in res["rounds"]:  # the twins produced the same number of tokens
        assert r["constrained"]["tokens"] == r["unconstrained"]["tokens"] > 0
    assert "Median ratio" in report(res, "test machine")
    _plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0 and SCHEMA["required"]


def test_prefix_bench_smoke(tiny_model_dir, monkeypatch):
    """`baton bench prefix`, tiny: every workload off and on, hits where prefixes are shared."""
    from baton.bench import prefix
    from testutil import load_cached

    monkeypatch.setattr(prefix, "workloads", lambda vocab, quick, seed: (
        [(0.0, f"s{i}", list(range(3, 43)) + [50 + i], 3) for i in range(3)],
        (list(range(3, 23)), {c: [[60 + c, 61], [62, 63 + c]] for c in range(2)}, 2),
        [(0.0, f"u{i}", [100 + i] * 20, 3) for i in range(2)]))
    model, tok = load_cached(tiny_model_dir)
    res = prefix.run_bench(model, tok, True, 0, dict(model=tiny_model_dir, dtype="float32", max_num_seqs=4,
                                                     kv_cache_bytes=1 << 28), progress=False)
    assert res["shared"]["off"]["cached_tokens"] == 0 and res["shared"]["on"]["cached_tokens"] > 0
    assert res["chat"]["on"]["hit_requests"] >= 2 and res["unique"]["on"]["cached_tokens"] == 0
    assert "TTFT p50 off/on" in prefix.report(res, "test", {})
