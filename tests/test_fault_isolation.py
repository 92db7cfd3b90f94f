"""One request's fault is its own; an aborted request leaves nothing behind, at
every stage; an error the engine cannot attribute leaves a clean engine."""
from __future__ import annotations

import pytest

from baton import SamplingParams
from baton import sampling as sampling_module
from baton.sequence import Status
from testutil import make_engine

POLICIES = ["static", "orca", "baton", "baton-pd"]


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def solo(path, prompt, params, policy="baton-pd"):
    engine = make_engine(path, policy=policy, max_num_seqs=1)
    engine.add_request("solo", prompt, params)
    return drain(engine)["solo"].outputs[0].token_ids


def drain(engine, results=None, aborted=(), max_steps=3000):
    """Step until idle; every request ends once, and none that was aborted shows up again."""
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return results
        for out in engine.step():
            assert out.request_id not in aborted, f"aborted request {out.request_id} is still computed"
            assert out.request_id not in results, "a request finished twice"
            if out.finished:
                results[out.request_id] = out
        assert engine.budget.used <= engine.budget.limit
    raise AssertionError("engine did not finish")


def assert_empty(engine):
    st = engine.stats()
    held = {k: st[k] for k in ("running", "waiting", "prefilled", "parked", "kv_bytes_used", "kv_bytes_resident")}
    assert held == dict.fromkeys(held, 0), held
    assert not engine.requests and not engine.has_unfinished_requests()


def assert_gone(engine, seq):
    """An aborted query holds no queue place, row, pool entry or KV."""
    p = engine.policy
    assert seq.status is Status.FINISHED and seq.finish_reason == "abort"
    assert seq not in p.waiting and seq not in getattr(p, "pool", []) and seq not in getattr(p, "running", [])
    assert seq.row is None and seq.kv is None
    assert seq.request_id not in engine.requests


# ---------------------------------------------------------------- abort at every stage

@pytest.mark.parametrize("policy", POLICIES)
def test_abort_queued_and_running_leaves_nothing(tiny_llama, policy):
    keep = [5, 6, 7, 8]
    ref = solo(tiny_llama, keep, greedy(16), policy)
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=2, pool_size=1)
    engine.add_request("keep", keep, greedy(16))
    engine.add_request("run", [9, 9, 2], greedy(40))
    for i in range(6):
        engine.add_request(f"queued-{i}", [3, 1, 4, 1, 5, 9], greedy(40))
    engine.step()
    engine.step()
    seqs = {rid: engine.requests[rid].seqs[0] for rid in engine.requests}
    aborted = {f"queued-{i}" for i in range(6)} | {"run"}
    for rid in sorted(aborted):
        assert engine.abort(rid).outputs[0].finish_reason == "abort"
        assert_gone(engine, seqs[rid])
    results = drain(engine, aborted=aborted)
    assert set(results) == {"keep"}
    assert results["keep"].outputs[0].token_ids == ref
    assert_empty(engine)


def test_abort_in_the_pool_prefilling_and_parked_leaves_nothing(tiny_llama):
    """baton-pd's own stages: a ready pool entry, a prompt halfway through its
    chunked prefill, and a query preempted with its KV parked."""
    low = [2, 7, 1, 8, 2, 8]
    ref_low = solo(tiny_llama, low, greedy(30, priority=5))
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=1, pool_size=2, max_prefill_tokens=4)
    engine.add_request("victim", [4, 4, 4], greedy(60, priority=5))
    engine.add_request("low", low, greedy(30, priority=5))
    for _ in range(3):
        engine.step()
    victim, low_seq = engine.requests["victim"].seqs[0], engine.requests["low"].seqs[0]
    assert victim.status is Status.RUNNING and low_seq.status is Status.PREFILLED
    # A higher-priority query takes victim's row: victim is parked with its KV.
    engine.add_request("high", [1, 2, 3], greedy(4, priority=0))
    engine.add_request("long", list(range(1, 40)), greedy(5, priority=5))
    for _ in range(8):
        engine.step()
        if victim.status is Status.PARKED and engine.requests["long"].seqs[0].num_cached:
            break
    assert victim.status is Status.PARKED and isinstance(victim.kv, object) and victim.kv is not None
    long_seq = engine.requests["long"].seqs[0]
    assert long_seq.status is Status.PREFILLED and 0 < long_seq.num_cached < 39, "long is mid-prefill"
    for rid, seq in (("victim", victim), ("long", long_seq)):
        engine.abort(rid)
        assert_gone(engine, seq)
    results = drain(engine, aborted={"victim", "long"})
    assert set(results) == {"high", "low"}
    assert results["low"].outputs[0].token_ids == ref_low
    assert_empty(engine)


