"""Prefix caching through the server: usage.prompt_tokens_details.cached_tokens
and the /metrics counters."""
from __future__ import annotations

import httpx

from .conftest import MODEL, metric, serve

SYSTEM = "You are a careful assistant. " * 30


def test_cached_tokens_reported_and_output_unchanged(make_engine):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a fruit."}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 8, "temperature": 0}
    with serve(make_engine(max_num_seqs=2, enable_prefix_caching=False)) as srv:
        off = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()
        assert off["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    with serve(make_engine(max_num_seqs=2)) as srv:
        first = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()
        second = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert 0 < cached < second["usage"]["prompt_tokens"] and cached % 16 == 0
        assert first["choices"] == second["choices"] == off["choices"]
        assert metric(srv.url, "baton_prefix_cache_query_hits_total") == 1
        assert metric(srv.url, "baton_prefix_cache_queries_total") == 2
        assert metric(srv.url, "baton_prefix_cache_token_hits_total") == cached
        assert metric(srv.url, "baton_prefix_cache_bytes") > 0
        assert metric(srv.url, "baton_kv_cache_used_bytes") == 0  # queries hold nothing; the cache is apart
        # streamed usage says it too
        lines = [ln for ln in httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            **body, "stream": True, "stream_options": {"include_usage": True}}).text.splitlines()
            if ln.startswith("data: {")]
        assert '"cached_tokens":' + str(cached) in lines[-1]
