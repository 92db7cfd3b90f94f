"""KV memory: the byte budget and the vector-shaped layout."""
from .budget import KVBudget, KVBudgetExceeded, KVSpec, resolve_kv_dtype
from .prefix import PrefixCache
from .shaped import ShapedKV

__all__ = ["KVBudget", "KVBudgetExceeded", "KVSpec", "PrefixCache", "ShapedKV", "resolve_kv_dtype"]
