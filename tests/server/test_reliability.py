"""The server under hostile and clumsy clients: a poison request hurts nobody, a
disconnect storm leaves nothing behind, hang-ups cannot get around --max-waiting,
and bad bodies, slow clients and surrogates get their own clear answers."""
from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from baton import sampling as sampling_module
from baton.server.app import ServerThread, create_app

from .conftest import MODEL, SSEReader, assert_error, metric, metrics, serve, wait_for

HELD = ("baton_num_requests_running", "baton_num_requests_waiting", "baton_num_requests_prefilled",
        "baton_num_requests_parked", "baton_kv_cache_used_bytes", "baton_num_requests_in_flight")


def held(url) -> dict:
    m = metrics(url)
    return {name: m.get((name, ()), 0.0) for name in HELD}


def nothing_held(url) -> bool:
    return all(v == 0 for v in held(url).values())


def complete(url, prompt, n=12, **kw) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": n,
                                                  "temperature": 0, "ignore_eos": True, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def raw_post(path: str, body: bytes, extra_headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}\r\n").encode() + body


def read_response(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data


def trickle(sock: socket.socket, data: bytes, gap: float) -> None:
    """Send a byte at a time, until the data is out or the server hangs up."""
    try:
        for b in data:
            sock.sendall(bytes([b]))
            time.sleep(gap)
    except (BrokenPipeError, ConnectionResetError):
        pass


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


# ---------------------------------------------------------------- one request must not hurt another

@pytest.mark.parametrize("poison", [{"temperature": 1e-40}, {"temperature": 5e-324}, {"top_p": 1e-300}])
def test_poison_request_while_four_others_run(server, poison):
    url = server.url
    prompts = [f"Tell me about the number {i}." for i in range(4)]
    refs = [complete(url, p, 24)["choices"][0]["text"] for p in prompts]
    poison_ref = complete(url, "Hi", 4)["choices"][0]["text"]
    readers = [SSEReader(url, {"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0,
                               "ignore_eos": True, "stream": True}) for p in prompts]
    try:
        for r in readers:
            r.read(1)  # all four are running
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "seed": 3, **poison}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == poison_ref  # the greedy limit, exactly
        for rd, ref in zip(readers, refs):
            rd.read_all()
            assert rd.text == ref and rd.finish_reason == "length"
    finally:
        for rd in readers:
            rd.close()
    wait_for(lambda: nothing_held(url), timeout=10, what="nothing held")


def test_a_request_that_fails_inside_the_engine_fails_alone(make_engine, monkeypatch):
    real = sampling_module._sample_row

    def fragile(logits, p, generator):
        if p.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, p, generator)

    eng = make_engine(max_num_seqs=8)
    with serve(eng) as srv:
        refs = [complete(srv.url, f"Count to {i}:", 16)["choices"][0]["text"] for i in range(3)]
        monkeypatch.setattr(sampling_module, "_sample_row", fragile)
        readers = [SSEReader(srv.url, {"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": 16,
                                       "temperature": 0, "ignore_eos": True, "stream": True}) for i in range(3)]
        for rd in readers:
            rd.read(1)
        bad = {"model": MODEL, "prompt": "x", "max_tokens": 8, "temperature": 0.7, "seed": 666}
        err = assert_error(httpx.post(srv.url + "/v1/completions", json=bad, timeout=60), 500, code="engine_error")
        assert "probability tensor" in err["message"] and err["type"] == "server_error"
        with httpx.stream("POST", srv.url + "/v1/completions", json={**bad, "stream": True}, timeout=60) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "engine_error"
        for rd, ref in zip(readers, refs):
            rd.read_all()
            assert rd.text == ref
            rd.close()
        assert metric(srv.url, "baton_requests_finished_total", finish_reason="error") == 2
        wait_for(lambda: nothing_held(srv.url), timeout=10, what="nothing held")


# ---------------------------------------------------------------- aborts leave nothing behind

def _storm_client(url_host, port, i, rng_seed):
    """One client that goes away at a random point."""
    rng = random.Random(rng_seed)
    kind = i % 5
    body = json.dumps({"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 200, "temperature": 0,
                       "ignore_eos": True, "stream": kind != 3}).encode()
    req = raw_post("/v1/completions", body)
    sock = socket.create_connection((url_host, port), timeout=30)
    try:
        if kind == 0:  # before the headers are complete
            sock.sendall(req[: rng.randint(1, 40)])
        elif kind == 1:  # right after sending
            sock.sendall(req)
        elif kind == 2:  # mid-stream
            sock.sendall(req)
            want, got = rng.randint(1, 6), 0
            sock.settimeout(30)
            while got < want:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk.count(b"data: ")
        elif kind == 3:  # waiting on a non-streamed answer
            sock.sendall(req)
            time.sleep(rng.uniform(0, 0.5))
        else:  # mid-body
            sock.sendall(req[: len(req) - rng.randint(1, len(body))])
    finally:
        sock.close()


