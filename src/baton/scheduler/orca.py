"""Orca (OSDI'22): iteration-level scheduling with selective batching.

Each iteration flattens the new tokens of every running request (one per decode,
the whole prompt for a joining request) into one sequence for the token-wise
layers, and runs attention per request on its own KV cache, reserved at admission
for the request's maximum length (prompt + max_tokens).
"""
from __future__ import annotations

import torch

from ..kv import KVBudgetExceeded, RequestKV, SelectiveAttention
from ..sequence import Sequence, Status
from .base import Policy, StepResult


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
        if isinstance(seq.kv, RequestKV):
            seq.kv.release()
            seq.kv = None

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            try:
                seq.kv = RequestKV(self.cfg, self.kv_dtype, self.model.device, self.budget, seq.max_len)
            except KVBudgetExceeded:
                return
            self.waiting.pop(0)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def step(self) -> StepResult:
        self._admit()
        if not self.running:
            return StepResult([], None)
        device = self.model.device
        tokens = [s.uncached_tokens() for s in self.running]
        counts = [len(t) for t in tokens]
        pasts = [s.num_cached for s in self.running]
        ids = torch.tensor([t for ts in tokens for t in ts], device=device).view(1, -1)
        pos = torch.tensor([p + i for p, n in zip(pasts, counts) for i in range(n)], device=device).view(1, -1)
        last = torch.tensor(counts, device=device).cumsum(0) - 1
        ctx = SelectiveAttention([s.kv for s in self.running], pasts, counts, self.cfg.head_dim, device)
        logits = self.model(ids, pos, ctx, (torch.zeros_like(last), last))
        for s, n in zip(self.running, counts):
            s.num_cached += n
        self.account(sum(counts), sum(counts))
        return StepResult(list(self.running), logits)
