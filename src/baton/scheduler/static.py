"""Run-to-completion batching (the paper's "benchmark" and HF `generate`-style).

A batch is formed only when the previous one has completely ended. Its prompts are
prefilled together (padded to the longest), then every row is computed at every
iteration until the longest query ends: a finished row keeps its seat and is
computed as padding (idle computation), and arrivals wait for the next batch.
"""
from __future__ import annotations

from ..sequence import Sequence
from .base import Policy, ShapedBatch
from .plan import Plan


class StaticPolicy(Policy):
    name = "static"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch = ShapedBatch(self.spec, self.budget, self.max_num_seqs)

    @property
    def num_running(self) -> int:
        return sum(not s.is_finished for s in self.batch.rows)

    def live_tokens(self) -> int:
        return sum(s.num_cached for s in self.batch.rows if not s.is_finished)

    def _free(self, seq: Sequence) -> None:
        # A finished query's seat is held until the whole batch ends (that is the
        # baseline's idle computation); one that was aborted or failed leaves at once,
        # as nobody will read what its row computes.
        if seq.row is not None and seq.finish_reason in ("abort", "error"):
            self.batch.remove(seq)
        if self.batch.rows and all(s.is_finished for s in self.batch.rows):
            for s in list(self.batch.rows):
                self.batch.remove(s)

    def _form_batch(self) -> None:
        while self.waiting and len(self.batch) < self.max_num_seqs and self.batch.can_admit(self.waiting[0]):
            self.batch.admit(self.waiting.pop(0))

    def schedule(self) -> Plan:
        if not self.batch.rows:
            self._form_batch()
        if not self.batch.rows:
            return Plan()
        # Finished rows feed nothing but are still computed (as padding) until the batch ends.
        tokens = [[] if s.is_finished else s.uncached_tokens() for s in self.batch.rows]
        return Plan([self.batch.segment(tokens, [bool(t) for t in tokens])])
