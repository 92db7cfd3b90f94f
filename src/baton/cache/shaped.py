"""The vector-shaped KV layout.

Layout choice (vector shaping with per-row write positions): a cache is one
tensor per layer for K and one for V, [rows, kv_heads, width, head_dim]. Row r
holds its query's tokens in columns 0..len_r-1, so a token's column equals its
position and nothing ever moves when a longer or shorter query joins: the
joining row is simply written from column 0 and the attention mask hides
columns >= len_r (right padding). The width attended in a step is max(len_r)
over live rows, so it tracks the longest live query, never the batch's age,
and no compaction of columns is needed. Live rows are kept packed in rows
0..n-1: when a row leaves, the last live row is moved into its place (one row
copy per departure, not per step), so every step computes over a contiguous
slice. Capacity grows geometrically and shrinks when the longest query leaves,
or to the live rows when no query waits to join, so reallocation is amortised,
never per step.

The running batch is one such cache; a query prefilled into the pool, a parked
query and an Orca request are one-row caches of the same class (allocated whole
at their width), so there is one layout and one attention path for all of them.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .budget import KVBudget, KVSpec

WIDTH_ALIGN = 32  # capacity is grown in multiples of this many columns


def round_width(n: int) -> int:
    return max(WIDTH_ALIGN, -(-n // WIDTH_ALIGN) * WIDTH_ALIGN)


def _timed_copy(method):
    """Adds the method's wall time to the budget's copy_seconds (the engine reports
    KV allocation and copies apart from scheduling overhead)."""
    def timed(self, *args):
        budget = self.budget
        if budget.copying:  # nested (embed -> ensure_width -> _resize): timed once
            return method(self, *args)
        budget.copying, t0 = True, time.perf_counter()
        try:
            return method(self, *args)
        finally:
            budget.copying = False
            budget.copy_seconds += time.perf_counter() - t0
    return timed


class ShapedKV:
    """A rectangular K/V cache: per layer one K and one V tensor of
    [rows, kv_heads, width, head_dim].

    Used for the running batch and (allocated whole) for prefilled queries in the pool.
    Two sizes: the reservation `rows_cap` x `width_cap`, counted in the budget so
    that no later step can lack memory, and the allocated tensors, `rows` x `width`,
    whose columns grow toward the reservation only as the longest live query
    lengthens (`ensure_width`): memory follows the tokens actually held. Tensors
    are per layer so that a resize copies one tensor at a time: old and new copies
    of one layer's K (or V) coexist, never of the whole cache, and the reservation
    carries that much headroom.
    """

    def __init__(self, spec: KVSpec, budget: KVBudget, rows: int = 0, width: int = 0):
        self.spec, self.budget = spec, budget
        self.dtype, self.device = spec.dtype, spec.device
        self.rows_cap = self.width_cap = 0  # reserved
        self.rows = self.width = 0          # allocated
        self.reserved = 0                   # bytes taken from the budget
        self.resident = 0                   # bytes allocated
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.reallocations = 0
        if rows and width:
            self._reserve_exact(rows, width)
            self._resize(rows, width, 0, 0)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        return self.resident

    def bytes_for(self, rows: int, width: int) -> int:
        return self.spec.reservation_bytes(rows, width)

    def _reserve_exact(self, rows: int, width: int) -> None:
        nbytes = self.bytes_for(rows, width)
        if nbytes > self.reserved:
            self.budget.take(nbytes - self.reserved)
        else:
            self.budget.give(self.reserved - nbytes)
        self.reserved = nbytes
        self.rows_cap, self.width_cap = rows, width

    def reserve(self, rows: int, width: int, live_rows: int = 0, max_rows: Optional[int] = None) -> bool:
        """Reserve room for `rows` x `width` slots, keeping the live rows' data.

        Rows grow geometrically (up to max_rows) and width in aligned steps; if that
        does not fit the budget, the exact need is tried. New rows are allocated at
        once (a joining query is written right away); columns only as needed.
        Returns False (changing nothing) when even the exact need does not fit."""
        if rows <= self.rows_cap and width <= self.width_cap:
            return True
        grow_rows = max(rows, min(2 * self.rows_cap, max_rows or rows)) if rows > self.rows_cap else self.rows_cap
        for r, w in ((grow_rows, max(round_width(width), self.width_cap)),
                     (max(rows, self.rows_cap), max(width, self.width_cap))):
            if self.budget.fits(self.bytes_for(r, w) - self.reserved):
                self._reserve_exact(r, w)
                if r > self.rows:
                    self._resize(r, self.width, live_rows, self.width)
                return True
        return False

    def ensure_width(self, need: int) -> None:
        """Allocate at least `need` columns (within the reservation), in aligned
        steps of at least a quarter, so copies are amortised over many steps."""
        if need <= self.width:
            return
        assert need <= self.width_cap, f"{need} columns needed, {self.width_cap} reserved"
        width = min(self.width_cap, max(round_width(need), round_width(self.width * 5 // 4)))
        self._resize(self.rows, width, self.rows, self.width)

    def shrink(self, live_rows: int, width: int, need: int, tight: bool = False) -> None:
        """Give memory back when the batch has emptied out or its longest query has
        left: only when a dimension is over 4x (rows) or 2x (width) the need, so
        shrinking, like growing, is amortised. `width` is what the live queries will
        need at their final lengths (the reservation), `need` what they hold now.
        `tight`: no query is waiting to join, so the reserved columns beyond the live
        queries' final lengths are given back, and the free rows once they are half
        the rows (a draining batch is copied log2(rows) times, not once per exit)."""
        if tight:
            rows = max(live_rows, 1) if self.rows_cap >= 2 * max(live_rows, 1) else self.rows_cap
            width_cap = min(self.width_cap, round_width(width))
        else:
            rows = max(2 * live_rows, 1) if self.rows_cap > 4 * max(live_rows, 1) else self.rows_cap
            width_cap = round_width(width) if self.width_cap > 2 * round_width(width) else self.width_cap
        alloc = min(round_width(need) if self.width > 2 * round_width(need) else self.width, width_cap)
        if (rows, alloc) != (self.rows, self.width):
            self._resize(rows, alloc, min(live_rows, rows), min(need, alloc))
        if (rows, width_cap) != (self.rows_cap, self.width_cap):
            self._reserve_exact(rows, width_cap)

    def _account(self, nbytes: int) -> None:
        self.resident += nbytes
        self.budget.allocated(nbytes)

    @_timed_copy
    def _resize(self, rows: int, width: int, live_rows: int, live_width: int) -> None:
        """Reallocate to rows x width, one layer at a time, keeping the live region."""
        H, D = self.spec.num_kv_heads, self.spec.head_dim
        for tensors in (self.k, self.v):
            for layer in range(self.spec.num_layers):
                # Zeros, not empty: masked columns get probability 0, and 0 * NaN garbage would be NaN.
                t = torch.zeros(rows, H, width, D, dtype=self.dtype, device=self.device)
                self._account(t.nbytes)
                if layer < len(tensors):
                    old = tensors[layer]
                    if live_rows and live_width:
                        t[:live_rows, :, :live_width] = old[:live_rows, :, :live_width]
                    tensors[layer] = t
                    self._account(-old.nbytes)
                else:
                    tensors.append(t)
        self.rows, self.width = rows, width
        self.reallocations += 1

    def release(self) -> None:
        self._account(-self.resident)
        self.budget.give(self.reserved)
        self.k, self.v = [], []
        self.reserved = self.rows_cap = self.width_cap = self.rows = self.width = 0

    @_timed_copy
    def move_row(self, src: int, dst: int, width: int) -> None:
        for kl, vl in zip(self.k, self.v):
            kl[dst, :, :width] = kl[src, :, :width]
            vl[dst, :, :width] = vl[src, :, :width]

    @_timed_copy
    def embed(self, row: int, entry: "ShapedKV", length: int) -> None:
        """Copy a one-row cache's first `length` columns into `row` (a prefilled or
        parked query joining the batch)."""
        self.ensure_width(length)
        for kl, vl, ek, ev in zip(self.k, self.v, entry.k, entry.v):
            kl[row, :, :length] = ek[0, :, :length]
            vl[row, :, :length] = ev[0, :, :length]

    @_timed_copy
    def extract(self, row: int, length: int) -> "ShapedKV":
        """Take row `row` out intact as a one-row cache (used to park a preempted query)."""
        entry = ShapedKV(self.spec, self.budget, rows=1, width=length)
        for kl, vl, ek, ev in zip(self.k, self.v, entry.k, entry.v):
            ek[0, :, :length] = kl[row, :, :length]
            ev[0, :, :length] = vl[row, :, :length]
        return entry
