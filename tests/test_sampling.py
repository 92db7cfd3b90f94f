import math

import pytest
import torch

from baton.errors import InvalidRequest
from baton.platform.cpu import ARGMAX_BLOCK, greedy_argmax
from baton.sampling import SamplingParams, sample


def test_greedy_argmax_matches_torch_argmax_including_ties():
    g = torch.Generator().manual_seed(0)
    V = ARGMAX_BLOCK * 7
    logits = torch.randn(5, V, generator=g)
    logits[1, 3] = logits[1, V - 2] = 100.0          # tie across blocks: the first wins
    logits[2, 200] = logits[2, 201] = 50.0            # tie inside a block
    logits[3] = 1.0                                   # every entry ties
    logits[4, V - 1] = 1e9                            # the very last index
    assert torch.equal(greedy_argmax(logits), logits.argmax(-1))
    assert greedy_argmax(logits).tolist()[1:] == [3, 200, 0, V - 1]


def test_greedy_argmax_falls_back_when_vocab_is_not_a_block_multiple():
    logits = torch.randn(3, ARGMAX_BLOCK + 5)
    assert torch.equal(greedy_argmax(logits), logits.argmax(-1))


def test_underflowing_temperature_and_top_p_are_the_greedy_limit():
    import math

    from baton.sampling import SamplingParams, sample

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g) * 3
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=t, top_p=p) for t, p in
              [(1e-40, 1.0), (5e-324, 1.0), (math.ulp(0.0), 1.0), (1.0, 1e-300), (1e-30, 1e-300), (1e-45, 0.5)]]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    for _ in range(20):
        out = sample(logits, params, gens)
        assert [t.error for t in out] == [None] * 6
        assert [t.token_id for t in out] == best


