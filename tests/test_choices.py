"""n > 1 (one prefill shared by n choices), prompt logprobs, and the output
options (min_tokens, include_stop_str_in_output) at the engine level."""
from __future__ import annotations

import pytest
import torch

from baton import SamplingParams
from baton.scheduler import POLICIES
from testutil import baton_logits, load_cached, make_engine

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def finish(engine) -> dict:
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in got, "a request finished twice"
            if out.finished:
                got[out.request_id] = out
    return got


@pytest.mark.parametrize("policy", list(POLICIES))
def test_n_greedy_choices_equal_alone(tiny_llama, policy):
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=4)
    engine.add_request("solo", PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    solo = finish(engine)["solo"].outputs[0].token_ids
    engine.add_request("other", [7, 7, 7], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.add_request("n3", PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, n=3))
    out = finish(engine)["n3"]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert [o.token_ids for o in out.outputs] == [solo] * 3
    assert engine.budget.query_bytes == 0 and not engine.requests


def test_baton_pd_prefills_the_prompt_once(tiny_llama):
    n, m = 3, 6
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=4)
    engine.add_request("n", PROMPT, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, n=n))
    finish(engine)
    # the prompt once, then one token per choice and decode step (the first tokens come from the prefill)
    assert engine.policy.stats.useful_tokens == len(PROMPT) + n * (m - 1)
    orca = make_engine(tiny_llama, policy="orca", max_num_seqs=4)
    orca.add_request("n", PROMPT, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, n=n))
    finish(orca)
    assert orca.policy.stats.useful_tokens == n * len(PROMPT) + n * (m - 1)


def test_seeded_choices_reproducible_and_distinct(tiny_llama):
    def run(n, seed):
        engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=4)
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=seed, n=n,
                                                       ignore_eos=True))
        return [o.token_ids for o in finish(engine)["r"].outputs]

    a, b = run(3, 5), run(3, 5)
    assert a == b
    assert len({tuple(x) for x in a}) == 3
    assert run(1, 6) == [a[1]]  # choice i draws from seed + i


def test_n_with_preemption_and_abort_leave_nothing(tiny_llama):
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=3)
    engine.add_request("low", PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, n=3,
                                                     priority=5))
    for _ in range(4):
        engine.step()
    engine.add_request("high", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, priority=0))
    engine.add_request("gone", [4, 5, 6], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, n=2))
    engine.step()
    out = engine.abort("gone")
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort", "abort"]
    got = finish(engine)
    assert engine.policy.stats.preemptions >= 1
    solo = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=1)
    solo.add_request("s", PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    want = finish(solo)["s"].outputs[0].token_ids
    assert [o.token_ids for o in got["low"].outputs] == [want] * 3
    assert engine.budget.query_bytes == 0 and not engine.requests


@pytest.mark.parametrize("policy", ["baton-pd", "baton", "orca"])
def test_prompt_logprobs_match_reference(tiny_llama, policy):
    model, _ = load_cached(tiny_llama)
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=2, max_prefill_tokens=3)  # chunked prefill
    prompt = PROMPT + [11, 12, 13]
    engine.add_request("p", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, ignore_eos=True))
    got = finish(engine)["p"].prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    ref = torch.stack([baton_logits(model, prompt[:i], 0, [])[0] for i in range(1, len(prompt))]).log_softmax(-1)
    for i, (tok, lp, top) in enumerate(got[1:]):
        assert tok == prompt[i + 1]
        assert lp == pytest.approx(ref[i, tok].item(), abs=1e-4)
        assert [t for t, _ in top] == ref[i].topk(2).indices.tolist()


def test_min_tokens_and_include_stop_str(tiny_llama):
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=2)
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=12, temperature=0))
    first = finish(engine)["free"].outputs[0].token_ids
    # stop on the first generated token id: min_tokens holds it off
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[first[0]]))
    engine.add_request("b", PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[first[0]],
                                                   min_tokens=5))
    got = finish(engine)
    assert len(got["a"].outputs[0].token_ids) == 1 and got["a"].outputs[0].finish_reason == "stop"
    assert len(got["b"].outputs[0].token_ids) >= 5


def test_new_param_errors_name_the_field(tiny_llama):
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=2)
    with pytest.raises(ValueError, match="logit_bias") as e:
        engine.add_request("x", PROMPT, SamplingParams(logit_bias={10_000: 1.0}))
    assert e.value.param == "logit_bias"
    assert not engine.requests
