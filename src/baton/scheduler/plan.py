"""What a policy's step decides, as plain data: the model runner executes it and
the policy never touches the model."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..cache import ShapedKV
from ..sequence import Sequence


@dataclass
class Segment:
    """Rows 0..len(starts)-1 of `cache`, fed in one forward: row b writes tokens[b]
    from column starts[b] on, and wants logits at its last token if sample[b]
    (then owners[b] gets the token sampled from them)."""
    cache: ShapedKV
    starts: list[int]
    tokens: list[list[int]]
    sample: list[bool]
    owners: list[Sequence]


@dataclass
class Plan:
    """One iteration: segments run in one forward, their tokens laid out in order.
    `pad`: a flat forward with prompt tokens may be padded to a shape bucket (the
    runner bounds the GEMM shapes oneDNN keeps state for); Orca's selective
    batching computes exactly its tokens, as that baseline is defined."""
    segments: list[Segment] = field(default_factory=list)
    pad: bool = True

    @property
    def empty(self) -> bool:
        return not self.segments

    def sampled(self) -> list[Sequence]:
        """The queries that get a token, in the order of the runner's logits rows."""
        return [seg.owners[b] for seg in self.segments for b, toks in enumerate(seg.tokens)
                if seg.sample[b] and toks]

    def commit(self) -> None:
        """The forward ran: every row's fed tokens are now cached."""
        for seg in self.segments:
            for owner, toks in zip(seg.owners, seg.tokens):
                owner.num_cached += len(toks)

    @property
    def useful_tokens(self) -> int:
        return sum(len(t) for seg in self.segments for t in seg.tokens)
