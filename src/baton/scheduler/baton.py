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

from typing import Optional

from ..cache import KVBudgetExceeded, ShapedKV
from ..sequence import Sequence, Status
from .base import Policy, ShapedBatch
from .plan import Plan, Segment


class BatonPolicy(Policy):
    name = "baton"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch = ShapedBatch(self.spec, self.budget, self.max_num_seqs)

    @property
    def num_running(self) -> int:
        return len(self.batch)

    def live_tokens(self) -> int:
        return self.batch.live_tokens()

    def _free(self, seq: Sequence) -> None:
        if seq.row is not None:
            self.batch.remove(seq)

    def joiners_pending(self) -> bool:
        """Whether a query may still take a row (if not, free rows are only waste)."""
        return bool(self.waiting)

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

    def schedule(self) -> Plan:
        self._admit_joiners()
        if not self.joiners_pending():
            self.batch.fit_to_live_rows()
        if not len(self.batch):
            return Plan()
        # Every row feeds what it has not cached: the last sampled token, or its
        # prompt (chunked to the prefill budget when it is long).
        tokens, want = [], []
        for s in self.batch.rows:
            todo = s.uncached_tokens()
            chunk = todo[: max(1, self.max_prefill_tokens)]
            tokens.append(chunk)
            want.append(len(chunk) == len(todo))
        return Plan([self.batch.segment(tokens, want)])


