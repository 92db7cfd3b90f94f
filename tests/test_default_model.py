"""The default model (SmolLM2-135M-Instruct GGUF): real text, chat, CLI, sampling."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from baton import LLM, SamplingParams
from baton.tokenizer import IncrementalDetokenizer
from testutil import load_cached, make_engine


@pytest.fixture(scope="module")
def llm(default_model_path):
    return LLM.from_engine(make_engine(default_model_path, dtype="auto", max_num_seqs=8))


def test_generate_fluent_english(llm):
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=40, temperature=0))[0].outputs[0]
    words = out.text.split()
    assert len(words) >= 20
    common = {"the", "a", "and", "of", "was", "to", "in", "with"}
    assert sum(w.lower().strip(".,") in common for w in words) >= 4, out.text
    assert out.finish_reason == "length" and len(out.token_ids) == 40


def test_chat_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=30, temperature=0))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text


def test_same_seed_same_output_whatever_the_batch(default_model_path):
    # float32: in bf16, batch composition moves logits by rounding (a different
    # kernel path), which can change a sampled token; invariance is promised in fp32.
    llm = LLM.from_engine(make_engine(default_model_path, dtype="float32", max_num_seqs=8))
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    alone = llm.generate(["Tell me a story"], p)[0].outputs[0].token_ids
    batch = llm.generate(["Tell me a story", "Why is the sky blue?", "List three fruits"],
                         [p, SamplingParams(max_tokens=30, temperature=0.8, seed=1),
                          SamplingParams(max_tokens=5, temperature=0)])
    assert batch[0].outputs[0].token_ids == alone
    other = llm.generate(["Tell me a story"], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9,
                                                             seed=8))[0].outputs[0].token_ids
    assert other != alone


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate("Count: one, two, three,", SamplingParams(max_tokens=30, temperature=0))[0].outputs[0]
    # Stop at the first comma of the continuation: the stop string is not returned.
    cut = llm.generate("Count: one, two, three,", SamplingParams(max_tokens=30, temperature=0, stop=[","]))
    out = cut[0].outputs[0]
    assert out.finish_reason == "stop" and "," not in out.text
    assert base.text.startswith(out.text)
    tok_stop = base.token_ids[3]
    out2 = llm.generate("Count: one, two, three,", SamplingParams(max_tokens=30, temperature=0,
                                                                  stop_token_ids=[tok_stop]))[0].outputs[0]
    assert out2.finish_reason == "stop" and out2.token_ids[-1] == tok_stop
    assert len(out2.token_ids) <= 4


def test_logprobs_chosen_and_top_n(llm):
    out = llm.generate("The sky is", SamplingParams(max_tokens=3, temperature=0, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 3
    for tok, (tid, lp, top) in zip(out.token_ids, out.logprobs):
        assert tid == tok and lp <= 0
        assert len(top) == 3 and top[0][0] == tok  # greedy picks the most likely
        assert abs(top[0][1] - lp) < 1e-5


def test_incremental_detokenizer_never_breaks_utf8(default_model_path):
    _, tok = load_cached(default_model_path, "float32")
    text = "Café ☕ costs 5€ — naïve 日本語 🙂🎉 done."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_cli_generate_prints_text(default_model_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "baton.cli", "generate", "Once upon a time", "--max-tokens",
                           "20", "--temperature", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 10


def test_cli_chat_answers_paris(default_model_path):
    proc = subprocess.run([sys.executable, "-m", "baton.cli", "chat", "--temperature", "0", "--max-tokens", "30"],
                          input="What is the capital of France?\n/exit\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_cli_reports_bad_input_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "baton.cli", "generate", "hi", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "baton.cli", "generate", "hi", "--max-tokens", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "max_tokens" in proc.stderr
