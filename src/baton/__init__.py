"""baton: LLM inference serving with dynamic re-batching (BATON)."""
from .engine import EngineConfig, LLMEngine, RequestOutput
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