def test_a_row_with_nan_logits_fails_alone():
    from baton.sampling import SamplingParams, sample

    logits = torch.randn(3, 256)
    logits[1] = float("nan")
    out = sample(logits, [SamplingParams(temperature=0.7, seed=s) for s in (1, 2, 3)],
                 [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert out[0].error is None and out[2].error is None
    assert out[1].error and "sampling failed" in out[1].error


def test_sampling_params_reject_what_cannot_be_sampled_by_name():
    import pytest

    from baton.errors import InvalidRequest
    from baton.sampling import SamplingParams

    for kwargs, field in [(dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"),
                          (dict(temperature=float("inf")), "temperature"),
                          (dict(temperature=float("nan")), "temperature"), (dict(top_p=float("nan")), "top_p"),
                          (dict(min_p=float("nan")), "min_p"), (dict(seed=1.5), "seed"),
                          (dict(stop_token_ids=["a"]), "stop_token_ids"), (dict(ignore_eos=1), "ignore_eos")]:
        with pytest.raises(InvalidRequest, match=field) as e:
            SamplingParams(**kwargs)
        assert e.value.param == field
    SamplingParams(seed=2**64 - 1)
    SamplingParams(seed=-2**63)


# --- new sampling parameters and the logits processors ---------------------------------

NEG_INF = float("-inf")


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(n=0), "n", "[1, 128]"), (dict(n=129), "n", "[1, 128]"), (dict(n=1.0), "n", "[1, 128]"),
    (dict(n=True), "n", "[1, 128]"),
    (dict(presence_penalty=2.01), "presence_penalty", "[-2, 2]"),
    (dict(presence_penalty=-2.01), "presence_penalty", "[-2, 2]"),
    (dict(presence_penalty=float("nan")), "presence_penalty", "[-2, 2]"),
    (dict(presence_penalty="1"), "presence_penalty", "[-2, 2]"),
    (dict(frequency_penalty=3), "frequency_penalty", "[-2, 2]"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty", "[-2, 2]"),
    (dict(frequency_penalty=None), "frequency_penalty", "[-2, 2]"),
    (dict(repetition_penalty=0), "repetition_penalty", "(0, 2]"),
    (dict(repetition_penalty=-1.0), "repetition_penalty", "(0, 2]"),
    (dict(repetition_penalty=2.0001), "repetition_penalty", "(0, 2]"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty", "(0, 2]"),
    (dict(logit_bias={1: 100.5}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={1: -101}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={1: float("nan")}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={1: float("inf")}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={"1": 5.0}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={-1: 5.0}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={True: 5.0}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias={1: "5"}), "logit_bias", "[-100, 100]"),
    (dict(logit_bias=[(1, 5.0)]), "logit_bias", "[-100, 100]"),
    (dict(min_tokens=-1), "min_tokens", "[0, max_tokens]"),
    (dict(max_tokens=8, min_tokens=9), "min_tokens", "[0, max_tokens]"),
    (dict(min_tokens=1.0), "min_tokens", "[0, max_tokens]"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output", "true or false"),
    (dict(bad_words="word"), "bad_words", "list of non-empty strings"),
    (dict(bad_words=["ok", ""]), "bad_words", "list of non-empty strings"),
    (dict(bad_words=["ok", 3]), "bad_words", "list of non-empty strings"),
    (dict(bad_words_token_ids=[[]]), "bad_words_token_ids", "non-empty lists"),
    (dict(bad_words_token_ids=[1, 2]), "bad_words_token_ids", "non-empty lists"),
    (dict(bad_words_token_ids=[[1, -2]]), "bad_words_token_ids", "non-empty lists"),
    (dict(prompt_logprobs=-1), "prompt_logprobs", "[0, 20]"),
    (dict(prompt_logprobs=21), "prompt_logprobs", "[0, 20]"),
    (dict(prompt_logprobs=1.5), "prompt_logprobs", "[0, 20]"),
    (dict(structured={"kind": "json"}), "structured", "StructuredOutput"),
])
def test_new_fields_reject_out_of_range_values_by_name(kwargs, field, allowed):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert e.value.param == field
    assert field in str(e.value) and allowed in str(e.value)


def test_new_fields_accept_their_boundaries():
    from baton.structured import StructuredOutput

    for kwargs in [dict(n=1), dict(n=128), dict(presence_penalty=-2), dict(presence_penalty=2.0),
                   dict(frequency_penalty=-2.0), dict(frequency_penalty=2), dict(repetition_penalty=2),
                   dict(repetition_penalty=1e-6), dict(logit_bias={}), dict(logit_bias={0: -100, 5: 100.0}),
                   dict(max_tokens=7, min_tokens=7), dict(min_tokens=0), dict(include_stop_str_in_output=True),
                   dict(bad_words=["a", "b c"]), dict(bad_words=None), dict(bad_words_token_ids=[[0], [1, 2]]),
                   dict(prompt_logprobs=0), dict(prompt_logprobs=20), dict(prompt_logprobs=None),
                   dict(structured=StructuredOutput("regex", "a+"))]:
        SamplingParams(**kwargs)
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias, p.min_tokens,
            p.include_stop_str_in_output, p.bad_words, p.bad_words_token_ids, p.prompt_logprobs,
            p.structured) == (1, 0.0, 0.0, 1.0, None, 0, False, [], [], None, None)
    assert SamplingParams(temperature=0, repetition_penalty=1.5).greedy


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _reference_penalties(row, prompt, output, rep, freq, pres):
    """vLLM's apply_penalties, one row, one token at a time."""
    row = row.clone()
    seen = set(prompt) | set(output)
    for t in range(row.shape[0]):
        x = row[t]
        if t in seen:
            x = x / rep if x > 0 else x * rep
        c = output.count(t)
        x = x - torch.tensor(freq, dtype=torch.float32) * c
        x = x - torch.tensor(pres, dtype=torch.float32) * (1.0 if c > 0 else 0.0)
        row[t] = x
    return row


def test_penalties_match_a_per_row_reference_and_leave_other_rows_alone(monkeypatch):
    import baton.sampling as sampling

    g = torch.Generator().manual_seed(3)
    N, V = 7, 97
    logits = torch.randn(N, V, generator=g) * 4
    settings = [(1.0, 0.0, 0.0), (1.3, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, -1.2), (0.6, 1.5, 2.0),
                (1.0, 0.0, 0.0), (2.0, -2.0, 0.5)]
    params = [SamplingParams(temperature=0, repetition_penalty=r, frequency_penalty=f, presence_penalty=p)
              for r, f, p in settings]
    histories = [(torch.randint(0, V, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g).tolist(),
                  torch.randint(0, V, (int(torch.randint(0, 40, (1,), generator=g)),), generator=g).tolist())
                 for _ in range(N)]
    histories[4] = ([], [5, 5, 5, 9])          # output only
    histories[6] = ([1, 2, 3], [])             # prompt only: frequency/presence do nothing

    seen = {}
    real = sampling._process

    def spy(logits, rows, *a):
        sub, errors = real(logits, rows, *a)
        seen.update(rows=rows, sub=sub.clone())
        return sub, errors

    monkeypatch.setattr(sampling, "_process", spy)
    raw = logits.clone()
    out = sample(logits, params, _gens(N), histories)
    assert torch.equal(logits, raw)  # the caller's logits are not changed
    assert seen["rows"] == [1, 2, 3, 4, 6]  # rows without penalties are never copied or touched
    for j, i in enumerate(seen["rows"]):
        ref = _reference_penalties(raw[i], *histories[i], *settings[i])
        assert torch.equal(seen["sub"][j], ref), i
        assert out[i].token_id == int(ref.argmax())  # greedy follows the processed logits
    for i in (0, 5):
        assert out[i].token_id == int(raw[i].argmax())


def test_penalties_change_the_choice_only_where_asked():
    logits = torch.zeros(3, 10)
    logits[:, 4] = 2.0
    logits[:, 7] = 1.9
    hist = [([], [4]), ([], [4]), ([4], [])]
    params = [SamplingParams(temperature=0, presence_penalty=0.5), SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=1.2)]
    out = sample(logits, params, _gens(3), hist)
    assert [t.token_id for t in out] == [7, 4, 7]
    # A negative logit seen is multiplied by the penalty (made less likely), not divided.
    logits = torch.full((1, 4), -3.0)
    logits[0, 1] = -2.5
    out = sample(logits, [SamplingParams(temperature=0, repetition_penalty=1.5)], _gens(1), [([1], [])])
    assert out[0].token_id == 0


def test_logit_bias_forces_or_bans_a_token():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50, generator=g)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0, logit_bias={17: 100}),
              SamplingParams(temperature=0, logit_bias={top[1]: -100.0}),
              SamplingParams(temperature=0)]
    out = sample(logits, params, _gens(3), [([], [])] * 3)
    assert out[0].token_id == 17
    banned = logits[1].clone()
    banned[top[1]] = NEG_INF
    assert out[1].token_id != top[1] and out[1].token_id == int(banned.argmax())
    assert out[2].token_id == top[2]
    # Random sampling too: +100 makes every other token's probability ~e^-100.
    for seed in range(10):
        out = sample(logits[:1], [SamplingParams(temperature=1.0, seed=seed, logit_bias={33: 100})],
                     _gens(1, seed), [([], [])])
        assert out[0].token_id == 33