def test_disconnect_storm_leaves_nothing_and_canary_is_unchanged(make_engine):
    eng = make_engine(max_num_seqs=8)
    with serve(eng, max_waiting=64) as srv:
        canary_prompt = "The three primary colors are"
        ref = complete(srv.url, canary_prompt, 20)["choices"][0]["text"]
        result = {}
        canary = threading.Thread(target=lambda: result.setdefault("r", complete(srv.url, canary_prompt, 20)))
        with ThreadPoolExecutor(16) as ex:
            futures = [ex.submit(_storm_client, srv.host, srv.port, i, 1000 + i) for i in range(60)]
            canary.start()
            for f in futures:
                f.result(timeout=120)
        canary.join(120)
        assert result["r"]["choices"][0]["text"] == ref
        wait_for(lambda: nothing_held(srv.url), timeout=10, what="running, waiting, pooled, parked, KV all 0")
        assert not eng.requests and not eng.has_unfinished_requests() and eng.budget.query_bytes == 0
        m = metrics(srv.url)
        ended = sum(v for (name, _), v in m.items() if name == "baton_requests_finished_total")
        assert m[("baton_requests_admitted_total", ())] == ended > 0  # each admitted request ended once
        assert complete(srv.url, canary_prompt, 20)["choices"][0]["text"] == ref


def test_hang_ups_do_not_get_around_max_waiting(make_engine):
    """max_num_seqs 2 + max_waiting 2: four open streams fill the server (two rows,
    one in the pool of one, one queued), so every send-and-hang-up gets 429. With
    room for one, each hang-up is admitted to the queue (the pool is full) and must
    leave no ghost there; a later request is then served as on an idle server."""
    eng = make_engine(max_num_seqs=2, pool_size=1)
    with serve(eng, max_waiting=2) as srv:
        url = srv.url
        long = {"model": MODEL, "max_tokens": 3000, "ignore_eos": True, "stream": True, "temperature": 0}
        streams = [SSEReader(url, {**long, "prompt": f"Open stream {i}"}) for i in range(4)]
        try:
            streams[0].read(1)
            streams[1].read(1)
            wait_for(lambda: held(url)["baton_num_requests_in_flight"] == 4, what="four in flight")
            body = json.dumps({"model": MODEL, "prompt": "hang up", "max_tokens": 500, "ignore_eos": True,
                               "stream": True}).encode()

            def hang_up():
                with socket.create_connection((srv.host, srv.port), timeout=30) as s:
                    s.sendall(raw_post("/v1/completions", body))

            for _ in range(30):
                hang_up()
            wait_for(lambda: metric(url, "baton_requests_rejected_total", reason="queue_full") == 30,
                     what="thirty 429s")
            h = held(url)
            assert h["baton_num_requests_in_flight"] == 4 and h["baton_num_requests_waiting"] <= 2
            assert len(eng.requests) == 4
            streams[3].close()  # room for one queued request again
            wait_for(lambda: held(url)["baton_num_requests_in_flight"] == 3 and
                     held(url)["baton_num_requests_waiting"] == 0, what="three left")
            aborted = metric(url, "baton_requests_aborted_total")
            for i in range(30):  # one at a time, so each finds the room and is admitted
                hang_up()
                wait_for(lambda: metric(url, "baton_requests_aborted_total") == aborted + i + 1,
                         what="the hang-up aborted")
            # every admitted hang-up is aborted and gone: only the three open streams remain
            wait_for(lambda: held(url)["baton_num_requests_in_flight"] == 3 and
                     held(url)["baton_num_requests_waiting"] == 0 and len(eng.requests) == 3, timeout=10,
                     what="hung-up requests gone")
        finally:
            for s in streams:
                s.close()
        wait_for(lambda: nothing_held(url), timeout=10, what="nothing held")
        iterations = eng.policy.stats.iterations
        out = complete(url, "A later request", 8)
        assert out["usage"]["completion_tokens"] == 8
        # 8 tokens take 8 iterations (the first comes from the prefill): no ghost is decoded alongside
        assert eng.policy.stats.iterations - iterations <= 9
        assert not eng.requests


