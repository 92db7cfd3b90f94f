"""llama.cpp measured by `baton bench perf`: parsing llama-batched-bench's table, the
command line, its errors, and the ratios against baton's rows (no real llama.cpp needed:
a shell script stands in for the binary, or run_batched_bench is monkeypatched)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from baton.bench import llama_cpp, perf

# stdout of a real run (llama.cpp 0.5.0-dev, build 1, commit 0c1e570; SmolLM2-135M Q4_1, 2 threads):
# llama-batched-bench -m ... -c 256 -b 2048 -ub 512 -npp 16 -ntg 8 -npl 1,2,1,2 -t 2 -fa on -ctk f16 -ctv f16 -no-kvu
SAMPLE = """
llama_batched_bench: n_kv_max = 512, n_batch = 2048, n_ubatch = 512, flash_attn = 1, is_pp_shared = 0, \
is_tg_separate = 0, n_gpu_layers = 0, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    16 |      8 |    1 |     24 |    0.449 |    35.65 |    0.060 |   132.70 |    0.509 |    47.14 |
|    16 |      8 |    2 |     48 |    0.120 |   266.61 |    0.119 |   134.37 |    0.239 |   200.75 |
|    16 |      8 |    1 |     24 |    0.061 |   263.97 |    0.061 |   130.60 |    0.122 |   196.93 |
|    16 |      8 |    2 |     48 |    0.118 |   270.31 |    0.118 |   136.07 |    0.236 |   203.42 |

