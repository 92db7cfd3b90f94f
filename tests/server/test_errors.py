"""400 / 404 / 401 / 429 with OpenAI's error schema; the server keeps serving."""
from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import MODEL, SSEReader, assert_error, metric, serve, wait_for


def still_serves(url: str) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


COMPLETION_400 = [
    # (body, param)
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": 42}, "prompt"),
    ({"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_k": -5}, "top_k"),
    ({"model": MODEL, "prompt": "x", "min_p": 2}, "min_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, "stop"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x", "n": 129}, "n"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "x", "suffix": "end"}, "suffix"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"dog": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"model": MODEL, "prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"model": MODEL, "prompt": "x", "bad_words": [""]}, "bad_words"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": MODEL, "prompt": "x", "no_such_field": 1}, "no_such_field"),
    ({"model": MODEL, "prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
    ({"model": MODEL, "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"model": MODEL, "prompt": "x", "guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"model": MODEL, "prompt": "x", "guided_regex": "(("}, "guided_regex"),
    ({"model": MODEL, "prompt": "x", "guided_choice": []}, "guided_choice"),
    ({"model": MODEL, "prompt": "x", "grammar": "root ::= ("}, "grammar"),
    ({"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"model": MODEL, "prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": ["a", ""]}, "prompt"),
    ({"model": MODEL, "prompt": [10 ** 9]}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10 ** 6}, "max_tokens"),  # prompt + max_tokens > context
]

CHAT_400 = [
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
     "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
     "max_completion_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    # the default model's own template takes no tools
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": None, "tool_calls": [
                                       {"id": "c1", "type": "function",
                                        "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "continue_final_message": True},
     "continue_final_message"),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}], "continue_final_message": True,
      "add_generation_prompt": True}, "continue_final_message"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": 1}},
     "chat_template_kwargs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template": "/no/such/file.jinja"},
     "chat_template"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frobnicate": True}, "frobnicate"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
]


def test_completion_400s(server):
    for body, param in COMPLETION_400:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        err = assert_error(r, 400, param=param)
        assert err["type"] == "invalid_request_error", (body, err)
    still_serves(server.url)


def test_chat_400s(server):
    for body, param in CHAT_400:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert_error(r, 400, param=param)
    still_serves(server.url)


def test_malformed_bodies(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        for content in (b"{not json", b"[1, 2]", b"", b"null", "{\"prompt\": \"\xff\"".encode("latin-1")):
            r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                           timeout=60)
            assert_error(r, 400)
    assert "invalid JSON" in httpx.post(server.url + "/v1/completions", content=b"{not json",
                                        headers={"Content-Type": "application/json"}).json()["error"]["message"]
    still_serves(server.url)


def test_context_length_message(server, engine):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10 ** 6})
    msg = assert_error(r, 400)["message"]
    assert str(engine.max_model_len) in msg and "max_tokens" in msg
    # a prompt longer than the context, with max_tokens left to the default
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": [1] * (engine.max_model_len + 1)}, timeout=60)
    assert_error(r, 400)
    still_serves(server.url)


def test_unknown_model_404(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert_error(r, 404, param="model", code="model_not_found")
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert_error(r, 404, param="model", code="model_not_found")
    assert_error(httpx.get(server.url + "/v1/models/gpt-9"), 404)
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="gpt-9", prompt="x", max_tokens=2)
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2, n=0)
        assert e.value.param == "n"
    still_serves(server.url)


def test_rejections_counted(server):
    before = metric(server.url, "baton_requests_rejected_total", reason="invalid_request")
    httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 0})
    httpx.post(server.url + "/v1/completions", content=b"{", headers={"Content-Type": "application/json"})
    assert metric(server.url, "baton_requests_rejected_total", reason="invalid_request") == before + 2


def test_api_key_401(make_engine):
    eng = make_engine(max_num_seqs=2)
    with serve(eng, api_key="sekret") as srv:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        assert_error(httpx.post(srv.url + "/v1/completions", json=body), 401, code="invalid_api_key")
        assert_error(httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}),
                     401, code="invalid_api_key")
        assert_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": "sekret"}), 401)
        # unauthenticated bad bodies are 401, not 400: nothing is parsed before auth
        assert_error(httpx.post(srv.url + "/v1/completions", content=b"{"), 401)
        assert httpx.get(srv.url + "/health").status_code == 200  # only health stays open
        for path in ("/metrics", "/openapi.json"):
            assert_error(httpx.get(srv.url + path), 401, code="invalid_api_key")
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer sekret"}).status_code == 200
        r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekret"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        # the scheme is case-insensitive (RFC 7235)
        for scheme in ("bearer", "BEARER", "BeArEr"):
            r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"{scheme} sekret"})
            assert r.status_code == 200, (scheme, r.text)
        # two Authorization headers: refused, whichever comes last
        for pair in ([("Authorization", "Bearer nope"), ("Authorization", "Bearer sekret")],
                     [("Authorization", "Bearer sekret"), ("Authorization", "Bearer nope")]):
            err = assert_error(httpx.get(srv.url + "/v1/models", headers=httpx.Headers(pair)), 401)
            assert "exactly one" in err["message"]
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0) as c:
            assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=2).usage.completion_tokens == 2
        m = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer sekret"}).text
        assert 'baton_requests_rejected_total{reason="unauthorized"} 9.0' in m, m


def test_metrics_api_key(make_engine):
    eng = make_engine(max_num_seqs=2)
    with serve(eng, api_key="gen-key", metrics_api_key="scrape-key") as srv:
        assert_error(httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer gen-key"}), 401)
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer scrape-key"}).status_code == 200
        assert_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer scrape-key"}), 401)
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer gen-key"}).status_code == 200
    with serve(eng, metrics_api_key="scrape-key") as srv:  # the API open, metrics behind their key
        assert httpx.get(srv.url + "/v1/models").status_code == 200
        assert_error(httpx.get(srv.url + "/metrics"), 401)
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer scrape-key"}).status_code == 200


def test_queue_full_429(make_engine):
    """max_num_seqs=1 and max_waiting=1: one running, one queued, the third gets 429."""
    eng = make_engine(max_num_seqs=1)
    with serve(eng, max_waiting=1) as srv:
        long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True,
                "stream": True}
        a = SSEReader(srv.url, long)  # running
        b = SSEReader(srv.url, long)  # queued (admitted: its response has started)
        try:
            a.read(1)
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            err = assert_error(r, 429, code="queue_full")
            assert r.headers.get("retry-after") == "1"
            assert "retry" in err["message"]
            r = httpx.post(srv.url + "/v1/chat/completions",
                           json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True})
            assert_error(r, 429, code="queue_full")
            with openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as c:
                with pytest.raises(openai.RateLimitError):
                    c.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert metric(srv.url, "baton_requests_rejected_total", reason="queue_full") == 3
            assert metric(srv.url, "baton_num_requests_in_flight") == 2
        finally:
            b.close()  # the queued one leaves the queue
            a.close()
        wait_for(lambda: metric(srv.url, "baton_num_requests_in_flight") == 0, what="queue empty")
        assert metric(srv.url, "baton_requests_aborted_total") == 2
        still_serves(srv.url)