# ---------------------------------------------------------------- one request's fault

@pytest.mark.parametrize("poison", [dict(temperature=1e-40), dict(temperature=5e-324), dict(top_p=1e-300),
                                    dict(temperature=1e-40, top_p=1e-300, top_k=3)])
def test_underflowing_sampling_params_sample_greedily(tiny_llama, poison):
    """A temperature or top_p so small it underflows is the greedy limit, exactly:
    it neither fails nor changes anyone else's output."""
    others = {f"o{i}": [7 + i, 3, 9, i + 1] for i in range(4)}
    refs = {rid: solo(tiny_llama, p, greedy(12)) for rid, p in others.items()}
    poison_prompt = [11, 12, 13]
    ref_poison = solo(tiny_llama, poison_prompt, greedy(12))
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=8)
    for rid, p in others.items():
        engine.add_request(rid, p, greedy(12))
    engine.step()
    engine.add_request("poison", poison_prompt, SamplingParams(max_tokens=12, ignore_eos=True, seed=1,
                                                                **{"temperature": 1.0, **poison}))
    results = drain(engine)
    assert {rid: r.outputs[0].token_ids for rid, r in results.items() if rid != "poison"} == refs
    assert results["poison"].outputs[0].token_ids == ref_poison
    assert results["poison"].outputs[0].finish_reason == "length"
    assert_empty(engine)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_row_that_cannot_be_sampled_fails_alone(tiny_llama, monkeypatch, policy):
    real = sampling_module._sample_row

    def fragile(logits, p, generator):
        if p.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, p, generator)

    monkeypatch.setattr(sampling_module, "_sample_row", fragile)
    others = {f"o{i}": [7 + i, 3, 9] for i in range(3)}
    refs = {rid: solo(tiny_llama, p, greedy(10), policy) for rid, p in others.items()}
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=4)
    for rid, p in others.items():
        engine.add_request(rid, p, greedy(10))
    engine.add_request("bad", [1, 2], SamplingParams(max_tokens=10, temperature=0.8, seed=666, ignore_eos=True))
    results = drain(engine)
    bad = results.pop("bad")
    assert bad.outputs[0].finish_reason == "error" and "probability tensor" in bad.error
    assert bad.outputs[0].token_ids == []
    assert {rid: r.outputs[0].token_ids for rid, r in results.items()} == refs
    assert all(r.error is None and r.outputs[0].finish_reason == "length" for r in results.values())
    assert_empty(engine)


def test_a_request_whose_postprocessing_fails_fails_alone(tiny_llama, monkeypatch):
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=4)
    ref = solo(tiny_llama, [5, 5, 5], greedy(8))
    real = engine.outputs.append

    def append(seq, tok, now, **kw):
        if seq.request_id == "bad" and len(seq.output_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(seq, tok, now, **kw)

    monkeypatch.setattr(engine.outputs, "append", append)
    engine.add_request("good", [5, 5, 5], greedy(8))
    engine.add_request("bad", [6, 6], greedy(8))
    results = drain(engine)
    assert results["bad"].outputs[0].finish_reason == "error" and "UnicodeDecodeError" in results["bad"].error
    assert results["good"].outputs[0].token_ids == ref
    assert_empty(engine)


# ---------------------------------------------------------------- an engine-wide fault

class FailOnce:
    """The model, failing its n-th forward (an error no request can be blamed for)."""

    def __init__(self, model, n):
        self.model, self.n = model, n

    def __call__(self, *args, **kwargs):
        self.n -= 1
        if self.n == 0:
            raise RuntimeError("simulated device failure")
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("policy", POLICIES)
def test_forward_failure_fails_all_in_flight_and_engine_comes_back_clean(tiny_llama, policy):
    ref = solo(tiny_llama, [3, 3, 7], greedy(9), policy)
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=2, pool_size=1)
    engine.runner.model = FailOnce(engine.runner.model, n=4)
    for i in range(5):
        engine.add_request(f"r{i}", [i + 1, 2, 3], greedy(20))
    iterations = []
    results = {}
    for _ in range(5):
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        iterations.append(engine.policy.stats.iterations)
    assert set(results) == {f"r{i}" for i in range(5)}
    assert all(r.outputs[0].finish_reason == "error" and "simulated device failure" in r.error
               for r in results.values())
    assert_empty(engine)
    assert iterations == sorted(iterations), "lifetime counters must not go back"
    # the same engine then serves as a fresh one would
    engine.add_request("after", [3, 3, 7], greedy(9))
    assert drain(engine)["after"].outputs[0].token_ids == ref
    assert_empty(engine)