class BatonPDPolicy(BatonPolicy):
    """baton-pd, plus what re-batching makes possible (issue 6):

    - Priority preemption: when a ready query of higher priority (lower value) finds
      no free row, the lowest-priority running query is preempted at the iteration
      boundary. Its row's KV is taken out intact and parked in the pool; it resumes
      by being embedded again, with no recomputation. If the budget cannot hold the
      parked copy, its KV is dropped and recomputed from its tokens later.
    - Starvation guard: a query can be preempted at most `max_preemptions` times;
      after that it keeps its row until it finishes.
    - Memory: reserve-on-admit. A query enters the pool only if its entry plus the
      batch grown to hold every pooled query at its final length fits the budget,
      so a burst waits in the queue instead of exceeding the budget.
    - Stall-free prefill: at most `max_prefill_tokens` prompt tokens are prefilled
      between two decode iterations; longer prompts are prefilled in chunks.
    """

    name = "baton-pd"
    shares_prompts = True  # n > 1: one prefill, its pool entry embedded into n rows

    def __init__(self, *args, pool_size: int = 4, max_preemptions: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool_size = pool_size
        self.max_preemptions = max_preemptions
        self.pool: list[Sequence] = []  # KV outside the batch: prefilling, prefilled or parked

    @property
    def num_prefilled(self) -> int:
        return sum(s.status is Status.PREFILLED for s in self.pool)

    @property
    def num_parked(self) -> int:
        return sum(s.status is Status.PARKED for s in self.pool)

    def max_len_that_fits(self) -> int:
        # A pooled entry and the batch row it is copied into exist together.
        return super().max_len_that_fits() // 2

    def live_tokens(self) -> int:
        entries = {id(s.kv): s.num_cached for s in self.pool}  # choices of one request share an entry
        return self.batch.live_tokens() + sum(entries.values())

    def joiners_pending(self) -> bool:
        return bool(self.waiting or self.pool)

    def _free(self, seq: Sequence) -> None:
        if seq.row is not None:  # a finished query's prompt and outputs: the next turn of its chat
            self._offer_prefix(seq, self.batch.cache, seq.row)
        if seq in self.pool:
            self.pool.remove(seq)
        self._free_entry(seq)
        super()._free(seq)

    @staticmethod
    def _target(seq: Sequence) -> int:
        """Tokens to cache before the query can decode: all but the pending last
        sampled token (just the prompt for a fresh query)."""
        return seq.total_len - 1 if seq.output_ids else seq.prompt_len

    def _is_ready(self, seq: Sequence) -> bool:
        return bool(seq.output_ids) and seq.num_cached == self._target(seq) and not seq.is_finished

    def _free_entry(self, seq: Sequence) -> None:
        """Drop the query's hold on its pool entry; the entry goes when no pooled
        query (a sibling choice sharing the prompt) still holds it."""
        kv, seq.kv = seq.kv, None
        if isinstance(kv, ShapedKV) and not any(s.kv is kv for s in self.pool):
            kv.release()

    def _requeue_for_recompute(self, seq: Sequence) -> None:
        """Drop a query's KV; it will be prefilled again from its tokens."""
        if seq in self.pool:
            self.pool.remove(seq)
        self._free_entry(seq)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.add(seq)

    # ---- iteration boundary: embed, preempting if a better query waits
    def _preempt_for(self, seq: Sequence) -> bool:
        victims = [r for r in self.batch.rows if r.sort_key > seq.sort_key
                   and r.params.priority > seq.params.priority and r.num_preemptions < self.max_preemptions]
        if not victims:
            return False
        victim = max(victims, key=lambda r: r.sort_key)
        victim.num_preemptions += 1
        self.stats.preemptions += 1
        try:
            victim.kv = self.batch.cache.extract(victim.row, victim.num_cached)
        except KVBudgetExceeded:
            victim.kv = None
        self.batch.remove(victim)
        if victim.kv is None:
            self._requeue_for_recompute(victim)
        else:
            victim.status = Status.PARKED
            self.pool.append(victim)
        return True

    def _embed_ready(self) -> None:
        while True:
            ready = sorted((s for s in self.pool if self._is_ready(s)), key=lambda s: s.sort_key)
            if not ready:
                return
            seq = ready[0]
            if len(self.batch) >= self.max_num_seqs or not self.batch.can_admit(seq):
                if self._preempt_for(seq):
                    continue
                if not len(self.batch) and self._unblock(seq):
                    continue
                return
            self.pool.remove(seq)
            row = self.batch.admit(seq)
            self.batch.cache.embed(row, seq.kv, seq.num_cached)
            self._free_entry(seq)

    def _unblock(self, seq: Sequence) -> bool:
        """Safety valve: with nothing running, other pooled entries' memory must not
        keep the best ready query out; drop theirs (they are recomputed later)."""
        others = [s for s in self.pool if s is not seq]
        for s in others:
            self._requeue_for_recompute(s)
        return bool(others)

    # ---- prefill into the pool
    def _pool_admission_fits(self, seq: Sequence) -> bool:
        rows = min(self.max_num_seqs, len(self.batch) + len(self.pool) + 1 + len(seq.followers))
        width = max([self.batch.final_width(), seq.max_len] + [s.max_len for s in self.pool])
        cache = self.batch.cache
        growth = 0 if rows <= cache.rows_cap and width <= cache.width_cap \
            else cache.bytes_for(max(rows, cache.rows_cap), max(width, cache.width_cap)) - cache.reserved
        return self.budget.fits(self.spec.reservation_bytes(1, self._target(seq)) + growth)

    def _pool_next(self) -> Optional[Sequence]:
        """Move the first waiting query into the pool with a cache of its own, if
        there is pool room and memory (reserve-on-admit); None otherwise."""
        if not self.waiting:
            return None
        seq = self.waiting[0]
        fresh = len({id(s.kv) for s in self.pool if s.status is Status.PREFILLED})
        room = fresh < self.pool_size or all(seq.sort_key < s.sort_key for s in self.pool)
        if not room or not self._pool_admission_fits(seq) or self._prefix_pending(seq):
            return None
        try:
            seq.kv = ShapedKV(self.spec, self.budget, rows=1, width=self._target(seq))
        except KVBudgetExceeded:
            return None
        self.waiting.pop(0)
        self._reuse_prefix(seq, seq.kv, self._target(seq))
        seq.status = Status.PREFILLED
        self.pool.append(seq)
        return seq

    def _prefix_pending(self, seq: Sequence) -> bool:
        """Whether a pooled query still being prefilled starts with the same block as
        `seq`: then `seq` waits for it, to copy that prefix instead of computing it
        again (a burst of requests with one system prompt is prefilled once)."""
        pc = self.prefix_cache
        if pc is None or seq.output_ids or seq.prompt_len <= pc.block_size:
            return False
        head = seq.prompt_ids[:pc.block_size]
        return any(s.num_cached < self._target(s) and s.prompt_ids[:pc.block_size] == head for s in self.pool)

    def _plan_prefill(self) -> list[tuple[Sequence, list[int], bool]]:
        """This iteration's prefill into the pool, at most max_prefill_tokens: the
        unfinished entries first (a long prompt continues in chunks), then queries
        from the queue. Returns (query, tokens to feed, sample its first token?)."""
        budget, plan = self.max_prefill_tokens, []
        unfinished = sorted((s for s in self.pool if s.num_cached < self._target(s)), key=lambda s: s.sort_key)
        while budget > 0:
            seq = unfinished.pop(0) if unfinished else self._pool_next()
            if seq is None:
                break
            todo = (seq.prompt_ids + seq.output_ids)[seq.num_cached: self._target(seq)]
            if not todo:  # a recomputed query found whole in the prefix cache: ready as it is
                continue
            chunk = todo[:budget]
            # A fresh query samples its first token at the end of its prefill; a
            # recomputed one already has its pending token.
            plan.append((seq, chunk, len(chunk) == len(todo) and not seq.output_ids))
            budget -= len(chunk)
        return plan

    def commit(self, plan: Plan, computed: int) -> None:
        super().commit(plan, computed)
        # A request's other choices share the prompt just prefilled: they join the
        # pool holding the same entry (each gets its first token from the same logits).
        for seg in plan.segments:
            for seq, wants in zip(seg.owners, seg.sample):
                if seg.cache is seq.kv and seq.num_cached == self._target(seq):
                    self._offer_prefix(seq, seq.kv, 0)  # prefilled: its prompt's blocks for others
                if wants and seq.followers and seg.cache is seq.kv and not seq.output_ids \
                        and seq.num_cached == self._target(seq):
                    for f in seq.followers:
                        if f.status is Status.WAITING and not f.is_finished:
                            f.kv, f.num_cached, f.status = seq.kv, seq.num_cached, Status.PREFILLED
                            self.pool.append(f)

    def schedule(self) -> Plan:
        """Embed ready entries, then one forward: the batch's decode tokens and this
        iteration's prompt chunks as segments of one flat token batch, so the weights
        are read once (each segment attends over its own cache, nothing padded to
        another). The decode rows stay one token each."""
        self._embed_ready()
        if not self.joiners_pending():
            self.batch.fit_to_live_rows()
        plan = Plan()
        if len(self.batch):
            decode = [s.uncached_tokens() for s in self.batch.rows]  # one token per row
            plan.segments.append(self.batch.segment(decode, [True] * len(decode)))
        for seq, chunk, sample in self._plan_prefill():
            plan.segments.append(Segment(seq.kv, [seq.num_cached], [chunk], [sample], [seq]))
        return plan
