import torch

from baton.sampling import ARGMAX_BLOCK, greedy_argmax


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
