"""Runs an LLMEngine in its own thread and feeds per-request asyncio queues.

    handlers (event loop) --submit--> executor thread: tokenize + engine.add_request
                          --abort---> pending-abort list, applied at the next iteration boundary
    engine thread: loop { apply aborts; step(); hand outputs to the event loop }
                   (a ComputeThread: the one that loaded the model, where the
                   caller passes it, so the forward runs at its offline speed)
                   sleeps on a threading.Event when the engine holds no work (no busy-wait),
                   and logs a stats line every `stats_interval` seconds while busy
    outputs reach the event loop with one loop.call_soon_threadsafe per iteration,
    so the engine thread never waits on the event loop and handlers never wait on
    the engine lock (engine calls that take it run in the executor or engine thread).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from ..platform.compute_thread import ComputeThread
from ..sampling import SamplingParams

log = logging.getLogger("baton.server")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class ChoiceEvent:
    """What one of a request's choices produced in one step."""
    index: int
    text: str                 # all text so far (final: with any stop string cut)
    new_text: str
    new_token_ids: list
    new_logprobs: Optional[list]  # entries for new_token_ids, or None
    num_tokens: int           # output tokens so far
    finished: bool
    finish_reason: Optional[str]


@dataclass
class StreamEvent:
    """One engine output for one request, made on the engine thread (so the
    logprobs slice and text are consistent with the tokens at that moment):
    the choices that changed (all of them in the final event)."""
    request_id: str
    choices: list             # ChoiceEvent, by index
    prompt_tokens: int
    finished: bool            # every choice finished
    error: Optional[str] = None  # the request failed (its own fault or the engine's)
    prompt_logprobs: Optional[list] = None  # on the final event, when asked for
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class RequestStream:
    """What a handler consumes: the request's events, in order, ending with one
    whose `finished` (or `error`) is set."""

    def __init__(self, request_id: str, arrival_time: float):
        self.request_id = request_id
        self.arrival_time = arrival_time
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.added = False             # engine.add_request returned
        self.abort_requested = False
        self.done = False              # final event handed over (engine side)
        self.first_token_time: Optional[float] = None
        self.prompt_tokens = 0
        self.first_prompt_token: Optional[int] = None
        self.finished_choices: set[int] = set()  # engine side: choices whose end was handed over

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        while True:
            ev = await self.queue.get()
            yield ev
            if ev.finished or ev.error:
                return


