"""Automatic prefix caching: the same greedy output (float32) with the cache on
and off, hits on shared prefixes (also ending mid-block), multi-turn chats,
eviction, preemption, n > 1, and the KV budget held at every step."""
from __future__ import annotations

import random

import pytest

from baton import SamplingParams
from testutil import make_engine

SYSTEM = [(11 * i) % 200 + 3 for i in range(37)]  # 37 tokens: two full blocks of 16 and 5 more


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def drive(engine, reqs, check_budget=True):
    """reqs: (id, prompt, params, arrival step); returns {id: RequestOutput}."""
    got, pending, step = {}, list(reqs), 0
    while pending or engine.has_unfinished_requests():
        for r in [r for r in pending if r[3] <= step]:
            engine.add_request(r[0], r[1], r[2])
            pending.remove(r)
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                got[out.request_id] = out
        if check_budget:
            b = engine.budget
            assert b.used <= b.limit and b.resident <= b.used and b.cache_bytes >= 0
        step += 1
        assert step < 3000
    return got


def shared_workload(seed=0):
    rng = random.Random(seed)
    reqs = []
    for i in range(10):
        prefix = SYSTEM if i % 3 else SYSTEM[:rng.randint(17, 36)]  # some share a prefix ending mid-block
        question = [rng.randrange(1, 250) for _ in range(rng.randint(1, 12))]
        reqs.append((f"q{i}", prefix + question, greedy(rng.randint(2, 10), priority=0 if i == 7 else 5), 2 * i))
    return reqs


@pytest.mark.parametrize("policy", ["baton-pd", "orca"])
def test_same_output_with_and_without_the_cache(tiny_llama, policy):
    reqs = shared_workload()
    off = drive(make_engine(tiny_llama, policy=policy, max_num_seqs=3, enable_prefix_caching=False), reqs)
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=3, max_prefill_tokens=20, prefix_block_size=16)
    on = drive(engine, reqs)
    for rid, _, _, _ in reqs:
        assert on[rid].outputs[0].token_ids == off[rid].outputs[0].token_ids, rid
    st = engine.stats()
    assert st["prefix_cache_query_hits"] >= 5 and st["prefix_cache_token_hits"] >= 5 * 16
    assert any(on[rid].num_cached_tokens >= 32 for rid, *_ in reqs)
    assert all(o.num_cached_tokens % 16 == 0 for o in on.values())
    assert engine.budget.query_bytes == 0 and engine.budget.cache_bytes == engine.stats()["prefix_cache_bytes"] > 0
    if policy == "baton-pd":
        assert engine.policy.stats.preemptions >= 0


def test_multi_turn_chat_reuses_the_history(tiny_llama):
    def conversation(engine):
        history, outs = list(SYSTEM), []
        for turn in range(4):
            history += [100 + turn, 7, 8 + turn]
            got = drive(engine, [(f"t{turn}", history, greedy(6), 0)])[f"t{turn}"]
            outs.append((got.outputs[0].token_ids, got.num_cached_tokens))
            history += got.outputs[0].token_ids
        return outs

    off = conversation(make_engine(tiny_llama, policy="baton-pd", max_num_seqs=2, enable_prefix_caching=False))
    on = conversation(make_engine(tiny_llama, policy="baton-pd", max_num_seqs=2, prefix_block_size=8))
    assert [t for t, _ in on] == [t for t, _ in off]
    # each turn after the first reuses the history the previous one left: prompt and generated tokens
    cached = [c for _, c in on]
    assert cached[0] == 0 and all(b > a for a, b in zip(cached, cached[1:])) and cached[-1] > len(SYSTEM)


def test_eviction_while_others_copy_and_a_tight_budget(tiny_llama):
    rng = random.Random(3)
    prefixes = [[rng.randrange(1, 250) for _ in range(40)] for _ in range(6)]
    reqs = [(f"r{i}", prefixes[i % 6] + [i % 250 + 1], greedy(5), i) for i in range(24)]
    off = drive(make_engine(tiny_llama, policy="baton-pd", max_num_seqs=4, enable_prefix_caching=False), reqs)
    # room for only a few blocks: chains are evicted while queries sharing them are still pooled or running
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=4, prefix_block_size=8,
                         prefix_cache_bytes=12 * 8 * make_engine(tiny_llama).kv_spec.slot_bytes)
    on = drive(engine, reqs)
    assert {k: v.outputs[0].token_ids for k, v in on.items()} == {k: v.outputs[0].token_ids for k, v in off.items()}
    st = engine.stats()
    assert st["prefix_cache_evictions"] > 0 and st["prefix_cache_query_hits"] > 0
    assert st["prefix_cache_bytes"] <= st["prefix_cache_capacity_bytes"]


def test_cache_gives_way_to_queries(tiny_llama):
    slot = make_engine(tiny_llama).kv_spec.slot_bytes
    # a budget a few queries fill: the cache (allowed all of it) must be evicted for them to run
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=4, kv_cache_bytes=900 * slot,
                         prefix_cache_bytes=900 * slot, prefix_block_size=8)
    rng = random.Random(5)
    reqs = [(f"r{i}", [rng.randrange(1, 250) for _ in range(60)], greedy(20), 0) for i in range(8)]
    drive(engine, reqs)  # budget asserted every step
    first = engine.stats()["prefix_cache_bytes"]
    assert first > 0
    more = [(f"s{i}", [rng.randrange(1, 250) for _ in range(60)], greedy(20), 0) for i in range(8)]
    got = drive(engine, more)
    assert len(got) == 8 and engine.stats()["prefix_cache_evictions"] > 0
    assert engine.budget.query_bytes == 0


def test_n_choices_and_preemption_with_the_cache(tiny_llama):
    reqs = [("a", SYSTEM + [1, 2], greedy(12, n=3), 0), ("b", SYSTEM + [3], greedy(12, priority=5), 0),
            ("c", SYSTEM + [4, 5, 6], greedy(4, priority=0), 3)]
    off = drive(make_engine(tiny_llama, policy="baton-pd", max_num_seqs=3, enable_prefix_caching=False), reqs)
    on = drive(make_engine(tiny_llama, policy="baton-pd", max_num_seqs=3, prefix_block_size=16), reqs)
    for rid in "abc":
        assert [o.token_ids for o in on[rid].outputs] == [o.token_ids for o in off[rid].outputs], rid
    assert on["c"].num_cached_tokens == 32


def test_flags_and_config(tiny_llama):
    from baton.cli_args import add_engine_args, engine_kwargs
    import argparse

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args([]))["enable_prefix_caching"] is True
    assert engine_kwargs(p.parse_args(["--no-enable-prefix-caching"]))["enable_prefix_caching"] is False
    assert engine_kwargs(p.parse_args(["--prefix-cache-bytes", "1000"]))["prefix_cache_bytes"] == 1000
    assert make_engine(tiny_llama, policy="static").policy.prefix_cache is None
    with pytest.raises(ValueError, match="prefix_block_size"):
        make_engine(tiny_llama, prefix_block_size=0)
