"""The one thread that loads a model and steps its engine (platform/compute_thread.py)."""
import threading

import pytest

from baton.platform.compute_thread import ComputeThread


def test_jobs_run_in_order_on_one_thread_and_errors_reach_the_caller():
    ct = ComputeThread("test-compute")
    try:
        idents = [ct.call(threading.get_ident) for _ in range(3)]
        assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
        order = []
        futs = [ct.submit(lambda i=i: order.append(i) or i) for i in range(5)]
        assert [f.result(5) for f in futs] == list(range(5)) and order == list(range(5))
        with pytest.raises(ZeroDivisionError):
            ct.call(lambda: 1 / 0)
        assert ct.call(lambda: "still usable") == "still usable"
    finally:
        ct.close()


def test_server_steps_the_engine_on_the_thread_that_loaded_it():
    from baton.server.async_engine import AsyncEngine

    class FakeEngine:  # only what the engine loop touches
        config = type("C", (), {"max_num_seqs": 1})()
        requests: dict = {}

        def __init__(self):
            self.step_threads = set()

        def has_unfinished_requests(self):
            return False

        def stats(self):  # the engine loop's last call, on its thread
            self.step_threads.add(threading.get_ident())
            return {}

    ct = ComputeThread("test-compute")
    try:
        engine = FakeEngine()
        ae = AsyncEngine(engine, compute_thread=ct)
        engine.step_threads.clear()  # AsyncEngine's own snapshot, on this thread
        import asyncio

        loop = asyncio.new_event_loop()
        ae.start(loop)
        assert ae.started
        ae.stop(timeout=10)
        assert not ae.alive
        assert engine.step_threads == {ct.ident}
        loop.close()
    finally:
        ct.close()