def test_logit_bias_outside_the_vocabulary_fails_that_row_alone():
    logits = torch.randn(2, 20)
    out = sample(logits, [SamplingParams(temperature=0, logit_bias={20: 1.0}), SamplingParams(temperature=0)],
                 _gens(2), [([], [])] * 2)
    assert out[0].error and "logit_bias" in out[0].error
    assert out[1].error is None and out[1].token_id == int(logits[1].argmax())


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    V, EOS, STOP = 30, 29, 3
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, STOP] = 9.0
    logits[0, 11] = 1.0
    for greedy in (True, False):
        p = SamplingParams(temperature=0 if greedy else 1.0, min_tokens=3, stop_token_ids=[STOP])
        for k in range(3):
            for seed in range(1 if greedy else 20):
                out = sample(logits, [p], _gens(1, seed), [([1, 2], [5] * k)], eos_ids={EOS})
                assert out[0].error is None and out[0].token_id not in (EOS, STOP)
        out = sample(logits, [SamplingParams(temperature=0, min_tokens=3)], _gens(1), [([1, 2], [5] * 3)],
                     eos_ids={EOS})
        assert out[0].token_id == EOS  # allowed once min_tokens outputs exist
    # min_tokens without a stop id to mask changes nothing.
    out = sample(logits, [SamplingParams(temperature=0, min_tokens=3)], _gens(1), [([], [])])
    assert out[0].token_id == EOS


