"""`baton bench serve`: an async streaming client for any OpenAI-compatible server.

Measures what the common serving benchmark (vLLM's `bench serve`) measures, with
its key names, so the numbers compare with results people already have:

- arrivals: all at once (`--request-rate inf`) or gamma-distributed gaps
  (shape = burstiness, burstiness 1 = Poisson), rescaled so the last arrival
  lands at N/rate; `--max-concurrency` is a semaphore whose waiting time is not
  counted as latency;
- per request, always streaming with `stream_options.include_usage`: TTFT (send
  to the first chunk carrying `choices`), ITL (every later gap between such
  chunks), E2E (send to the last such chunk), TPOT ((E2E - TTFT) / (tokens - 1)),
  output tokens from `usage.completion_tokens` (else the number of token chunks);
- run: request/output/total-token throughput, goodput under SLOs, and
  mean/median/std/p99 of TTFT, TPOT, ITL and E2E, over successful requests,
  duration = first send to last completion.
"""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Optional, Sequence

import httpx
from tqdm.auto import tqdm

from .metrics import RequestRecord, run_metrics
from .workloads import BenchRequest, arrival_offsets

CHAT_ENDPOINTS = ("/v1/chat/completions", "/chat/completions")


def build_payload(req: BenchRequest, model_id: str, endpoint: str, extra: Optional[dict] = None) -> dict:
    chat = endpoint.rstrip("/").endswith("chat/completions")
    body: dict = {"model": model_id, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": 0.0, "ignore_eos": True}
    if chat:
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts: use --prompt-format text")
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    if extra:
        body.update(extra)
    return body


async def _one_request(client: httpx.AsyncClient, url: str, payload: dict, rec: RequestRecord, t_start: float,
                       chat: bool, headers: Optional[dict] = None) -> None:
    st = time.perf_counter()
    rec.send_time = st - t_start
    first = False
    last = st
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {body[:300]}"
                return
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    rec.error = f"bad SSE data: {data[:200]}"
                    return
                if obj.get("error"):
                    rec.error = f"server error: {json.dumps(obj['error'])[:300]}"
                    return
                now = time.perf_counter()
                if obj.get("choices"):
                    if not first:
                        first = True
                        rec.ttft = now - st
                    else:
                        rec.itl.append(now - last)
                    last = now
                    chunks += 1
                elif obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                if obj.get("usage") and obj.get("choices"):
                    usage_tokens = obj["usage"].get("completion_tokens", usage_tokens)
        if not first:
            rec.error = rec.error or "no token chunk received"
            return
        rec.latency = last - st
        rec.output_len = int(usage_tokens) if usage_tokens is not None else chunks
        rec.success = True
    except (httpx.HTTPError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    except asyncio.CancelledError:
        rec.error = "cancelled"
        raise


async def fetch_model_id(client: httpx.AsyncClient, base_url: str) -> str:
    r = await client.get(base_url.rstrip("/") + "/v1/models")
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --served-model-name")
    return data[0]["id"]


async def wait_for_server(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            try:
                r = await client.get(base_url.rstrip("/") + "/v1/models")
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ValueError(f"server at {base_url} did not answer GET /v1/models within {timeout_s:.0f} s")
            await asyncio.sleep(0.5)


async def benchmark(base_url: str, requests: Sequence[BenchRequest], *, endpoint: str = "/v1/completions",
                    model_id: Optional[str] = None, request_rate: float = float("inf"), burstiness: float = 1.0,
                    max_concurrency: Optional[int] = None, slos: Optional[dict] = None, seed: int = 0,
                    backend: str = "openai", extra_body: Optional[dict] = None, progress: bool = True,
                    api_key: Optional[str] = None, timeout_s: float = 6 * 3600) -> dict:
    base_url = base_url.rstrip("/")
    url = base_url + (endpoint if endpoint.startswith("/") else "/" + endpoint)
    chat = endpoint.rstrip("/").endswith("chat/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if model_id is None:
            try:
                model_id = await fetch_model_id(client, base_url)
            except httpx.HTTPError as e:
                raise ValueError(f"cannot reach the server at {base_url}: {e}") from None
        payloads = [build_payload(r, model_id, endpoint, extra_body) for r in requests]
        offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
        records = [RequestRecord(prompt_len=r.prompt_len, expected_output_len=r.output_len) for r in requests]
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), desc="serve", unit="req", disable=not progress, leave=False)

        async def run(i: int, t_start: float):
            delay = t_start + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                await _one_request(client, url, payloads[i], records[i], t_start, chat, headers)
            else:
                async with sem:
                    await _one_request(client, url, payloads[i], records[i], t_start, chat, headers)
            bar.update(1)

        t_start = time.perf_counter()
        await asyncio.gather(*(run(i, t_start) for i in range(len(requests))))
        bar.close()

    ok = [r for r in records if r.success]
    if ok:
        first_send = min(r.send_time for r in records)
        duration = max(r.finish_time for r in ok) - first_send
    else:
        duration = time.perf_counter() - t_start
    m = run_metrics(records, duration, slos)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "backend": backend,
        "base_url": base_url,
        "endpoint": endpoint,
        "model_id": model_id,
        "num_prompts": len(requests),
        "request_rate": request_rate if request_rate != float("inf") else "inf",
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "goodput_slos_ms": slos or None,
        **m,
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_len for r in records],
        "expected_output_lens": [r.expected_output_len for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itl for r in records],
        "errors": [r.error for r in records],
    }
    return result


def run(base_url: str, requests: Sequence[BenchRequest], **kwargs) -> dict:
    return asyncio.run(benchmark(base_url, requests, **kwargs))


def format_result(r: dict) -> str:
    """A summary in the layout of the common serving benchmark."""
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def kv(label, value, fmt="{:<10}"):
        lines.append("{:<40} {}".format(label, fmt.format(value) if value is not None else "-"))

    kv("Successful requests:", r["completed"])
    kv("Failed requests:", r["failed"])
    kv("Maximum request concurrency:", r["max_concurrency"])
    kv("Request rate configured (RPS):", r["request_rate"])
    kv("Benchmark duration (s):", r["duration"], "{:<10.2f}")
    kv("Total input tokens:", r["total_input_tokens"])
    kv("Total generated tokens:", r["total_output_tokens"])
    kv("Request throughput (req/s):", r["request_throughput"], "{:<10.2f}")
    if r.get("request_goodput") is not None:
        kv("Request goodput (req/s):", r["request_goodput"], "{:<10.2f}")
    kv("Output token throughput (tok/s):", r["output_throughput"], "{:<10.2f}")
    kv("Peak output token throughput (tok/s):", r["max_output_tokens_per_s"], "{:<10.2f}")
    kv("Peak concurrent requests:", r["max_concurrent_requests"])
    kv("Total token throughput (tok/s):", r["total_token_throughput"], "{:<10.2f}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^60}".format(s=" " + title + " ", c="-"))
        kv(f"Mean {name.upper()} (ms):", r[f"mean_{name}_ms"], "{:<10.2f}")
        kv(f"Median {name.upper()} (ms):", r[f"median_{name}_ms"], "{:<10.2f}")
        kv(f"Std {name.upper()} (ms):", r[f"std_{name}_ms"], "{:<10.2f}")
        kv(f"P99 {name.upper()} (ms):", r[f"p99_{name}_ms"], "{:<10.2f}")
    lines.append("=" * 60)
    errs = [e for e in r.get("errors", []) if e]
    if errs:
        lines.append(f"first error: {errs[0]}")
    return "\n".join(lines)
