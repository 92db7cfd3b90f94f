"""KV caches: the shaped batch cache (vector shaping), prefilled entries, and the
per-request caches the Orca baseline reserves.

Layout choice (vector shaping with per-row write positions): the batch cache is one
tensor per layer for K and one for V, [rows, kv_heads, width, head_dim]. Row r holds its
query's tokens in columns 0..len_r-1, so a token's column equals its position and
nothing ever moves when a longer or shorter query joins: the joining row is simply
written from column 0 and the attention mask hides columns >= len_r (right
padding). The width attended in a step is max(len_r) over live rows, so it tracks
the longest live query, never the batch's age, and no compaction of columns is
needed. Live rows are kept packed in rows 0..n-1: when a row leaves, the last live
row is moved into its place (one row copy per departure, not per step), so every
step computes over a contiguous slice. Capacity grows geometrically and shrinks
when the longest query leaves, or to the live rows when no query waits to join, so
reallocation is amortised, never per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .models.llama import ModelConfig, attention_over_cache, upcast_attention

NEG_INF = float("-inf")
WIDTH_ALIGN = 32  # capacity is grown in multiples of this many columns


def shape_bucket(n: int) -> int:
    """n rounded up to one of a bounded set of sizes (steps of 8 up to 128, 16 up
    to 512, 32 up to 2048, then 128: at most 15 tokens or ~6% more). oneDNN's GEMMs
    keep state per distinct shape that is never given back: 300 random token counts
    grew RSS by 130 MiB a round and kept growing, the same count drawn from 40 sizes
    stayed flat. Forwards are padded to these token counts (and bf16 attention to
    width_bucket widths), so RSS levels off under any mix of prompt lengths."""
    step = 8 if n <= 128 else 16 if n <= 512 else 32 if n <= 2048 else 128
    return -(-n // step) * step


def width_bucket(n: int) -> int:
    """n rounded up to a quarter octave (64, 80, 96, 112, 128, 160, ...); steps of 8 up to 64."""
    if n <= 64:
        return shape_bucket(n)
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


class KVBudgetExceeded(RuntimeError):
    pass


class KVBudget:
    """Byte budget shared by every KV allocation of one engine.

    `used` is what is committed: the caches' reservations (a running batch reserves
    its rows at their final length when a query is admitted). `resident` is what is
    allocated right now, which never exceeds `used`: a batch's tensors grow lazily
    toward its reservation as its queries lengthen."""

    def __init__(self, limit_bytes: int):
        if limit_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0; got {limit_bytes}")
        self.limit = int(limit_bytes)
        self.used = 0
        self.peak = 0
        self.resident = 0
        self.resident_peak = 0
        self.copy_seconds = 0.0  # wall time the caches spent allocating and copying KV
        self.copying = False

    def reset(self) -> None:
        """Nothing held any more: every cache charged to this budget was dropped
        (the engine replaced its scheduler). Peaks and timings are kept."""
        self.used = self.resident = 0
        self.copying = False

    def fits(self, extra: int) -> bool:
        return self.used + extra <= self.limit

    def take(self, nbytes: int) -> None:
        if not self.fits(nbytes):
            raise KVBudgetExceeded(f"KV allocation of {nbytes} B over budget ({self.used}/{self.limit} B used)")
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def give(self, nbytes: int) -> None:
        self.used -= nbytes
        assert self.used >= 0

    def allocated(self, nbytes: int) -> None:
        self.resident += nbytes
        self.resident_peak = max(self.resident_peak, self.resident)
        assert self.resident <= self.used, "resident KV above what is reserved"


def resolve_kv_dtype(kv_dtype, model_dtype: torch.dtype) -> torch.dtype:
    """"auto": the model's dtype; or an explicit "float32"/"bfloat16"/"float16".
    A float32 cache doubles KV bytes; on the 2-core CPU it made batch-32 decode
    slower (462.8 vs 569.3 tok/s in benchmarks/results/perf, more bytes to read
    each step) and brought nothing at small batch that attention_over_cache's
    float32 compute does not."""
    if isinstance(kv_dtype, torch.dtype):
        return kv_dtype
    if kv_dtype in (None, "auto"):
        return model_dtype
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if kv_dtype not in allowed:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(allowed)}; got {kv_dtype!r}")
    return allowed[kv_dtype]


def slot_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K+V for one token (one row, one column) across all layers."""
    return cfg.kv_bytes_per_token * torch.empty((), dtype=dtype).element_size()