class AsyncEngine:
    def __init__(self, engine, metrics=None, executor_workers: int = 4, stats_interval: float = 10.0,
                 compute_thread: Optional[ComputeThread] = None):
        self.engine = engine
        self._compute = compute_thread  # None: the engine loop gets a thread of its own
        self.metrics = metrics
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._streams: dict[str, RequestStream] = {}
        self._pending_aborts: list[str] = []
        self._lock = threading.Lock()   # guards _streams and _pending_aborts
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = None  # the engine loop's Future on the compute thread
        self._executor = ThreadPoolExecutor(max_workers=executor_workers, thread_name_prefix="baton-add")
        self.draining = False
        self.stats: dict = engine.stats()  # snapshot refreshed by the engine thread after every iteration
        self.error: Optional[BaseException] = None
        self.stats_interval = stats_interval
        self._last_stats_log = (time.monotonic(), 0)  # (when, generated tokens then)
        self.generated_tokens = 0

    # ------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._running is not None:
            return
        if getattr(self.engine, "_baton_async_engine", None) not in (None, self):
            raise RuntimeError("this LLMEngine is already driven by another server; one server per engine")
        self.engine._baton_async_engine = self
        self.loop = loop
        self._own_compute = self._compute is None
        if self._own_compute:
            self._compute = ComputeThread("baton-engine")
        self._running = self._compute.submit(self._run)

    @property
    def started(self) -> bool:
        return self._running is not None

    @property
    def alive(self) -> bool:
        return self._running is not None and not self._running.done()

    def drain(self) -> None:
        """Refuse new requests and abort every in-flight one (they finish with
        finish_reason "abort"). Safe to call from any thread, several times."""
        self.draining = True
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self.abort(rid)

    def stop(self, timeout: float = 30.0) -> None:
        """Drain, then stop the engine thread (blocking; call from a worker thread)."""
        self.drain()
        self._executor.shutdown(wait=True)
        self.drain()  # requests whose add finished while we waited
        self._stop.set()
        self._wake.set()
        if self._running is not None:
            try:
                self._running.result(timeout)
            except TimeoutError:
                log.error("engine thread did not stop within %.0f s", timeout)
            if self._own_compute:
                self._compute.close()
        if getattr(self.engine, "_baton_async_engine", None) is self:
            self.engine._baton_async_engine = None

    # ------------------------------------------------------------ handler side (event loop)
    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def num_held(self) -> int:
        """Requests taking engine capacity: those the server admitted, or those
        the engine holds if it holds more (backpressure counts the real load)."""
        return max(self.num_in_flight, len(self.engine.requests))

    def queue_depth(self) -> int:
        """Admitted requests beyond what the running batch can hold."""
        return max(0, self.num_held() - self.engine.config.max_num_seqs)

    async def submit(self, request_id: str, prepare: Callable[[], tuple[list[int], SamplingParams]],
                     max_waiting: Optional[int] = None) -> RequestStream:
        """Admit a request. `prepare` runs on an executor thread and returns the
        prompt token ids and SamplingParams (tokenization, chat template).
        Raises ShuttingDown, QueueFull, or the ValueError of a bad request."""
        if self.draining or not self.alive:
            raise ShuttingDown()
        stream = RequestStream(request_id, time.monotonic())
        with self._lock:
            if max_waiting is not None and self.num_held() + 1 > self.engine.config.max_num_seqs + max_waiting:
                raise QueueFull()
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream

        def add():
            ids, params = prepare()
            stream.prompt_tokens = len(ids)
            stream.first_prompt_token = ids[0] if ids else None
            self.engine.add_request(request_id, ids, params, arrival_time=stream.arrival_time)
            return len(ids)

        fut = self.loop.run_in_executor(self._executor, add)
        try:
            n_prompt = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The handler went away while the request was being added: abort it once added.
            stream.abort_requested = True
            fut.add_done_callback(lambda f: self._after_add(stream, f))
            raise
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        self._after_add(stream, fut)
        if self.metrics:
            self.metrics.prompt_tokens.inc(n_prompt)
        return stream

    def _after_add(self, stream: RequestStream, fut) -> None:
        if fut.cancelled() or fut.exception() is not None:
            with self._lock:
                self._streams.pop(stream.request_id, None)
            return
        stream.added = True
        if self.metrics:
            self.metrics.admitted.inc()
        if stream.abort_requested or self.draining:
            self.abort(stream.request_id)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort the request at the next iteration
        boundary. Non-blocking; unknown or finished ids are ignored."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or stream.done:
                return
            stream.abort_requested = True
            if stream.added:
                self._pending_aborts.append(request_id)
        self._wake.set()

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            self._apply_aborts()
            if self._stop.is_set():
                break
            if not engine.has_unfinished_requests():
                self._snapshot()
                self._wake.wait()
                self._wake.clear()
                self._last_stats_log = (time.monotonic(), self.generated_tokens)  # idle time is not busy time
                continue
            try:
                outputs = engine.step()  # fails requests itself when a step fails
            except Exception as e:  # a fault outside the step: fail what was in flight, start clean
                log.exception("engine loop failed")
                self.error = e
                outputs = engine.fail_all(f"engine error: {type(e).__name__}: {e}")
            self._dispatch(outputs)
            self._snapshot()
            self._log_stats()
        self._snapshot()

    def _log_stats(self) -> None:
        """A line every stats_interval seconds while the engine is busy."""
        now = time.monotonic()
        then, tokens_then = self._last_stats_log
        if not self.stats_interval or now - then < self.stats_interval:
            return
        self._last_stats_log = (now, self.generated_tokens)
        st = self.stats
        budget = st.get("kv_bytes_budget") or 1
        log.info("engine: %d running, %d waiting, %d prefilled, %d parked; KV %.1f of %.1f MiB reserved (%.0f%%); "
                 "%.1f generated tok/s; %d in flight", st.get("running", 0), st.get("waiting", 0),
                 st.get("prefilled", 0), st.get("parked", 0), st.get("kv_bytes_used", 0) / 2**20, budget / 2**20,
                 100 * st.get("kv_bytes_used", 0) / budget, (self.generated_tokens - tokens_then) / (now - then),
                 self.num_in_flight)

    def _snapshot(self) -> None:
        try:
            self.stats = self.engine.stats()
        except Exception:  # never let metrics kill the loop
            log.exception("engine.stats() failed")

    def _apply_aborts(self) -> None:
        with self._lock:
            ids, self._pending_aborts = self._pending_aborts, []
        outs = []
        for rid in ids:
            try:
                outs.append(self.engine.abort(rid))
            except KeyError:
                pass  # finished meanwhile: its final output was already delivered
        if outs:
            self._dispatch(outs)

    def _dispatch(self, outputs) -> None:
        now = time.monotonic()
        batch = []
        m = self.metrics
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # not ours
                if out.finished:
                    self._streams.pop(out.request_id, None)
                    stream.done = True
            events = []
            for o in out.outputs:
                ends = o.finished and o.index not in stream.finished_choices
                if not (o.new_token_ids or o.new_text or ends):
                    continue
                if ends:
                    stream.finished_choices.add(o.index)
                n = len(o.token_ids)
                new_ids = list(o.new_token_ids)
                new_lp = list(o.logprobs[n - len(new_ids):n]) if o.logprobs is not None and new_ids else None
                events.append(ChoiceEvent(o.index, o.text, o.new_text, new_ids, new_lp, n,
                                          o.finish_reason is not None, o.finish_reason))
            if not events and not out.error:
                continue
            ev = StreamEvent(out.request_id, events, len(out.prompt_token_ids), out.finished, error=out.error,
                             prompt_logprobs=out.prompt_logprobs if out.finished else None,
                             cached_tokens=out.num_cached_tokens)
            batch.append((stream, ev))
            new_tokens = sum(len(c.new_token_ids) for c in events)
            self.generated_tokens += new_tokens
            first = bool(new_tokens) and stream.first_token_time is None
            if first:
                stream.first_token_time = now
            if m is None:
                continue
            if new_tokens:
                m.generation_tokens.inc(new_tokens)
                if first:
                    m.ttft.observe(now - stream.arrival_time)
            for c in events:
                if not c.finished:
                    continue
                m.finished.labels(finish_reason=c.finish_reason or "unknown").inc()
                if c.finish_reason == "abort":
                    m.aborts.inc()
                elif c.finish_reason != "error":
                    m.e2e.observe(now - stream.arrival_time)
                    if c.num_tokens > 1 and stream.first_token_time is not None:
                        m.tpot.observe((now - stream.first_token_time) / (c.num_tokens - 1))
        self._deliver_threadsafe(batch)

    def _deliver_threadsafe(self, batch) -> None:
        if not batch or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # event loop closed (process exiting)
            pass


def _deliver(batch) -> None:
    for stream, ev in batch:
        stream.queue.put_nowait(ev)
