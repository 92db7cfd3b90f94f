"""Hostile and clumsy clients against `baton serve`: does every request get its one
answer, does nothing stay behind, does the server hold?

    .venv/bin/python benchmarks/hostile.py storm              # 300 clients in 10 s, half of them vanish
    .venv/bin/python benchmarks/hostile.py overload           # 4x what rows + queue hold, at once, twice
    .venv/bin/python benchmarks/hostile.py soak --minutes 10  # steady traffic, a third of it hostile

Starts `baton serve` (default model and dtype) on a free loopback port with
--max-num-seqs 16 --max-waiting 32 --header-timeout 2 --body-timeout 3
--max-request-bytes 1000000, runs the traffic from this process (asyncio; the
client shares the machine's cores with the server), waits until the server holds
nothing, reads its counters, and stops it.

Per client, by what it does:
- waits for an answer: a streamed or plain completion (greedy, ignore_eos, so the
  token count is known), a canary (a fixed greedy prompt whose text must equal the
  reference taken before the traffic), a poison one (temperature 1e-40, 5e-324 or
  top_p 1e-300: must be answered 200), a bad one (an out-of-range field or a lone
  surrogate: 400), an oversized body (413), a slow head or body (408);
- goes away on purpose: before its headers are complete, right after sending,
  mid-body, or mid-stream.
Outcomes: `ok`; `hung_up` (on purpose); `lost` (it waited and got no answer, or a
stream ended without its finish and [DONE]); `duplicated` (two finishes or two
[DONE] in one stream, or an id answered twice); `unexpected` (a status outside
the kind's expected set); `wrong` (200 with the wrong token count or canary text).
Server side: admitted vs ended (baton_requests_admitted vs the sum of
baton_requests_finished), and the held gauges (running, waiting, prefilled,
parked, KV reserved, in flight) once the traffic is over.

Writes <mode>.json and report.md (a row per mode run so far) under --out (default
benchmarks/results/hostile), the soak also rss.png, and prints a summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from baton.bench.report import cpu_flags, cpu_model

MODEL = "baton"
SERVER_FLAGS = ["--max-num-seqs", "16", "--max-waiting", "32", "--header-timeout", "2", "--body-timeout", "3",
                "--max-request-bytes", "1000000", "--log-level", "warning", "--served-model-name", MODEL]
HELD = ("baton_num_requests_running", "baton_num_requests_waiting", "baton_num_requests_prefilled",
        "baton_num_requests_parked", "baton_kv_cache_used_bytes", "baton_num_requests_in_flight")
CANARY = {"prompt": "The three primary colors are", "max_tokens": 16, "temperature": 0}
WORDS = "the a river stone light window quiet engine music garden city north paper voice".split()
BAD_FIELDS = [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"seed": 2**64}, {"logprobs": 99},
              {"max_tokens": 10**6}, {"stop": [""]}, {"n": 3}, {"min_p": 2}, {"prompt": ""}]
POISON = [{"temperature": 1e-40}, {"temperature": 5e-324}, {"top_p": 1e-300}]
EXPECTED = {"stream": {200}, "complete": {200}, "canary": {200}, "poison": {200}, "bad": {400}, "surrogate": {400},
            "oversize": {413}, "slow_head": {408}, "slow_body": {408}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (MiB per minute) over (seconds, bytes) samples."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (r - mr) for t, r in samples) / var * 60 / 2**20 if var else 0.0


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))


def post_bytes(body: dict, path: str = "/v1/completions") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


class Run:
    def __init__(self, url: str, port: int, canary_text: str, waiting_allows_429: bool):
        self.url, self.port, self.canary_text = url, port, canary_text
        self.allow_429 = waiting_allows_429
        self.records: list[dict] = []
        self.ids: Counter = Counter()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))

    def note(self, kind: str, outcome: str, status=None, detail: str = "") -> None:
        self.records.append({"kind": kind, "outcome": outcome, "status": status, "detail": detail[:200]})

    def expected(self, kind: str) -> set:
        return EXPECTED[kind] | ({429} if self.allow_429 and kind in ("stream", "complete", "canary", "poison")
                                 else set())

    # ------------------------------------------------------------ clients that wait for an answer
    async def stream(self, rng: random.Random, kind: str = "stream", extra: dict = None) -> None:
        n = rng.randint(8, 64)
        body = {"model": MODEL, "prompt": prompt(rng), "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
        finishes = dones = 0
        usage = None
        try:
            async with self.client.stream("POST", self.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return self._status(kind, r.status_code, r.text)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if dones:
                        return self.note(kind, "duplicated", 200, "data after [DONE]")
                    if line == "data: [DONE]":
                        dones += 1
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        return self.note(kind, "unexpected", 200, f"error event: {obj['error']}")
                    self.ids[obj["id"]] += obj.get("usage") is not None
                    finishes += sum(bool(c.get("finish_reason")) for c in obj.get("choices") or [])
                    usage = obj.get("usage") or usage
        except (httpx.HTTPError, OSError) as e:
            return self.note(kind, "lost", None, f"{type(e).__name__}: {e}")
        if finishes > 1:
            return self.note(kind, "duplicated", 200, f"{finishes} finish chunks")
        if not finishes or not dones:
            return self.note(kind, "lost", 200, "stream ended without its finish and [DONE]")
        if not usage or usage["completion_tokens"] != n:
            return self.note(kind, "wrong", 200, f"usage {usage}, asked {n}")
        self.note(kind, "ok", 200)

    async def complete(self, rng: random.Random, kind: str = "complete", body: dict = None) -> None:
        n = rng.randint(8, 64)
        body = body or {"model": MODEL, "prompt": prompt(rng), "max_tokens": n, "temperature": 0, "ignore_eos": True}
        try:
            r = await self.client.post(self.url + "/v1/completions", content=json.dumps(body),
                                       headers={"Content-Type": "application/json"})
        except (httpx.HTTPError, OSError) as e:
            return self.note(kind, "lost", None, f"{type(e).__name__}: {e}")
        if r.status_code != 200:
            return self._status(kind, r.status_code, r.text)
        out = r.json()
        self.ids[out["id"]] += 1
        text, tokens = out["choices"][0]["text"], out["usage"]["completion_tokens"]
        if kind == "canary" and text != self.canary_text:
            return self.note(kind, "wrong", 200, f"canary text {text!r}")
        if kind in ("complete", "poison") and tokens != body["max_tokens"]:
            return self.note(kind, "wrong", 200, f"{tokens} tokens, asked {body['max_tokens']}")
        self.note(kind, "ok", 200)

    def _status(self, kind: str, status: int, text: str) -> None:
        self.note(kind, "ok" if status in self.expected(kind) else "unexpected", status, text)

    async def canary(self, rng):
        await self.complete(rng, "canary", {"model": MODEL, **CANARY})

    async def poison(self, rng):
        await self.complete(rng, "poison", {"model": MODEL, "prompt": prompt(rng), "max_tokens": 8,
                                            "ignore_eos": True, "seed": rng.randint(0, 99), **rng.choice(POISON)})

    async def bad(self, rng):
        await self.complete(rng, "bad", {"model": MODEL, "prompt": "x", **rng.choice(BAD_FIELDS)})

    async def surrogate(self, rng):
        await self.complete(rng, "surrogate", {"model": MODEL, "prompt": "Hi \udc80 there", "max_tokens": 4})

    # ------------------------------------------------------------ raw-socket clients
    async def _raw(self, kind: str, send, expect_answer: bool) -> None:
        """`send(reader, writer)` plays the client; one that expects an answer reads
        it while still sending (a server that answers early, 408 or 413, closes, and
        a client still writing would get a reset that discards the answer)."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as e:
            return self.note(kind, "lost", None, f"connect: {e}")
        sending = asyncio.ensure_future(send(reader, writer))
        sending.add_done_callback(lambda t: t.cancelled() or t.exception())  # a reset while sending is expected
        try:
            if not expect_answer:
                try:
                    await sending
                except (OSError, asyncio.TimeoutError):
                    pass
                return self.note(kind, "hung_up")
            head = await asyncio.wait_for(reader.read(65536), 60)
            if not head.startswith(b"HTTP/1.1 "):
                return self.note(kind, "lost", None, f"no status line: {head[:60]!r}")
            self._status(kind, int(head.split(b" ", 2)[1]), head.decode(errors="replace"))
        except (OSError, asyncio.TimeoutError) as e:
            self.note(kind, "lost", None, f"{type(e).__name__}: {e}")
        finally:
            sending.cancel()
            writer.close()

    async def hangup(self, rng: random.Random) -> None:
        body = {"model": MODEL, "prompt": prompt(rng), "max_tokens": 200, "ignore_eos": True,
                "stream": rng.random() < 0.7}
        req = post_bytes(body)
        head_len = req.index(b"\r\n\r\n") + 4
        how = rng.choice(["head", "sent", "body", "stream"])

        async def send(reader, writer):
            if how == "head":
                writer.write(req[: rng.randint(1, head_len - 1)])
            elif how == "body":
                writer.write(req[: rng.randint(head_len, len(req) - 1)])
            else:
                writer.write(req)
            await writer.drain()
            if how == "stream":
                want, got = rng.randint(1, 8), 0
                while got < want:
                    chunk = await asyncio.wait_for(reader.read(4096), 120)
                    if not chunk:
                        break
                    got += chunk.count(b"data: ")
            elif how == "sent":
                await asyncio.sleep(rng.uniform(0, 0.3))

        await self._raw(f"hangup_{how}", send, expect_answer=False)

    async def oversize(self, rng):
        async def send(reader, writer):
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 2000000\r\n\r\n{\"prompt\": \"" + b"x" * 1000)
            await writer.drain()
        await self._raw("oversize", send, expect_answer=True)

    async def slow(self, rng):
        kind = rng.choice(["slow_head", "slow_body"])
        req = post_bytes({"model": MODEL, "prompt": "slow", "max_tokens": 2})
        head_len = req.index(b"\r\n\r\n") + 4

        async def send(reader, writer):
            start = head_len if kind == "slow_body" else 0
            writer.write(req[:start])
            for b in req[start:start + 12]:
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.5)
        await self._raw(kind, send, expect_answer=True)

    async def one(self, rng: random.Random, weights: dict) -> None:
        kind = rng.choices(list(weights), list(weights.values()))[0]
        await getattr(self, kind)(rng)


