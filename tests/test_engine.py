"""Bad input gets a clear error, and the engine keeps serving the other queries."""
from __future__ import annotations

import pytest

from baton import LLM, SamplingParams
from baton.models.loader import ModelLoadError, load_model
from testutil import make_engine


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(logprobs=99), "logprobs"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_rejected_while_others_keep_running(tiny_llama):
    engine = make_engine(tiny_llama, policy="baton-pd", max_num_seqs=4)
    good = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine.add_request("ok-1", [5, 6, 7], good)
    engine.step()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("bad-1", [], good)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("bad-2", list(range(1, 100)) * 5, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad-3", [1, 2, 10_000], good)
    with pytest.raises(KeyError, match="no running request"):
        engine.abort("never-added")
    engine.add_request("ok-2", [9, 9, 9, 9], good)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok-2", [1], good)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert set(finished) == {"ok-1", "ok-2"}
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in finished.values())


@pytest.mark.parametrize("policy", ["static", "orca", "baton", "baton-pd"])
def test_abort_frees_row_within_one_iteration(tiny_llama, policy):
    """Invariant 4: an aborted query frees its row and does not disturb the others."""
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = make_engine(tiny_llama, policy=policy)
    alone.add_request("b", [3, 1, 4, 1, 5], params)
    ref = None
    while alone.has_unfinished_requests():
        ref = [o for o in alone.step() if o.finished] or ref
    engine = make_engine(tiny_llama, policy=policy, max_num_seqs=4)
    engine.add_request("a", [2, 7, 1, 8], params)
    engine.add_request("b", [3, 1, 4, 1, 5], params)
    for _ in range(4):
        engine.step()
    running = engine.policy.num_running
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.policy.num_running == running - 1  # static too: an aborted seat is not held
    assert engine.requests.get("a") is None
    result = None
    while engine.has_unfinished_requests():
        result = [o for o in engine.step() if o.finished] or result
    assert result[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert engine.budget.query_bytes == 0


def test_unknown_model_path_and_corrupt_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="corrupt GGUF"):
        load_model(str(bad))
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(str(notgguf))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="no native implementation of architecture 'gpt2'.*native: .*llama"):
        load_model(str(tmp_path / "d"), model_impl="native")
    with pytest.raises(ModelLoadError, match="gpt2"):  # auto: the transformers backend, which finds no weights
        load_model(str(tmp_path / "d"))


def test_truncated_gguf_is_a_clear_error(tmp_path, default_model_path):
    data = open(default_model_path, "rb").read(5_000_000)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data)
    with pytest.raises(ModelLoadError):
        load_model(str(cut))


def test_llm_generate_keeps_input_order_and_rejects_bad_batch(tiny_llama):
    llm = LLM.from_engine(make_engine(tiny_llama, policy="baton-pd", max_num_seqs=2))
    prompts = [[1, 2, 3], list(range(1, 60)), [7], [8, 9]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 2, 5, 1)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [9, 2, 5, 1]
    assert [o.prompt_token_ids for o in outs] == prompts
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        llm.generate([[1, 2], []], SamplingParams(max_tokens=3))
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate([[4, 4]], SamplingParams(max_tokens=2, temperature=0))) == 1
