"""Orca (OSDI'22): iteration-level scheduling with selective batching.

Each iteration flattens the new tokens of every running request (one per decode,
the whole prompt for a joining request) into one sequence for the token-wise
layers, and runs attention per request on its own KV cache, reserved at admission
for the request's maximum length (prompt + max_tokens). Here that is one segment
per request over a one-row cache allocated whole: the same layout and attention
path as every other policy, so the comparison measures scheduling only.
"""
from __future__ import annotations

from ..cache import KVBudgetExceeded, ShapedKV
from ..sequence import Sequence, Status
from .base import Policy
from .plan import Plan, Segment


class OrcaPolicy(Policy):
    name = "orca"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running: list[Sequence] = []

    @property
    def num_running(self) -> int:
        return len(self.running)

    def live_tokens(self) -> int:
        return sum(s.num_cached for s in self.running)

    def _free(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if isinstance(seq.kv, ShapedKV):
            self._offer_prefix(seq, seq.kv, 0)  # prompt and outputs: the next turn of its chat
            seq.kv.release()
            seq.kv = None

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            try:
                seq.kv = ShapedKV(self.spec, self.budget, rows=1, width=seq.max_len)
            except KVBudgetExceeded:
                return
            self.waiting.pop(0)
            self._reuse_prefix(seq, seq.kv, seq.prompt_len)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def commit(self, plan: Plan, computed: int) -> None:
        super().commit(plan, computed)
        for seg in plan.segments:
            seq = seg.owners[0]
            if seq.num_cached == seq.prompt_len and not seq.output_ids:
                self._offer_prefix(seq, seq.kv, 0)  # prefilled: its prompt's blocks for others

    def schedule(self) -> Plan:
        self._admit()
        return Plan([Segment(s.kv, [s.num_cached], [s.uncached_tokens()], [True], [s]) for s in self.running],
                    pad=False)