STORM_WEIGHTS = {"hangup": 45, "stream": 15, "complete": 10, "canary": 5, "poison": 5, "bad": 6, "surrogate": 2,
                 "oversize": 4, "slow": 8}
SOAK_WEIGHTS = {"stream": 40, "complete": 20, "canary": 5, "hangup": 15, "poison": 5, "bad": 6, "surrogate": 2,
                "oversize": 3, "slow": 4}


# ---------------------------------------------------------------- server

def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            out[s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))] = s.value
    return out


def wait_until_idle(url: str, timeout: float = 60.0) -> tuple[float, dict]:
    t0 = time.monotonic()
    while True:
        m = scrape(url)
        held = {k: m.get(k, 0.0) for k in HELD}
        if all(v == 0 for v in held.values()) or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, held
        time.sleep(0.1)


def server_counts(m: dict) -> dict:
    finished = {k.split("=", 1)[1].rstrip("}"): v for k, v in m.items() if k.startswith("baton_requests_finished_total")}
    rejected = {k.split("=", 1)[1].rstrip("}"): v for k, v in m.items() if k.startswith("baton_requests_rejected_total")}
    admitted = m.get("baton_requests_admitted_total", 0.0)
    return {"admitted": admitted, "ended": sum(finished.values()), "finished_by_reason": finished,
            "rejected_by_reason": rejected, "admitted_minus_ended": admitted - sum(finished.values())}