def reservation_bytes(cfg: ModelConfig, slot: int, rows: int, width: int) -> int:
    """Budget a ShapedKV of rows x width reserves: its slots plus the headroom of
    one layer's K (or V) tensor, as it resizes one such tensor at a time."""
    parts = 2 * cfg.num_layers
    return rows * width * slot * (parts + 1) // parts


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

    def __init__(self, cfg: ModelConfig, dtype, device, budget: KVBudget, rows: int = 0, width: int = 0):
        self.cfg, self.dtype, self.device, self.budget = cfg, dtype, torch.device(device), budget
        self.slot = slot_bytes(cfg, dtype)
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
        return reservation_bytes(self.cfg, self.slot, rows, width)

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
        H, D = self.cfg.num_kv_heads, self.cfg.head_dim
        for tensors in (self.k, self.v):
            for layer in range(self.cfg.num_layers):
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
    def embed(self, row: int, entry: "PrefilledKV", length: int) -> None:
        """Copy a prefilled query's KV into `row`, columns 0..length-1."""
        self.ensure_width(length)
        for kl, vl, ek, ev in zip(self.k, self.v, entry.cache.k, entry.cache.v):
            kl[row, :, :length] = ek[0, :, :length]
            vl[row, :, :length] = ev[0, :, :length]

    @_timed_copy
    def extract(self, row: int, length: int) -> "PrefilledKV":
        """Take row `row` out intact as a one-row entry (used to park a preempted query)."""
        entry = PrefilledKV(self.cfg, self.dtype, self.device, self.budget, length)
        for kl, vl, ek, ev in zip(self.k, self.v, entry.cache.k, entry.cache.v):
            ek[0, :, :length] = kl[row, :, :length]
            ev[0, :, :length] = vl[row, :, :length]
        return entry


class PrefilledKV:
    """A query's KV outside the running batch (prefilled or parked in the pool): a
    one-row cache of its own, exactly as wide as its tokens, so entries prefilled in
    the same iteration pad nothing to each other."""

    def __init__(self, cfg, dtype, device, budget: KVBudget, width: int):
        self.cache: Optional[ShapedKV] = ShapedKV(cfg, dtype, device, budget, rows=1, width=width)

    def release(self) -> None:
        if self.cache is not None:
            self.cache.release()
            self.cache = None


