"""What every scheduling policy shares: the waiting queue, the running batch and
the accounting of idle computation and KV padding that the benchmarks report.

A policy plans (`schedule() -> Plan`, pure data) and never calls the model: the
engine hands the plan to the model runner, then gives the policy `commit(plan,
computed)` once the forward ran."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Optional

from ..cache import KVBudget, KVSpec, ShapedKV
from ..sequence import Sequence, Status
from .plan import Plan, Segment


@dataclass
class PolicyStats:
    iterations: int = 0
    computed_token_rows: int = 0  # token-rows the model computed
    useful_tokens: int = 0        # of those, tokens of live queries
    kv_slots_allocated: int = 0   # summed over iterations
    kv_slots_live: int = 0        # summed over iterations
    preemptions: int = 0
    timeline: list = field(default_factory=list)  # (time, allocated (resident) bytes, live bytes)

    @property
    def idle_token_rows(self) -> int:
        return self.computed_token_rows - self.useful_tokens

    @property
    def idle_share(self) -> float:
        return self.idle_token_rows / self.computed_token_rows if self.computed_token_rows else 0.0

    @property
    def kv_padding_ratio(self) -> float:
        """Allocated KV slots per live token slot (1.0 = no waste)."""
        return self.kv_slots_allocated / self.kv_slots_live if self.kv_slots_live else 0.0


class Policy:
    name = "base"
    # Whether a request's n choices can share one prefill (the leader's Sequence
    # carries the others as `followers`); otherwise each choice is queued alone.
    shares_prompts = False

    def __init__(self, spec: KVSpec, budget: KVBudget, max_num_seqs: int, max_prefill_tokens: int,
                 record_timeline: bool = False, prefix_cache=None):
        self.spec, self.budget = spec, budget
        self.prefix_cache = prefix_cache  # PrefixCache, where the policy reuses prefilled K/V
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.slot = spec.slot_bytes
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.stats = PolicyStats()
        self.record_timeline = record_timeline
        self._t0 = time.monotonic()

    # ---- queue
    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def max_len_that_fits(self) -> int:
        """Longest query (prompt + max_tokens) that could ever run alone in the budget."""
        per_token = self.spec.reservation_bytes(1, 1 << 20) / (1 << 20)
        return int(self.budget.limit // per_token)

    # ---- to implement
    def schedule(self) -> Plan:
        """This iteration's plan (empty when there is nothing to run)."""
        raise NotImplementedError

    def commit(self, plan: Plan, computed: int) -> None:
        """The plan's forward ran, computing `computed` token-rows."""
        plan.commit()
        self.account(computed, plan.useful_tokens)

    def release(self, seq: Sequence) -> None:
        """Free everything a finished, aborted or failed query holds, at whatever
        stage it is (queued, pooled, prefilling, parked, running). Called once the
        engine has marked it finished, so its place is found by identity, not status."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        """Give back the rows and KV the query holds (it is no longer queued)."""
        raise NotImplementedError

    @property
    def num_running(self) -> int:
        raise NotImplementedError

    @property
    def num_prefilled(self) -> int:
        return 0

    @property
    def num_parked(self) -> int:
        return 0

    def live_tokens(self) -> int:
        raise NotImplementedError

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running + self.num_prefilled + self.num_parked > 0

    # ---- prefix cache
    def _reuse_prefix(self, seq: Sequence, kv: ShapedKV, target: int) -> None:
        """Start `seq`'s one-row cache from its longest cached prefix (its first
        `target` tokens are to be cached; a fresh query keeps at least its last
        prompt token to prefill, whose logits give its first token)."""
        if self.prefix_cache is None:
            return
        tokens = seq.prompt_ids + seq.output_ids
        blocks = self.prefix_cache.lookup(tokens, target if seq.output_ids else target - 1)
        seq.num_cached = self.prefix_cache.copy_into(blocks, kv)
        if not seq.output_ids:
            seq.cached_tokens = seq.num_cached

    def _offer_prefix(self, seq: Sequence, kv: ShapedKV, row: int) -> None:
        """Make the K/V `seq` holds in `row` of `kv` available to later queries."""
        if self.prefix_cache is not None and seq.num_cached and seq.error is None:
            self.prefix_cache.insert(seq.prompt_ids + seq.output_ids, kv, row, seq.num_cached)

    # ---- accounting
    def account(self, computed: int, useful: int) -> None:
        st = self.stats
        st.iterations += 1
        st.computed_token_rows += computed
        st.useful_tokens += useful
        live = self.live_tokens()
        st.kv_slots_allocated += self.budget.resident // self.slot
        st.kv_slots_live += live
        if self.record_timeline:
            st.timeline.append((time.monotonic() - self._t0, self.budget.resident, live * self.slot))


class ShapedBatch:
    """The running batch: one ShapedKV whose live rows are 0..n-1, and the
    query in each row."""

    def __init__(self, spec: KVSpec, budget: KVBudget, max_rows: int):
        self.cache = ShapedKV(spec, budget)
        self.rows: list[Sequence] = []
        self.max_rows = max_rows

    def __len__(self) -> int:
        return len(self.rows)

    def final_width(self, extra: Optional[Sequence] = None) -> int:
        seqs = self.rows + ([extra] if extra else [])
        return max((s.max_len for s in seqs), default=0)

    def can_admit(self, seq: Sequence) -> bool:
        """Reserve-on-admit: the batch grown to its longest query's final length
        must fit, so no later decode step can need memory the budget lacks."""
        n = len(self.rows) + 1
        return n <= self.max_rows and self.cache.reserve(n, self.final_width(seq), len(self.rows), self.max_rows)

    def admit(self, seq: Sequence) -> int:
        """Give `seq` the next row (caller checked can_admit)."""
        row = len(self.rows)
        self.rows.append(seq)
        seq.row = row
        seq.status = Status.RUNNING
        return row

    def remove(self, seq: Sequence) -> None:
        """Free a row by moving the last live row into it (one row copy)."""
        row, last = seq.row, len(self.rows) - 1
        if row != last:
            moved = self.rows[last]
            self.cache.move_row(last, row, moved.num_cached)
            self.rows[row] = moved
            moved.row = row
        self.rows.pop()
        seq.row = None
        if self.rows:
            self._shrink()
        else:
            self.cache.release()

    def fit_to_live_rows(self) -> None:
        """For when no query can join: give back the columns reserved beyond the
        live queries' final lengths, and the free rows once half the rows are free.
        Called once per iteration, so rows that leave together cost one copy."""
        if self.rows:
            self._shrink(tight=True)

    def _shrink(self, tight: bool = False) -> None:
        self.cache.shrink(len(self.rows), self.final_width(), max(s.num_cached for s in self.rows), tight)

    def segment(self, tokens: list[list[int]], sample: list[bool]) -> Segment:
        """This iteration's segment over all live rows (the columns it needs are
        allocated here)."""
        starts = [s.num_cached for s in self.rows]
        self.cache.ensure_width(max(s + len(t) for s, t in zip(starts, tokens)))
        return Segment(self.cache, starts, tokens, sample, list(self.rows))

    def live_tokens(self) -> int:
        return sum(s.num_cached for s in self.rows)