def summarize(records: list[dict], ids: Counter) -> dict:
    outcomes = Counter(r["outcome"] for r in records)
    statuses = Counter(r["status"] // 100 for r in records if r["status"])
    dup_ids = sum(1 for v in ids.values() if v > 1)
    problems = [r for r in records if r["outcome"] in ("lost", "duplicated", "unexpected", "wrong")]
    return {"sent": len(records), "2xx": statuses.get(2, 0), "4xx": statuses.get(4, 0), "5xx": statuses.get(5, 0),
            "hung_up": outcomes["hung_up"], "lost": outcomes["lost"], "duplicated": outcomes["duplicated"] + dup_ids,
            "unexpected": outcomes["unexpected"], "wrong": outcomes["wrong"],
            "by_kind": {k: dict(Counter(f"{r['outcome']}:{r['status']}" for r in records if r["kind"] == k))
                        for k in sorted({r["kind"] for r in records})},
            "problems": problems[:20]}


async def run_traffic(mode: str, run: Run, args, rss_samples: list) -> None:
    rng = random.Random(args.seed)
    if mode == "storm":
        async def client(seed: float, delay: float):
            await asyncio.sleep(delay)
            await run.one(random.Random(seed), STORM_WEIGHTS)

        await asyncio.gather(*(client(rng.random(), rng.uniform(0, args.over)) for _ in range(args.clients)))
    elif mode == "overload":
        for wave in range(2):  # the second wave shows the server recovered from the first
            n = 4 * (16 + 32)
            await asyncio.gather(*(run.stream(random.Random(rng.random())) for _ in range(n)))
            await asyncio.to_thread(wait_until_idle, run.url)
            await run.canary(rng)
    else:
        deadline = time.monotonic() + 60 * args.minutes
        tasks = set()
        while time.monotonic() < deadline:
            t = asyncio.ensure_future(run.one(random.Random(rng.random()), SOAK_WEIGHTS))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)


REPORT_KEYS = ["sent", "2xx", "4xx", "5xx", "hung_up", "lost", "duplicated", "unexpected", "wrong"]