class ShapedAttention:
    """AttentionContext over rows 0..B-1 of a ShapedKV, columns 0..W-1."""

    def __init__(self, cache: ShapedKV, starts: list[int], counts: list[int], device):
        B = len(starts)
        T = max(max(counts), 1)
        self.cache, self.B = cache, B
        self.W = max(s + c for s, c in zip(starts, counts)) if any(counts) else max(starts) + 1
        self.W = max(self.W, 1)
        self.scale = cache.cfg.head_dim ** -0.5
        starts_t = torch.tensor(starts, device=device)
        # One row feeding a run of tokens (a prefill or a chunk of one): contiguous
        # columns, written by slicing and attended with SDPA's fused kernel.
        self.span = (starts[0], starts[0] + T) if B == 1 and T > 1 and counts[0] == T else None
        if self.span is None and not upcast_attention(B, T, self.W, cache.device):
            if self.W < cache.width <= 2 * self.W:
                # Attend over every allocated column: a slice of rows of the full-width cache
                # is contiguous, which spares the copy the CPU's bf16 batched matmul makes of
                # a strided operand (K^T and V, every layer); up to 2x masked columns cost less.
                self.W = cache.width
            else:
                # The bf16 matmul keeps state per shape that is never freed (see
                # shape_bucket), and rows x width take many values: widths are rounded
                # to quarter octaves (at most 25% more columns, all masked).
                self.W = min(cache.width, width_bucket(self.W))
        if T == 1 and all(c == 1 for c in counts):
            # Decode: every row writes one token at its own length.
            self.dst = (torch.arange(B, device=device), starts_t)
            self.src = None
        else:
            b_idx = [b for b in range(B) for _ in range(counts[b])]
            t_idx = [t for b in range(B) for t in range(counts[b])]
            b_t = torch.tensor(b_idx, dtype=torch.long, device=device)
            t_t = torch.tensor(t_idx, dtype=torch.long, device=device)
            self.dst = (b_t, starts_t[b_t] + t_t)
            self.src = (b_t, t_t)
        # Token t of row b (at column starts[b]+t) sees columns <= its own; the rest
        # (other queries' padding, stale data of a reused row) is masked out.
        cols = torch.arange(self.W, device=device)
        limit = starts_t.view(B, 1) + torch.arange(T, device=device).view(1, T)  # [B, T]
        allowed = cols.view(1, 1, self.W) <= limit.unsqueeze(-1)
        self.mask = torch.zeros(B, 1, T, self.W, device=device).masked_fill_(~allowed.unsqueeze(1), NEG_INF)
        self.allowed = allowed.unsqueeze(1)  # boolean form, for SDPA (any query dtype)

    def attend(self, layer, q, k, v):
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        k, v = k.to(kc.dtype), v.to(kc.dtype)
        if self.span is not None:
            a, b = self.span
            kc[0, :, a:b] = k[0].transpose(0, 1)
            vc[0, :, a:b] = v[0].transpose(0, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2).to(kc.dtype), kc[:1, :, :b], vc[:1, :, :b],
                attn_mask=None if a == 0 else self.allowed, is_causal=a == 0, scale=self.scale, enable_gqa=True)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1).to(q.dtype)
        if self.src is None:
            kc[self.dst[0], :, self.dst[1]] = k[:, 0]
            vc[self.dst[0], :, self.dst[1]] = v[:, 0]
        else:
            kc[self.dst[0], :, self.dst[1]] = k[self.src]
            vc[self.dst[0], :, self.dst[1]] = v[self.src]
        return attention_over_cache(q, kc[: self.B, :, : self.W], vc[: self.B, :, : self.W], self.mask, self.scale)


