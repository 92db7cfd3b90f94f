import torch

from baton.platform.cpu import ARGMAX_BLOCK, greedy_argmax


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
