"""BATON dynamic re-batching: `baton` (inline joins) and `baton-pd` (P&D decoupling).

Both keep one vector-shaped running batch whose membership changes between
iterations: a finished query leaves at once and a waiting one takes its row.

- baton: a joining query's prompt is fed in the same iteration as everyone's
  decode; the running rows are padded to the prompt's length (idle token-rows).
- baton-pd: joining queries are prefilled on their own, ahead of time, into a
  bounded pool; at an iteration boundary a ready entry's KV (and first token) is
  embedded into a free row, so decode iterations stay one token per row.
"""
from __future__ import annotations

import torch

from ..kv import KVBudgetExceeded, ShapedKV, shaped_forward
from ..sequence import Sequence, Status
from .base import Policy, ShapedBatch, StepResult


class BatonPolicy(Policy):
    name = "baton"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch = ShapedBatch(self.cfg, self.model.dtype, self.model.device, self.budget, self.max_num_seqs)

    @property
    def num_running(self) -> int:
        return len(self.batch)

    def live_tokens(self) -> int:
        return self.batch.live_tokens()

    def release(self, seq: Sequence) -> None:
        if seq.row is not None:
            self.batch.remove(seq)

    def _admit_joiners(self) -> list[Sequence]:
        joiners, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if joiners and len(seq.uncached_tokens()) > budget:
                break
            if not self.batch.can_admit(seq):
                break
            self.waiting.pop(0)
            self.batch.admit(seq)
            joiners.append(seq)
            budget -= len(seq.uncached_tokens())
        return joiners

    def step(self) -> StepResult:
        self._admit_joiners()
        if not len(self.batch):
            return StepResult([], None)
        # Every row feeds what it has not cached: the last sampled token, or its
        # prompt (chunked to the prefill budget when it is long).
        tokens, want = [], []
        for s in self.batch.rows:
            todo = s.uncached_tokens()
            chunk = todo[: max(1, self.max_prefill_tokens)]
            tokens.append(chunk)
            want.append(len(chunk) == len(todo))
        logits, seqs, computed, useful = self.batch.forward(self.model, tokens, want)
        self.account(computed, useful)
        return StepResult(seqs, logits)


class BatonPDPolicy(BatonPolicy):
    name = "baton-pd"

    def __init__(self, *args, pool_size: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool_size = pool_size
        self.pool: list[Sequence] = []  # prefilling or prefilled, in admission order

    @property
    def num_prefilled(self) -> int:
        return len(self.pool)

    def live_tokens(self) -> int:
        return self.batch.live_tokens() + sum(s.num_cached for s in self.pool)

    def release(self, seq: Sequence) -> None:
        if seq in self.pool:
            self.pool.remove(seq)
        if isinstance(seq.kv, ShapedKV):
            seq.kv.release()
            seq.kv = None
        super().release(seq)

    def _embed_ready(self) -> None:
        """Move fully prefilled queries from the pool into free rows."""
        for seq in list(self.pool):
            if seq.num_cached < seq.prompt_len or not seq.output_ids:
                continue  # still prefilling, or its first token is not sampled yet
            if seq.is_finished or not self.batch.can_admit(seq):
                break
            self.pool.remove(seq)
            row = self.batch.admit(seq)
            self.batch.cache.embed(row, seq.kv, seq.num_cached)
            seq.kv.release()
            seq.kv = None

    def _prefill(self) -> tuple[list[Sequence], list[torch.Tensor], int, int]:
        """Prefill into the pool, bounded by max_prefill_tokens per step."""
        budget, seqs, logits, computed, useful = self.max_prefill_tokens, [], [], 0, 0
        # Continue a chunked prefill first, then admit new queries while there is room.
        candidates = [s for s in self.pool if s.num_cached < s.prompt_len]
        while budget > 0:
            if candidates:
                seq = candidates.pop(0)
            elif self.waiting and len(self.pool) < self.pool_size:
                seq = self.waiting[0]
                try:
                    seq.kv = ShapedKV(self.cfg, self.model.dtype, self.model.device, self.budget,
                                      rows=1, width=seq.prompt_len)
                except KVBudgetExceeded:
                    break  # wait for memory
                self.waiting.pop(0)
                seq.status = Status.PREFILLED
                self.pool.append(seq)
            else:
                break
            todo = seq.uncached_tokens()[: seq.prompt_len - seq.num_cached]
            chunk = todo[:budget]
            done = len(chunk) == len(todo)
            out, _, c, u = shaped_forward(self.model, seq.kv, [seq.num_cached], [chunk], [done])
            seq.num_cached += len(chunk)
            budget -= len(chunk)
            computed += c
            useful += u
            if done:
                seqs.append(seq)
                logits.append(out)
        return seqs, logits, computed, useful

    def step(self) -> StepResult:
        self._embed_ready()
        seqs, logits, computed, useful = [], [], 0, 0
        if len(self.batch):
            tokens = [s.uncached_tokens() for s in self.batch.rows]  # one token per row
            out, dec_seqs, computed, useful = self.batch.forward(self.model, tokens, [True] * len(tokens))
            seqs += dec_seqs
            logits.append(out)
        p_seqs, p_logits, c, u = self._prefill()
        seqs += p_seqs
        logits += p_logits
        if computed or c:
            self.account(computed + c, useful + u)
        return StepResult(seqs, torch.cat(logits) if logits else None)