@dataclass
class Segment:
    """Rows 0..len(starts)-1 of `cache`, fed in one forward: row b writes tokens[b]
    from column starts[b] on, and wants logits at its last token if want_logits[b]."""
    cache: ShapedKV
    starts: list[int]
    tokens: list[list[int]]
    want_logits: list[bool]

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and positions, [B, T]; shorter rows are padded to the longest."""
        B, counts = len(self.starts), [len(t) for t in self.tokens]
        T = max(max(counts), 1)
        if T == 1 and all(c == 1 for c in counts):  # decode: one token per row, built at once
            return torch.tensor(self.tokens, dtype=torch.long), torch.tensor(self.starts, dtype=torch.long).view(B, 1)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            if counts[b]:
                ids[b, :counts[b]] = torch.tensor(self.tokens[b])
            pos[b] = torch.arange(self.starts[b], self.starts[b] + T)
        return ids, pos


class SegmentedAttention:
    """Several segments in one forward. Their tokens are laid out flat ([1, N]), so
    the linear layers read each weight once for all of them (decode rows and prompt
    chunks alike); attention runs per segment, each over its own shaped cache."""

    def __init__(self, parts: list[tuple[Optional[ShapedAttention], int, int]]):
        self.parts = parts  # (context, B, T) per segment, in token order; None: padding

    def attend(self, layer, q, k, v):
        outs, off = [], 0
        for ctx, B, T in self.parts:
            n = B * T
            if ctx is None:  # padding tokens: attend to nothing, write no KV
                outs.append(q.new_zeros(1, n, q.shape[2] * q.shape[3]))
            else:
                piece = [x[0, off:off + n].view(B, T, *x.shape[2:]) for x in (q, k, v)]
                outs.append(ctx.attend(layer, *piece).reshape(1, n, -1))
            off += n
        return torch.cat(outs, dim=1)


def shaped_forward(model, segments: list[Segment]):
    """Vector-shaped forward over one or more segments (the running batch, prompts
    being prefilled into the pool). Within a segment rows feed different numbers of
    tokens (1 for a decode, a prompt or chunk for a join, 0 for an idle seat),
    padded to the longest; padded tokens write no KV. Returns (logits [N, V] for the
    rows with want_logits, segment by segment, [(segment index, row)] for those
    rows, computed token-rows, useful tokens)."""
    device = model.device
    inputs = [seg.inputs() for seg in segments]
    ctxs = [ShapedAttention(seg.cache, seg.starts, [len(t) for t in seg.tokens], device) for seg in segments]
    rows, batch_idx, time_idx, flat_idx, off = [], [], [], [], 0
    for i, (seg, (ids, _)) in enumerate(zip(segments, inputs)):
        B, T = ids.shape
        for b, toks in enumerate(seg.tokens):
            if seg.want_logits[b] and toks:
                rows.append((i, b))
                batch_idx.append(b)
                time_idx.append(len(toks) - 1)
                flat_idx.append(off + b * T + len(toks) - 1)
        off += B * T
    decode = len(segments) == 1 and inputs[0][0].shape[1] == 1
    if decode:  # one token per row: as many shapes as batch sizes
        (ids, pos), ctx = inputs[0], ctxs[0]
        computed = off
    else:  # flat: one row of all segments' tokens, padded to a bounded set of sizes
        computed = shape_bucket(off)
        parts = [(c, *i.shape) for c, (i, _) in zip(ctxs, inputs)]
        flat_ids, flat_pos = [i.reshape(1, -1) for i, _ in inputs], [p.reshape(1, -1) for _, p in inputs]
        if computed > off:
            parts.append((None, 1, computed - off))
            flat_ids.append(torch.zeros(1, computed - off, dtype=torch.long))
            flat_pos.append(torch.zeros(1, computed - off, dtype=torch.long))
        ids, pos = torch.cat(flat_ids, dim=1), torch.cat(flat_pos, dim=1)
        ctx = SegmentedAttention(parts)
        batch_idx, time_idx = [0] * len(flat_idx), flat_idx
    li = (torch.tensor(batch_idx, dtype=torch.long, device=device),
          torch.tensor(time_idx, dtype=torch.long, device=device))
    # Runs even when no row wants logits: a prefill chunk still writes its KV.
    logits = model(ids.to(device), pos.to(device), ctx, li)
    useful = sum(len(t) for seg in segments for t in seg.tokens)
    return logits, rows, computed, useful


class RequestKV:
    """The Orca baseline's per-request cache, reserved for prompt + max_tokens."""

    def __init__(self, cfg: ModelConfig, dtype, device, budget: KVBudget, max_len: int):
        self.budget = budget
        self.nbytes = max_len * slot_bytes(cfg, dtype)
        budget.take(self.nbytes)
        budget.allocated(self.nbytes)  # Orca allocates its whole reservation up front
        shape = (cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def release(self) -> None:
        if self.k is not None:
            self.budget.allocated(-self.nbytes)
            self.budget.give(self.nbytes)
            self.k = self.v = None


class SelectiveAttention:
    """Orca's selective batching: tokens of all requests are flattened into one
    [1, N] sequence for the linear layers; attention runs per request on its own cache."""

    def __init__(self, caches: list[RequestKV], pasts: list[int], counts: list[int], head_dim: int, device):
        self.caches, self.pasts, self.counts = caches, pasts, counts
        self.scale = head_dim ** -0.5
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)
        self.masks = []
        for past, n in zip(pasts, counts):
            if n == 1:
                self.masks.append(None)
            else:
                cols = torch.arange(past + n, device=device)
                allowed = cols.view(1, -1) <= (past + torch.arange(n, device=device)).view(-1, 1)
                self.masks.append(torch.zeros(1, 1, n, past + n, device=device).masked_fill_(~allowed, NEG_INF))

    def attend(self, layer, q, k, v):
        outs = []
        for i, cache in enumerate(self.caches):
            a, b = self.offsets[i], self.offsets[i + 1]
            past, n = self.pasts[i], self.counts[i]
            kc, vc = cache.k[layer], cache.v[layer]  # [KVH, R, D]
            kc[:, past:past + n] = k[0, a:b].transpose(0, 1).to(kc.dtype)
            vc[:, past:past + n] = v[0, a:b].transpose(0, 1).to(vc.dtype)
            outs.append(attention_over_cache(q[:, a:b], kc[None, :, : past + n], vc[None, :, : past + n],
                                             self.masks[i], self.scale))
        return torch.cat(outs, dim=1)
