"""Constrained queries in the engine: they join, leave and are preempted like any
other, and (float32, greedy) their output does not depend on the batch."""
from __future__ import annotations

import json
import re

import pytest

from baton import SamplingParams
from baton.scheduler import POLICIES
from baton.structured import StructuredOutput
from testutil import make_engine, make_tiny_model, run_arrivals

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
          "required": ["a", "b"], "additionalProperties": False}
SPECS = [StructuredOutput("json", SCHEMA), StructuredOutput("regex", "[0-9]{2,4}-[a-c]{1,3}"),
         StructuredOutput("choice", ["alpha", "beta", "gamma"]), None, StructuredOutput("json", None),
         StructuredOutput("grammar", 'root ::= "(" [a-z]+ ")"')]


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, default_model_path):
    """A tiny random Llama with the default model's tokenizer (49152 tokens)."""
    from baton.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("tiny-tok")
    make_tiny_model(d, "llama", vocab_size=49152, eos_token_id=2, max_position_embeddings=1024)
    load_tokenizer(default_model_path).hf.save_pretrained(d)
    return str(d)


def workload():
    reqs = []
    for i in range(12):
        spec = SPECS[i % len(SPECS)]
        prompt = [(7 * i + 3 * j) % 4000 + 10 for j in range(3 + (5 * i) % 17)]
        # the first six (low priority) fill the rows; later high-priority ones preempt them
        high = i >= 6 and i % 2 == 0
        params = SamplingParams(max_tokens=14 + (7 * i) % 19, temperature=0.0, structured=spec,
                                priority=0 if high else 5)
        reqs.append((prompt, params, 0 if i < 6 else 2 + i))
    return reqs


def run(engine, reqs):
    return run_arrivals(engine, reqs, outputs=True)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_constrained_output_does_not_depend_on_the_batch(tiny_with_tokenizer, policy):
    reqs = workload()
    alone = {}
    for i, (prompt, params, _) in enumerate(reqs):
        solo = make_engine(tiny_with_tokenizer, policy="baton-pd", max_num_seqs=1)
        alone[i] = run(solo, [(prompt, params, 0)])[0]
    engine = make_engine(tiny_with_tokenizer, policy=policy, max_num_seqs=3, max_prefill_tokens=8)
    got = run(engine, reqs)
    for i in range(len(reqs)):
        assert got[i].token_ids == alone[i].token_ids, (i, reqs[i][1].structured)
    if policy == "baton-pd":
        assert engine.policy.stats.preemptions > 0  # constrained rows were preempted and resumed
    assert engine.budget.query_bytes == 0 and not engine.requests
    # and the constraints held
    for i, (_, params, _) in enumerate(reqs):
        spec, out = params.structured, got[i]
        if spec is None or out.finish_reason != "stop":
            continue
        if spec.kind == "json":
            v = json.loads(out.text)
            assert isinstance(v, dict) and (spec.value is None or set(v) == {"a", "b"})
        elif spec.kind == "regex":
            assert re.fullmatch(spec.value, out.text)
        elif spec.kind == "choice":
            assert out.text in spec.value
        else:
            assert re.fullmatch(r"\([a-z]+\)", out.text)


def test_n_constrained_choices_and_bad_spec(tiny_with_tokenizer):
    engine = make_engine(tiny_with_tokenizer, policy="baton-pd", max_num_seqs=4)
    engine.add_request("c", [5, 6, 7], SamplingParams(max_tokens=10, temperature=1.0, seed=1, n=3,
                                                      structured=StructuredOutput("choice", ["yes", "no"])))
    results = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                results[o.request_id] = o
    assert [c.text in ("yes", "no") and c.finish_reason == "stop" for c in results["c"].outputs] == [True] * 3
    with pytest.raises(ValueError) as e:
        engine.add_request("bad", [1], SamplingParams(structured=StructuredOutput("regex", "((", "guided_regex")))
    assert e.value.param == "guided_regex" and "guided_regex" in str(e.value)
    assert not engine.requests
