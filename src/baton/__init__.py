"""baton: LLM inference serving with dynamic re-batching (BATON)."""
import os as _os

# oneDNN compiles a primitive per distinct GEMM/matmul shape and keeps it in two
# caches (its own and PyTorch's ideep LRU), 1024 entries each by default. Attention
# shapes (rows x width) keep appearing for minutes under mixed lengths, and native
# heap in use grew ~4 MiB per 32 requests until both caches filled (RSS still rising
# after 5 minutes of serving). 64 entries hold a step's working set; re-creating an
# evicted primitive costs ~0.4 ms (~55 ms per 32 mixed requests). Read when oneDNN
# is first used, so this must run before any model does.
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    _os.environ.setdefault(_name, "64")
from .engine import EngineConfig, LLMEngine, RequestOutput
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
