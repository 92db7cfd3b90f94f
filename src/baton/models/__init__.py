from .layers import ModelConfig
from .loader import ModelLoadError, default_model_path, load_model, resolve_dtype

__all__ = ["ModelConfig", "ModelLoadError", "default_model_path", "load_model", "resolve_dtype"]
