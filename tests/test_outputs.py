"""The output processor: streamed deltas always add up to the final text, and a
stop string is never streamed, even when it arrives split across tokens."""
from __future__ import annotations

import random

import pytest

from baton import SamplingParams
from baton.outputs import OutputProcessor
from baton.sampling import SampledToken
from baton.sequence import Sequence

ALPHABET = "ab c\nd"


class CharTokenizer:
    """Token i is one character of ALPHABET (enough for the incremental detokenizer)."""
    eos_token_ids = [99]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i] for i in ids if i < len(ALPHABET))


def run(tokens: list[int], stop: list[str], max_tokens: int = 1000):
    proc = OutputProcessor(CharTokenizer(), {99})
    seq = Sequence("r", [0], SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop))
    proc.add(seq)
    deltas, reason = [], None
    for t in tokens:
        delta, reason = proc.append(seq, SampledToken(t), 0.0)
        deltas.append(delta)
        if reason:
            proc.finish(seq, reason)
            break
    final = proc.choice(seq, "", []).text if reason else proc.states[id(seq)].text
    return deltas, final, reason


def test_a_stop_string_split_across_tokens_is_never_streamed():
    # "c\nd" arrives as "c", "\n", "d": the first two are held until the stop completes.
    deltas, final, reason = run([0, 1, 3, 4, 5, 0], stop=["c\nd"])
    assert reason == "stop" and final == "ab"
    assert deltas == ["a", "b", "", "", ""]
    assert "".join(deltas) == final


def test_include_stop_str_in_output_keeps_the_stop_string():
    proc = OutputProcessor(CharTokenizer(), {99})
    seq = Sequence("r", [0], SamplingParams(max_tokens=100, temperature=0, stop=["c\nd"],
                                            include_stop_str_in_output=True))
    proc.add(seq)
    deltas = []
    for t in [0, 1, 3, 4, 5, 0]:
        delta, reason = proc.append(seq, SampledToken(t), 0.0)
        deltas.append(delta)
        if reason:
            break
    assert reason == "stop" and "".join(deltas) == "abc\nd"


def test_min_tokens_holds_off_stops_and_eos():
    proc = OutputProcessor(CharTokenizer(), {99})
    seq = Sequence("r", [0], SamplingParams(max_tokens=100, temperature=0, stop=["b"], min_tokens=3))
    proc.add(seq)
    reasons = [proc.append(seq, SampledToken(t), 0.0)[1] for t in [1, 99, 2, 1]]
    # "b" (a stop) and EOS before 3 tokens do not end it; the 4th token "b" does
    assert reasons == [None, None, None, "stop"]


def test_held_text_is_released_once_it_cannot_start_a_stop():
    deltas, final, reason = run([3, 0, 1], stop=["cd"], max_tokens=3)
    assert deltas == ["", "ca", "b"] and final == "cab" and reason == "length"


@pytest.mark.parametrize("seed", range(40))
def test_deltas_add_up_to_the_final_text(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(len(ALPHABET)) for _ in range(rng.randint(1, 40))]
    stop = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
    deltas, final, reason = run(tokens, stop, max_tokens=rng.randint(1, 40))
    full = "".join(ALPHABET[t] for t in tokens)
    assert "".join(deltas) == final
    assert not any(s in final for s in stop)
    cut = min((i for i in (full.find(s) for s in stop) if i >= 0), default=None)
    if reason == "stop":
        assert final == full[:cut]
    elif reason == "length":  # no stop string in the first max_tokens tokens: all of them
        assert final == full[:len(deltas)]
    else:  # still running: everything but a tail that could start a stop string
        assert full.startswith(final) and len(full) - len(final) < max(map(len, stop), default=1)