def test_bad_words_are_masked_only_in_their_context():
    V = 40
    logits = torch.zeros(4, V)
    logits[:, 7] = 5.0   # the single-token bad word
    logits[:, 9] = 4.0   # the last token of the bad word [20, 21, 9]
    logits[:, 12] = 3.0
    words = [[7], [20, 21, 9]]
    params = [SamplingParams(temperature=0, bad_words_token_ids=words) for _ in range(3)]
    params.append(SamplingParams(temperature=0))
    hist = [([20, 21], [1]),           # prompt ends with the prefix: vLLM looks at the output only
            ([], [5, 20, 21]),         # output ends with the prefix: 9 is masked too
            ([], [20, 5, 21]),         # not a suffix
            ([], [20, 21])]            # no bad words for this row
    out = sample(logits, params, _gens(4), hist)
    assert [t.token_id for t in out] == [9, 12, 9, 7]


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [R, V] -> int32 [R, ceil(V / 32)], bit j of word i = token 32 * i + j."""
    R, V = allowed.shape
    W = (V + 31) // 32
    padded = torch.zeros(R, W * 32, dtype=torch.int64)
    padded[:, :V] = allowed.long()
    words = (padded.view(R, W, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_token_bitmask_allows_only_its_tokens():
    V = 70  # not a multiple of 32
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, V, generator=g)
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[0, [2, 31, 63]] = True     # bit 31: the sign bit of its int32 word
    allowed[1, [0, 40, 69]] = True
    mask = _pack(allowed)
    assert mask.dtype == torch.int32 and mask.shape == (2, 3)
    # Bits beyond V set in the mask are ignored.
    mask[:, 2] |= torch.tensor(-(2**31), dtype=torch.int32)
    rows = [3, 1]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=i) for i in range(4)]
        for seed in range(15):
            out = sample(logits, params, _gens(4, seed), [([], [])] * 4, (), mask, rows)
            assert all(t.error is None for t in out)
            assert out[3].token_id in (2, 31, 63) and out[1].token_id in (0, 40, 69)
            alone = sample(logits[[0, 2]], [params[0], params[2]], _gens(4, seed)[0::2])
            assert [out[0].token_id, out[2].token_id] == [t.token_id for t in alone]
    out = sample(logits, [SamplingParams(temperature=0)] * 4, _gens(4), None, (), mask, rows)
    expect = logits.argmax(-1).tolist()
    for k, i in enumerate(rows):
        expect[i] = int(logits[i].masked_fill(~allowed[k], NEG_INF).argmax())
    assert [t.token_id for t in out] == expect


def test_an_all_zero_bitmask_row_fails_alone():
    V = 50
    logits = torch.randn(3, V)
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[1, 10] = True
    for temperature in (0.0, 0.8):
        params = [SamplingParams(temperature=temperature, seed=1, logprobs=2) for _ in range(3)]
        out = sample(logits, params, _gens(3), [([], [])] * 3, (), _pack(allowed), [0, 2])
        assert out[0].error and "no token" in out[0].error
        assert out[1].error is None and out[2].error is None and out[2].token_id == 10
        assert all(t.logprob is not None and math.isfinite(t.logprob) for t in out)


def test_processors_that_exclude_every_token_fail_the_row_not_the_batch():
    V = 6
    logits = torch.randn(2, V)
    p = SamplingParams(temperature=0.5, bad_words_token_ids=[[t] for t in range(V)])
    out = sample(logits, [p, SamplingParams(temperature=0.5)], _gens(2), [([], [])] * 2)
    assert out[0].error and "no token" in out[0].error and out[1].error is None


def test_a_seeded_row_is_batch_invariant_whatever_its_neighbours_use():
    V = 300
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1, V, generator=g) * 2
    hist0 = ([1, 2, 3], [4, 4, 5])
    for mine in [SamplingParams(temperature=0.9, top_p=0.9, seed=42),
                 SamplingParams(temperature=0.9, top_k=50, seed=42, repetition_penalty=1.3, presence_penalty=0.4,
                                frequency_penalty=0.2, logit_bias={7: 3.0}, bad_words_token_ids=[[5, 6]])]:
        alone = sample(base, [mine], [torch.Generator().manual_seed(42)], [hist0])[0].token_id
        others = torch.randn(4, V, generator=g)
        batch = torch.cat([others[:2], base, others[2:]])
        params = [SamplingParams(temperature=0.7, frequency_penalty=1.0, seed=1),
                  SamplingParams(temperature=0, logit_bias={3: 50}),
                  mine,
                  SamplingParams(temperature=1.0, min_tokens=4, seed=2),
                  SamplingParams(temperature=0.5, bad_words_token_ids=[[9]], seed=3)]
        hist = [([5], [6, 6]), ([], []), hist0, ([], [1]), ([], [])]
        allowed = torch.ones(1, V, dtype=torch.bool)
        allowed[0, :100] = False
        for _ in range(3):
            gens = [torch.Generator().manual_seed(s) for s in (1, 0, 42, 2, 3)]
            with_mask = sample(batch, params, gens, hist, (0,), _pack(allowed), [4])
            gens = [torch.Generator().manual_seed(s) for s in (1, 0, 42, 2, 3)]
            without = sample(batch, params, gens, hist, (0,))
            assert with_mask[2].token_id == without[2].token_id == alone
            assert with_mask[4].token_id >= 100


def test_logprobs_are_of_the_raw_logits_when_a_penalty_changed_the_choice():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    p = SamplingParams(temperature=0, logprobs=2, frequency_penalty=1.0)
    out = sample(logits, [p], _gens(1), [([], [1])])[0]
    raw = logits[0].log_softmax(-1)
    assert out.token_id == 2
    assert out.logprob == pytest.approx(float(raw[2]))
    assert [t for t, _ in out.top_logprobs] == [1, 2]
    assert [v for _, v in out.top_logprobs] == pytest.approx(raw[[1, 2]].tolist())


def test_the_common_case_processes_nothing(monkeypatch):
    import baton.sampling as sampling

    def boom(*a, **k):
        raise AssertionError("_process ran for a batch that uses no processor")

    monkeypatch.setattr(sampling, "_process", boom)
    logits = torch.randn(4, 64)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=0, min_tokens=0, logit_bias={}, repetition_penalty=1.0),
              SamplingParams(temperature=0.5, top_k=5, logprobs=1)]
    out = sample(logits, params, _gens(4), [([1], [2])] * 4, (63,))
    assert all(t.error is None for t in out)
    assert out[0].token_id == int(logits[0].argmax()) and out[2].token_id == int(logits[2].argmax())
