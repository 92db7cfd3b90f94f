"""Prometheus metrics, on a CollectorRegistry of the app's own (several apps in
one process do not clash).

Gauges come from the engine-stats snapshot the engine thread takes after every
iteration, so a scrape never waits on the engine lock.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineCollector:
    """Engine state at scrape time, read from the AsyncEngine's snapshot."""

    def __init__(self, server_state):
        self.state = server_state

    def collect(self):
        ae = self.state.async_engine
        st = ae.stats if ae is not None else {}
        gauges = [
            ("baton_num_requests_running", "Queries holding a row of the running batch", "running"),
            ("baton_num_requests_waiting", "Queries queued without KV cache", "waiting"),
            ("baton_num_requests_prefilled", "Queries prefilled and ready to join the batch (P&D pool)", "prefilled"),
            ("baton_num_requests_parked", "Queries preempted with their KV cache set aside", "parked"),
            ("baton_kv_cache_used_bytes", "KV cache bytes reserved (reserve-on-admit)", "kv_bytes_used"),
            ("baton_kv_cache_resident_bytes", "KV cache bytes allocated now", "kv_bytes_resident"),
            ("baton_kv_cache_budget_bytes", "KV cache byte budget", "kv_bytes_budget"),
            ("baton_kv_cache_live_bytes", "KV cache bytes holding live tokens", "kv_bytes_live"),
            ("baton_prefix_cache_bytes", "Prefix cache bytes held (part of the KV budget)", "prefix_cache_bytes"),
            ("baton_prefix_cache_capacity_bytes", "Prefix cache byte capacity", "prefix_cache_capacity_bytes"),
        ]
        for name, doc, key in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(st.get(key, 0) or 0))
            yield g
        g = GaugeMetricFamily("baton_num_requests_in_flight", "Requests admitted by the server and not finished")
        g.add_metric([], float(ae.num_in_flight if ae is not None else 0))
        yield g
        g = GaugeMetricFamily("baton_max_waiting", "Queue bound: requests beyond max_num_seqs before 429")
        g.add_metric([], float(self.state.max_waiting))
        yield g
        c = CounterMetricFamily("baton_preemptions", "Queries preempted by the engine (engine lifetime)")
        c.add_metric([], float(st.get("preemptions", 0) or 0))
        yield c
        c = CounterMetricFamily("baton_engine_iterations", "Engine iterations (engine lifetime)")
        c.add_metric([], float(st.get("iterations", 0) or 0))
        yield c
        for name, doc, key in [
            ("baton_prefix_cache_queries", "Prefix cache lookups (one per query prefilled)", "prefix_cache_queries"),
            ("baton_prefix_cache_query_hits", "Lookups that reused cached K/V", "prefix_cache_query_hits"),
            ("baton_prefix_cache_tokens", "Prompt tokens looked up in the prefix cache", "prefix_cache_tokens"),
            ("baton_prefix_cache_token_hits", "Prompt tokens whose K/V came from the prefix cache",
             "prefix_cache_token_hits"),
            ("baton_prefix_cache_evictions", "Prefix cache blocks evicted", "prefix_cache_evictions"),
        ]:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(st.get(key, 0) or 0))
            yield c
        c = CounterMetricFamily("baton_idle_token_rows", "Token-rows computed for padding or finished queries")
        c.add_metric([], float(st.get("idle_token_rows", 0) or 0))
        yield c


class ServerMetrics:
    def __init__(self, server_state):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("baton_time_to_first_token_seconds", "Time to first token (server arrival to "
                              "first sampled token)", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("baton_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("baton_e2e_request_latency_seconds", "Server arrival to last token, finished "
                             "(not aborted) requests", buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("baton_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("baton_generation_tokens", "Generated tokens", registry=r)
        self.admitted = Counter("baton_requests_admitted", "Requests the engine accepted; each ends exactly once, "
                                "in baton_requests_finished", registry=r)
        self.finished = Counter("baton_requests_finished", "Requests finished, by finish reason (stop, length, "
                                "abort, error)", ["finish_reason"], registry=r)
        self.aborts = Counter("baton_requests_aborted", "Requests aborted (client disconnect, shutdown)", registry=r)
        self.rejections = Counter("baton_requests_rejected", "Requests rejected before admission, by reason",
                                  ["reason"], registry=r)
        r.register(_EngineCollector(server_state))

    def reject(self, reason: str) -> None:
        """Count one request refused before admission (every layer that refuses calls this)."""
        self.rejections.labels(reason=reason).inc()
