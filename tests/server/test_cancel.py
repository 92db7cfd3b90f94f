"""Client disconnects abort the query and free its row, without disturbing the others."""
from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from .conftest import MODEL, SSEReader, metric, wait_for


def running(url) -> float:
    return metric(url, "baton_num_requests_running")


def test_stream_disconnect_frees_row(server, client, engine):
    url = server.url
    long = dict(model=MODEL, temperature=0, max_tokens=3000, ignore_eos=True, stream=True)
    prompt_b, prompt_c = "The history of the printing press", "A recipe for pancakes:"
    ref_b = client.completions.create(model=MODEL, prompt=prompt_b, temperature=0, max_tokens=12,
                                      extra_body={"ignore_eos": True}).choices[0].text
    ref_c = client.completions.create(model=MODEL, prompt=prompt_c, temperature=0, max_tokens=12)
    aborted0 = metric(url, "baton_requests_aborted_total")

    a = SSEReader(url, {**long, "prompt": "Tell me a very long story about dragons"})
    b = SSEReader(url, {**long, "prompt": prompt_b})
    try:
        a.read(2)
        b.read(2)
        wait_for(lambda: running(url) == 2, what="two running rows")

        # C runs while A and B stream, and gets its solo result
        with ThreadPoolExecutor(1) as ex:
            r = ex.submit(client.completions.create, model=MODEL, prompt=prompt_c, temperature=0,
                          max_tokens=12).result(timeout=120)
        assert r.choices[0].text == ref_c.choices[0].text
        assert r.choices[0].finish_reason == ref_c.choices[0].finish_reason

        a.read(1)
        a.close()  # A disconnects mid-stream
        wait_for(lambda: metric(url, "baton_requests_aborted_total") == aborted0 + 1, what="abort counted")
        wait_for(lambda: running(url) == 1, what="A's row freed")
        assert metric(url, "baton_num_requests_in_flight") == 1
        # B keeps streaming, and its output is the solo one
        b.read(14)
        assert not b.done
        assert b.text.startswith(ref_b), (b.text, ref_b)
        assert all(c["choices"][0]["finish_reason"] is None for c in b.chunks)
    finally:
        a.close()
        b.close()
    wait_for(lambda: metric(url, "baton_requests_aborted_total") == aborted0 + 2, what="B's abort counted")
    wait_for(lambda: running(url) == 0 and metric(url, "baton_num_requests_in_flight") == 0, what="all rows free")
    wait_for(lambda: not engine.has_unfinished_requests(), what="engine empty")
    assert metric(url, "baton_requests_finished_total", finish_reason="abort") >= 2


def test_nonstreaming_disconnect_aborts(server, client):
    url = server.url
    aborted0 = metric(url, "baton_requests_aborted_total")
    body = json.dumps({"model": MODEL, "prompt": "Write an endless poem", "max_tokens": 3000,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: running(url) == 1, what="the request running")
    sock.close()  # the client gives up
    wait_for(lambda: metric(url, "baton_requests_aborted_total") == aborted0 + 1, what="abort counted")
    wait_for(lambda: running(url) == 0 and metric(url, "baton_num_requests_in_flight") == 0, what="row freed")
    # and the server still serves
    r = client.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_many_disconnects_leave_no_trace(server, client, engine):
    """Several clients vanish at different points (queued, just started, mid-stream);
    a concurrent normal request is unaffected and nothing leaks."""
    url = server.url
    ref = client.completions.create(model=MODEL, prompt="Name three fruits:", temperature=0, max_tokens=10)
    aborted0 = metric(url, "baton_requests_aborted_total")
    readers = [SSEReader(url, {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 500, "ignore_eos": True,
                               "stream": True, "temperature": 0}) for i in range(6)]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", client.completions.create(
        model=MODEL, prompt="Name three fruits:", temperature=0, max_tokens=10)))
    t.start()
    for i, rd in enumerate(readers):
        rd.read(i % 3)
        rd.close()
    t.join(120)
    assert result["r"].choices[0].text == ref.choices[0].text
    wait_for(lambda: metric(url, "baton_requests_aborted_total") == aborted0 + 6, what="six aborts")
    wait_for(lambda: metric(url, "baton_num_requests_in_flight") == 0 and running(url) == 0, what="rows freed")
    wait_for(lambda: not engine.has_unfinished_requests(), what="engine empty")