# ---------------------------------------------------------------- bad bodies and slow clients

def test_oversized_body_gets_413_and_long_prompt_400_before_tokenizing(make_engine):
    eng = make_engine(max_num_seqs=2)
    with serve(eng, max_request_bytes=4000) as srv:
        big = json.dumps({"model": MODEL, "prompt": "x" * 5000}).encode()
        r = httpx.post(srv.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert_error(r, 413, code="request_too_large")

        def chunked():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        r = httpx.post(srv.url + "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
        assert_error(r, 413, code="request_too_large")
        assert metric(srv.url, "baton_requests_rejected_total", reason="request_too_large") == 2
        complete(srv.url, "still serving", 2)
    with serve(eng) as srv:  # under the default byte limit, but longer than any prompt that fits the context
        n = eng.max_prompt_chars + 1
        for path, body, param in [("/v1/completions", {"prompt": "y" * n}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * n}]},
                                   "messages")]:
            err = assert_error(httpx.post(srv.url + path, json={"model": MODEL, **body}, timeout=60), 400,
                               param=param)
            assert "characters" in err["message"]


def test_slow_body_and_slow_headers_get_408(make_engine):
    eng = make_engine(max_num_seqs=2)
    app = create_app(eng, served_model_name=MODEL, body_timeout=1.0)
    with ServerThread(app, header_timeout=1.0) as srv:
        body = json.dumps({"model": MODEL, "prompt": "slow", "max_tokens": 2}).encode()
        req = raw_post("/v1/completions", body)
        head = len(req) - len(body)
        # a body trickled byte by byte
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(req[:head])
            t0 = time.monotonic()
            trickle(s, body[:20], 0.2)
            resp = read_response(s)
            assert status_of(resp) == 408 and json_body(resp)["error"]["code"] == "request_timeout"
            assert time.monotonic() - t0 < 20
        # headers trickled byte by byte (slowloris), and a connection that sends nothing
        with socket.create_connection((srv.host, srv.port)) as s1, \
                socket.create_connection((srv.host, srv.port)) as s2:
            trickle(s1, req[:20], 0.15)
            for s in (s1, s2):
                resp = read_response(s)
                assert status_of(resp) == 408 and json_body(resp)["error"]["code"] == "request_timeout"
        # a keep-alive connection gets the deadline again for its next request head
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(raw_post("/v1/completions", body))
            s.settimeout(60)
            first = b""
            while b'"usage"' not in first:
                first += s.recv(65536)
            assert status_of(first) == 200
            s.sendall(b"POST /v1/comp")
            resp = read_response(s)
            assert status_of(resp) == 408
        assert metric(srv.url, "baton_requests_rejected_total", reason="body_timeout") == 1
        assert metric(srv.url, "baton_requests_rejected_total", reason="header_timeout") == 3
        complete(srv.url, "still serving", 2)


def test_connection_bound_answers_503(make_engine):
    eng = make_engine(max_num_seqs=2)
    app = create_app(eng, served_model_name=MODEL)
    with ServerThread(app, max_connections=3) as srv:
        idle = [socket.create_connection((srv.host, srv.port)) for _ in range(3)]
        try:
            wait_for(lambda: len(srv.server.server_state.connections) == 3, what="three connections")
            with socket.create_connection((srv.host, srv.port)) as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = read_response(s)
            assert status_of(resp) == 503 and json_body(resp)["error"]["code"] == "too_many_connections"
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: len(srv.server.server_state.connections) == 0, what="connections closed")
        assert httpx.get(srv.url + "/v1/models").status_code == 200
        assert metric(srv.url, "baton_requests_rejected_total", reason="too_many_connections") == 1


