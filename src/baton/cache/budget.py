"""The KV byte budget, and the geometry of one token's K/V (KVSpec)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class KVBudgetExceeded(RuntimeError):
    pass


@dataclass(frozen=True)
class KVSpec:
    """What a cache needs to know of the model: K/V geometry, dtype and device."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, cfg, dtype: torch.dtype, device) -> "KVSpec":
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, torch.device(device))

    @property
    def slot_bytes(self) -> int:
        """Bytes of K+V for one token (one row, one column) across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def reservation_bytes(self, rows: int, width: int) -> int:
        """Budget a ShapedKV of rows x width reserves: its slots plus the headroom of
        one layer's K (or V) tensor, as it resizes one such tensor at a time."""
        parts = 2 * self.num_layers
        return rows * width * self.slot_bytes * (parts + 1) // parts


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
        # what holds bytes it can give back on demand (the prefix cache): asked
        # before a reservation is refused, so it never keeps a query out
        self.reclaimers: list = []
        self.cache_bytes = 0  # of `used` (and `resident`): what the reclaimers hold

    def reset(self) -> None:
        """Nothing held any more: every cache charged to this budget was dropped
        (the engine replaced its scheduler). Peaks and timings are kept."""
        self.used = self.resident = 0
        self.copying = False
        self.reclaimers = []
        self.cache_bytes = 0

    @property
    def query_bytes(self) -> int:
        """Bytes reserved for queries (all but what the prefix cache holds)."""
        return self.used - self.cache_bytes

    @property
    def query_resident(self) -> int:
        return self.resident - self.cache_bytes

    def fits(self, extra: int, reclaim: bool = True) -> bool:
        if self.used + extra <= self.limit:
            return True
        if reclaim:
            for give_back in self.reclaimers:
                give_back(extra)
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
    each step) and brought nothing at small batch that the attention kernel's
    float32 compute does not."""
    if isinstance(kv_dtype, torch.dtype):
        return kv_dtype
    if kv_dtype in (None, "auto"):
        return model_dtype
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if kv_dtype not in allowed:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(allowed)}; got {kv_dtype!r}")
    return allowed[kv_dtype]
