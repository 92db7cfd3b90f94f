from .llama import LlamaModel, ModelConfig
from .loader import ModelLoadError, default_model_path, load_model, resolve_dtype

__all__ = ["LlamaModel", "ModelConfig", "ModelLoadError", "default_model_path", "load_model", "resolve_dtype"]
