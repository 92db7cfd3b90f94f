"""/metrics: Prometheus text that prometheus_client parses, and counters that move."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MODEL, metrics


def test_metrics_parse_and_move(server, engine):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    expected = {
        "baton_num_requests_running": "gauge", "baton_num_requests_waiting": "gauge",
        "baton_num_requests_prefilled": "gauge", "baton_kv_cache_used_bytes": "gauge",
        "baton_kv_cache_budget_bytes": "gauge", "baton_time_to_first_token_seconds": "histogram",
        "baton_time_per_output_token_seconds": "histogram", "baton_e2e_request_latency_seconds": "histogram",
        "baton_prompt_tokens": "counter", "baton_generation_tokens": "counter",
        "baton_requests_aborted": "counter", "baton_requests_rejected": "counter",
        "baton_preemptions": "counter", "baton_requests_finished": "counter",
    }
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)

    m0 = metrics(server.url)
    assert m0[("baton_kv_cache_budget_bytes", ())] == engine.budget.limit > 0
    prompt = "Twinkle twinkle little"
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5,
                                                         "ignore_eos": True, "temperature": 0}, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 5
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4,
                            "stream": True}, timeout=60)
    assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]")
    httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": -3})
    m1 = metrics(server.url)

    def d(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    n_chat_prompt = len(engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}]))
    assert d("baton_prompt_tokens_total") == len(engine.tokenizer.encode(prompt)) + n_chat_prompt
    assert 6 <= d("baton_generation_tokens_total") <= 9
    assert d("baton_time_to_first_token_seconds_count") == 2
    assert d("baton_e2e_request_latency_seconds_count") == 2
    assert d("baton_time_per_output_token_seconds_count") >= 1
    assert d("baton_time_to_first_token_seconds_sum") > 0
    assert d("baton_requests_finished_total", finish_reason="length") >= 1
    assert d("baton_requests_rejected_total", reason="invalid_request") == 1
    assert d("baton_requests_aborted_total") == 0
    assert d("baton_engine_iterations_total") >= 5
    # histogram buckets are cumulative and end at +Inf == count
    assert m1[("baton_e2e_request_latency_seconds_bucket", (("le", "+Inf"),))] == \
        m1[("baton_e2e_request_latency_seconds_count", ())]
    # idle again: gauges back to zero
    assert m1[("baton_num_requests_running", ())] == 0
    assert m1[("baton_num_requests_in_flight", ())] == 0
    assert m1[("baton_kv_cache_used_bytes", ())] == 0