llama_perf_context_print:        load time =     231.16 ms
"""


def fake_binary(tmp_path: Path, stdout: str = "", stderr: str = "", rc: int = 0) -> Path:
    (tmp_path / "out.txt").write_text(stdout)
    (tmp_path / "err.txt").write_text(stderr)
    exe = tmp_path / "llama-batched-bench"
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args.txt\ncat {tmp_path}/out.txt\n"
                   f"cat {tmp_path}/err.txt >&2\nexit {rc}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_parse_table_real_sample():
    rows = llama_cpp.parse_table(SAMPLE)
    assert [r["batch"] for r in rows] == [1, 2, 1, 2]
    r = rows[1]
    assert r["prompt_len"] == 16 and r["output_len"] == 8 and r["n_kv"] == 48
    assert r["prefill_tok_s"] == 266.61 and r["decode_tok_s"] == 134.37 and r["e2e_tok_s"] == 200.75
    assert r["prefill_s"] == 0.120 and r["decode_s"] == 0.119 and r["total_time_s"] == 0.239
    assert r["e2e_output_tok_s"] == pytest.approx(2 * 8 / 0.239)
    assert llama_cpp.parse_table("no table here\n| a | b |\n") == []


def test_command_line():
    cmd = llama_cpp.build_command("/bin/llama-batched-bench", "/m.gguf", [1, 8, 32], 64, 64, 2)
    assert cmd == ["/bin/llama-batched-bench", "-m", "/m.gguf", "-c", "4096", "-b", "2048", "-ub", "512",
                   "-npp", "64", "-ntg", "64", "-npl", "1,1,8,32", "-t", "2", "-fa", "on", "-ctk", "f16",
                   "-ctv", "f16", "-no-kvu"]
    cmd = llama_cpp.build_command("b", "m", [1, 4], 16, 8, 1, flash_attn=False, extra_args=("-ngl", "0"),
                                  warmup=False)
    assert cmd[cmd.index("-c") + 1] == "256" and cmd[cmd.index("-npl") + 1] == "1,4"
    assert cmd[cmd.index("-fa") + 1] == "off" and cmd[-2:] == ["-ngl", "0"]


def test_run_with_fake_binary(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    exe = fake_binary(tmp_path, SAMPLE, "load_tensors: ...\n")
    rows = llama_cpp.run_batched_bench(exe, gguf, [2, 1], 16, 8, 2)
    # in the order asked, the last row of each batch (not the warm-up row)
    assert [(r["batch"], r["prefill_tok_s"]) for r in rows] == [(2, 270.31), (1, 263.97)]
    assert "-npl 2,2,1" in (tmp_path / "args.txt").read_text()
    with pytest.raises(llama_cpp.LlamaCppBenchError, match=r"no result for batch \[32\]"):
        llama_cpp.run_batched_bench(exe, gguf, [1, 32], 16, 8, 2)


def test_errors_name_path_and_stderr(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    missing = tmp_path / "nope" / "llama-batched-bench"
    with pytest.raises(llama_cpp.LlamaCppBenchError, match="not found at .*nope/llama-batched-bench"):
        llama_cpp.run_batched_bench(missing, gguf, [1], 16, 8, 2)
    exe = fake_binary(tmp_path, "", "llama_model_load: error loading model: bad magic\n", rc=1)
    with pytest.raises(llama_cpp.LlamaCppBenchError) as e:
        llama_cpp.run_batched_bench(exe, gguf, [1], 16, 8, 2)
    assert str(exe) in str(e.value) and "status 1" in str(e.value) and "bad magic" in str(e.value)
    with pytest.raises(llama_cpp.LlamaCppBenchError, match="GGUF for llama.cpp not found"):
        llama_cpp.run_batched_bench(exe, tmp_path / "missing.gguf", [1], 16, 8, 2)


def test_version(tmp_path):
    exe = fake_binary(tmp_path, "", "version: 0.5.0-dev (build 1, commit 0c1e570)\n"
                                    "built with GNU 12.2.0 for Linux x86_64\n")
    v = llama_cpp.version(exe)
    assert v["version"] == "0.5.0-dev" and v["build"] == 1 and v["commit"] == "0c1e570"
    assert "built with GNU" in v["text"]
    assert llama_cpp.version(tmp_path / "missing") == {}


def test_ratios_from_fake_rows():
    baton = [{"batch": 1, "decode_tok_s": 150.0, "prefill_tok_s": 600.0},
             {"batch": 8, "decode_tok_s": 400.0, "prefill_tok_s": 900.0}]
    lc = [{"batch": 8, "decode_tok_s": 500.0, "prefill_tok_s": 1000.0},
          {"batch": 1, "decode_tok_s": 100.0, "prefill_tok_s": 0.0}]
    r = perf.llama_cpp_ratios(baton, lc)
    assert r[1]["decode_vs_llama_cpp"] == pytest.approx(1.5) and r[1]["prefill_vs_llama_cpp"] is None
    assert r[8] == {"decode_vs_llama_cpp": pytest.approx(0.8), "prefill_vs_llama_cpp": pytest.approx(0.9)}


def test_cmd_perf_measures_llama_cpp(tiny_model_dir, tmp_path, monkeypatch):
    """`baton bench perf` with a (patched) llama.cpp: its rows, the ratios against baton's
    default variant, the binary/version/GGUF recorded, and both rendered."""
    from baton.cli import main

    calls = []

    def fake_run(binary, gguf, batches, prompt_len, output_len, threads, flash_attn=True, extra_args=(), **kw):
        calls.append((binary, gguf, list(batches), prompt_len, output_len, threads, tuple(extra_args)))
        return [{"batch": b, "prompt_len": prompt_len, "output_len": output_len, "prefill_tok_s": 100.0 * b,
                 "decode_tok_s": 10.0 * b, "e2e_tok_s": 20.0, "e2e_output_tok_s": 5.0, "total_time_s": 1.0}
                for b in batches]

    monkeypatch.setattr(llama_cpp, "run_batched_bench", fake_run)
    exe = fake_binary(tmp_path, "", "version: 0.5.0-dev (build 1, commit 0c1e570)\n")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "perf"
    rc = main(["bench", "perf", "--model", tiny_model_dir, "--quick", "--no-hf", "--no-roofline", "--no-profile",
               "--num-threads", "1", "--batches", "1,2", "--llama-cpp-bench", str(exe),
               "--llama-cpp-gguf", str(gguf), "--out", str(out)])
    assert rc == 0
    assert calls == [(str(exe.resolve()), str(gguf.resolve()), [1, 2], 16, 8, 1, ("-ngl", "0"))]
    res = json.loads((out / "perf.json").read_text())
    assert [r["batch"] for r in res["rows"]["llama.cpp"]] == [1, 2]
    baton = next(iter(res["rows"].values()))  # the default variant, named by its kernels
    assert list(res["rows"])[0] in ("baton", "baton (C++ kernels)")
    for i, b in enumerate((1, 2)):
        ratio = res["ratios"][str(b)]
        assert ratio["decode_vs_llama_cpp"] == pytest.approx(baton[i]["decode_tok_s"] / (10.0 * b))
        assert ratio["prefill_vs_llama_cpp"] == pytest.approx(baton[i]["prefill_tok_s"] / (100.0 * b))
        assert "decode_vs_llama_cpp_bf16" not in ratio
    lc = res["llama_cpp"]
    assert lc["binary"] == str(exe.resolve()) and lc["gguf"] == str(gguf.resolve())
    assert lc["version"]["commit"] == "0c1e570" and "-npl" in lc["command"]
    assert res["roofline"] is None and res["profile"] == [] and "llama_cpp_reference" not in res
    report = (out / "report.md").read_text()
    assert "| llama.cpp | 2 | 200.0 | 20.0 |" in report and "decode / llama.cpp | prefill / llama.cpp" in report
    assert "not re-measured" not in report and (out / "perf.png").read_bytes()[:4] == b"\x89PNG"


def test_cmd_perf_llama_cpp_skip_and_missing(tiny_model_dir, tmp_path, capsys):
    from baton.cli import main

    exe = fake_binary(tmp_path)
    base = ["bench", "perf", "--model", tiny_model_dir, "--no-hf", "--no-roofline", "--no-profile",
            "--num-threads", "1", "--batches", "1", "--out", str(tmp_path / "perf")]
    # the GGUF is missing: a clear error before anything is measured
    assert main(base + ["--llama-cpp-bench", str(exe), "--llama-cpp-gguf", str(tmp_path / "x.gguf")]) == 2
    assert "GGUF for llama.cpp not found at" in capsys.readouterr().err
    assert main(base + ["--llama-cpp-bench", str(tmp_path / "none"), "--llama-cpp-gguf", str(exe)]) == 2
    assert f"llama-batched-bench not found at {tmp_path / 'none'}" in capsys.readouterr().err
    # the model is no GGUF and no --llama-cpp-gguf: skipped, with a note
    assert main(base + ["--quick", "--llama-cpp-bench", str(exe)]) == 0
    assert "llama.cpp skipped" in capsys.readouterr().out
    res = json.loads((tmp_path / "perf" / "perf.json").read_text())
    assert "llama.cpp" not in res["rows"] and "not a GGUF" in res["llama_cpp"]["skipped"]