def write_report(out: Path) -> str:
    """report.md: one row per mode whose JSON is in `out`."""
    rows, machine = [], None
    for mode in ("storm", "overload", "soak"):
        path = out / f"{mode}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        machine = r["machine"]
        srv, rss = r["server"], r["rss"]
        slope = rss["slope_after_first_minute_mib_per_min"]
        rows.append([mode, r["date"], f"{r['traffic_seconds']:.0f}"] + [str(r[k]) for k in REPORT_KEYS] + [
            f"{srv['admitted']:.0f} / {srv['ended']:.0f}", f"{r['seconds_to_hold_nothing']:.2f}",
            "same" if r["canary_after_matches"] else "DIFFERENT",
            f"{rss['start_mib']:.0f} -> {rss['end_mib']:.0f} (max {rss['max_mib']:.0f})",
            "-" if slope is None else f"{slope:.2f}"])
    head = (["mode", "date", "traffic s"] + REPORT_KEYS +
            ["admitted / ended", "s to hold nothing", "canary after", "RSS MiB", "RSS slope MiB/min"])
    lines = ["# baton serve under hostile traffic (benchmarks/hostile.py)", ""]
    if machine:
        lines += [f"Machine: {machine['cpu_model']}, {machine['logical_cores']} cores, {machine['memory_gib']} GiB; "
                  f"server flags `{' '.join(SERVER_FLAGS)}`; client and server share the cores.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Outcomes are defined in the module docstring of benchmarks/hostile.py; per-kind counts, "
              "the server's finish and rejection reasons and every problem case are in the JSON files."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["storm", "overload", "soak", "report"],
                    help="report: only rebuild report.md from the JSON files in --out")
    ap.add_argument("--clients", type=int, default=300, help="storm: clients, each starting at a uniform random "
                                                             "moment of the first --over seconds")
    ap.add_argument("--over", type=float, default=10.0, help="storm: seconds over which the clients start")
    ap.add_argument("--minutes", type=float, default=10.0, help="soak: how long")
    ap.add_argument("--rate", type=float, default=4.0, help="soak: clients per second (Poisson)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/hostile")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "report":
        print(write_report(out))
        return 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "baton.cli", "serve", "--port", str(port), *SERVER_FLAGS],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rss, stop = [], threading.Event()
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
        canary_text = httpx.post(url + "/v1/completions", json={"model": MODEL, **CANARY},
                                 timeout=120).json()["choices"][0]["text"]
        proc = psutil.Process(server.pid)
        t0 = time.monotonic()

        def sample():
            while not stop.is_set():
                rss.append((time.monotonic() - t0, proc.memory_info().rss))
                stop.wait(5)

        threading.Thread(target=sample, daemon=True).start()
        run = Run(url, port, canary_text, waiting_allows_429=True)
        started = time.monotonic()
        asyncio.run(run_traffic(args.mode, run, args, rss))
        traffic_s = time.monotonic() - started
        drain_s, held = wait_until_idle(url)
        after = httpx.post(url + "/v1/completions", json={"model": MODEL, **CANARY}, timeout=120).json()
        counts = server_counts(scrape(url))
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    result = {"mode": args.mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "logical_cores": psutil.cpu_count(),
                          "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
              "server_flags": SERVER_FLAGS, "traffic_seconds": round(traffic_s, 1),
              **summarize(run.records, run.ids),
              "canary_after_matches": after["choices"][0]["text"] == canary_text,
              "seconds_to_hold_nothing": round(drain_s, 2), "held_after": held, "server": counts}
    warm = [(t, r) for t, r in rss if t >= 60] or rss
    result["rss"] = {"start_mib": rss[0][1] / 2**20, "end_mib": rss[-1][1] / 2**20,
                     "max_mib": max(r for _, r in rss) / 2**20,
                     # a slope means something over minutes only
                     "slope_after_first_minute_mib_per_min": slope_per_minute(warm) if args.mode == "soak" else None,
                     "samples": rss}
    (out / f"{args.mode}.json").write_text(json.dumps(result, indent=1))
    if args.mode == "soak" and rss:
        _plot_rss(rss, out / "rss.png", result["sent"])
    write_report(out)
    print(f"{args.mode}: " + "  ".join(f"{k} {result[k]}" for k in REPORT_KEYS))
    print(f"server: admitted {counts['admitted']:.0f}, ended {counts['ended']:.0f}, "
          f"finished {counts['finished_by_reason']}, rejected {counts['rejected_by_reason']}")
    slope = result["rss"]["slope_after_first_minute_mib_per_min"]
    print(f"held nothing {drain_s:.2f} s after the traffic: {held}; canary after: "
          f"{'same' if result['canary_after_matches'] else 'DIFFERENT'}; RSS {result['rss']['start_mib']:.0f} -> "
          f"{result['rss']['end_mib']:.0f} MiB (max {result['rss']['max_mib']:.0f})"
          + (f", slope after the first minute {slope:.2f} MiB/min" if slope is not None else ""))
    for p in result["problems"]:
        print("  problem:", p)
    return 0


def _plot_rss(rss, path: Path, sent: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([t / 60 for t, _ in rss], [r / 2**20 for _, r in rss])
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"baton serve under hostile traffic: {sent} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