def test_lone_surrogate_seed_range_and_fields_named(server, engine, monkeypatch):
    url = server.url
    post = lambda path, body: httpx.post(url + path, content=json.dumps({"model": MODEL, **body}),  # noqa: E731
                                         headers={"Content-Type": "application/json"}, timeout=60)
    assert_error(post("/v1/completions", {"prompt": "Hi \udc80"}), 400, param="prompt")
    assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi \ud800!"}]}), 400,
                 param="messages")
    for seed in (2**64, -2**63 - 1, 10**30):
        err = assert_error(post("/v1/completions", {"prompt": "Hi", "seed": seed}), 400, param="seed")
        assert "2**64" in err["message"]
    assert post("/v1/completions", {"prompt": "Hi", "seed": 2**64 - 1, "max_tokens": 2}).status_code == 200
    L = engine.max_model_len
    err = assert_error(post("/v1/completions", {"prompt": "Hi", "max_tokens": L}), 400, param="max_tokens")
    assert f"max_tokens must be less than {L}" in err["message"]
    err = assert_error(post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": L - 1}), 400, param="max_tokens")
    assert f"max_tokens must be at most {L - 3} for this prompt" in err["message"]
    assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                               "max_completion_tokens": engine.max_model_len}), 400,
                 param="max_completion_tokens")
    assert_error(post("/v1/completions", {"prompt": [1] * (engine.max_model_len + 1)}), 400, param="prompt")
    assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 9000}]}), 400,
                 param="messages")

    def broken_template(*a, **k):
        raise RuntimeError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(engine.tokenizer, "render_chat", broken_template)
    err = assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}), 400,
                       param="messages")
    assert "roles must alternate" in err["message"]


def test_max_waiting_zero_admits_what_the_rows_hold(make_engine):
    eng = make_engine(max_num_seqs=1)
    with serve(eng, max_waiting=0) as srv:
        complete(srv.url, "idle server", 2)  # 200: a free row, nothing queues
        s = SSEReader(srv.url, {"model": MODEL, "prompt": "busy", "max_tokens": 3000, "ignore_eos": True,
                                "stream": True})
        try:
            s.read(1)
            assert_error(httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}), 429,
                         code="queue_full")
            # an invalid request is told so even when the server is full
            for body, param in [({"prompt": "x \udc80"}, "prompt"), ({"prompt": [10**9]}, "prompt"),
                                ({"prompt": "x", "max_tokens": 10**6}, "max_tokens")]:
                r = httpx.post(srv.url + "/v1/completions", content=json.dumps({"model": MODEL, **body}),
                               headers={"Content-Type": "application/json"})
                assert_error(r, 400, param=param)
        finally:
            s.close()
        wait_for(lambda: nothing_held(srv.url), what="row freed")
        complete(srv.url, "idle again", 2)


def _serve_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "baton.cli", "serve", "--served-model-name", MODEL, "--log-level", "info", *args]


def test_busy_port_fails_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # a model path that does not exist: had the model been loaded first, that would be the error
        proc = subprocess.run(_serve_cmd("--port", str(port), "--model", str(tmp_path / "no-such-model")),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr
    assert "does not exist" not in proc.stderr and "serving on" not in proc.stderr


def test_max_model_len_above_the_model_is_an_error(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(_serve_cmd("--port", str(port), "--model", tiny_model_dir, "--max-model-len", "100000",
                                     "--dtype", "float32"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "max_model_len must be an integer in [1, 4096]" in proc.stderr
    proc = subprocess.run(_serve_cmd("--port", str(port), "--max-waiting", "-1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--max-waiting must be >= 0" in proc.stderr


# ---------------------------------------------------------------- operability

def test_access_log_and_stats_lines(make_engine, caplog):
    eng = make_engine(max_num_seqs=2)
    caplog.set_level(logging.INFO, logger="baton")
    with serve(eng, stats_interval=0.01) as srv:
        out = complete(srv.url, "Log me", 5)
        s = SSEReader(srv.url, {"model": MODEL, "prompt": "Stream me", "max_tokens": 4, "ignore_eos": True,
                                "stream": True})
        s.read_all()
        s.close()
        httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 0})
        wait_for(lambda: sum(r.name == "baton.access" for r in caplog.records) >= 3, what="access lines")
    lines = [r.getMessage() for r in caplog.records if r.name == "baton.access"]
    line = next(ln for ln in lines if f"id={out['id']}" in ln)
    assert '"POST /v1/completions" 200' in line and "prompt_tokens=" in line and "output_tokens=5" in line
    assert "finish_reason=length" in line and "ttft=" in line and "duration=" in line
    assert any("output_tokens=4" in ln and "ttft=" in ln for ln in lines)  # the stream, logged at its end
    assert any('"POST /v1/completions" 400' in ln for ln in lines)
    stats = [r.getMessage() for r in caplog.records if r.name == "baton.server" and "engine:" in r.getMessage()]
    assert stats and "running" in stats[0] and "KV" in stats[0] and "tok/s" in stats[0]
