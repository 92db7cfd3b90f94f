"""Graceful shutdown: in-flight queries end with finish_reason "abort", the
engine thread stops, nothing hangs. In-process (should_exit, as uvicorn's
signal handler sets it) and as `baton serve` receiving SIGTERM / SIGINT."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from baton.cli import build_parser

from .conftest import MODEL, SSEReader, assert_error, metric, serve, wait_for


def test_inprocess_shutdown_aborts_inflight(make_engine):
    eng = make_engine(max_num_seqs=2)
    long = {"model": MODEL, "prompt": "Tell me everything about the sea", "max_tokens": 3000, "ignore_eos": True}
    with serve(eng) as srv:
        a = SSEReader(srv.url, {**long, "stream": True})
        chat = {k: v for k, v in long.items() if k != "prompt"}
        b = SSEReader(srv.url, {**chat, "stream": True, "messages": [{"role": "user", "content": "Talk."}]},
                      path="/v1/chat/completions")
        c = SSEReader(srv.url, {**long, "stream": True})  # queued behind a and b
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(srv.url + "/v1/completions", json=long, timeout=120)))
        t.start()
        a.read(1)
        b.read(2)
        wait_for(lambda: metric(srv.url, "baton_num_requests_in_flight") == 4, what="four in flight")

        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        for s in (a, b, c):
            s.read_all()  # ends: the server finishes the stream, then [DONE]
            assert s.done and s.finish_reason == "abort"
            s.close()
        t.join(60)
        r = result["r"]
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "abort"
        stopper.join(60)
        assert not stopper.is_alive() and not srv.thread.is_alive()
        assert not srv.app.state.baton.async_engine.alive
    assert not eng.has_unfinished_requests()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=5)


def test_draining_server_refuses_new_requests(make_engine):
    eng = make_engine(max_num_seqs=2)
    with serve(eng) as srv:
        srv.app.state.baton.drain()
        assert_error(httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}), 503,
                     code="shutting_down")
        assert httpx.get(srv.url + "/health").status_code == 503


def test_serve_parser():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.max_waiting, args.policy) == \
        ("127.0.0.1", 8000, os.environ.get("BATON_API_KEY"), 256, "baton-pd")
    args = build_parser().parse_args(["serve", "--port", "9001", "--api-key", "k", "--max-waiting", "3",
                                      "--max-num-seqs", "4", "--served-model-name", "a", "b", "--dtype", "float32"])
    assert (args.port, args.api_key, args.max_waiting, args.max_num_seqs, args.served_model_name) == \
        (9001, "k", 3, 4, ["a", "b"])
    assert callable(args.func)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_baton_serve_signal(tiny_model_dir, sig):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "serve", "--model", tiny_model_dir, "--port",
                             str(port), "--max-num-seqs", "4", "--served-model-name", MODEL, "--log-level",
                             "warning", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, timeout=120, interval=0.2, what="baton serve to come up")
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        s = SSEReader(url, {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True,
                            "stream": True})
        s.read(2)
        proc.send_signal(sig)
        s.read_all()
        assert s.finish_reason == "abort"
        s.close()
        out, _ = proc.communicate(timeout=60)
        # SIGINT: exit 0; SIGTERM: uvicorn re-raises it after the clean shutdown (killed by SIGTERM)
        assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, out)
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
