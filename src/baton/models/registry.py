"""Architecture name -> model family: its model class, how to read its config,
and how its checkpoint's tensors map onto the model's parameters (HF safetensors
and GGUF). The loader is generic over this table; a family file registers itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

class ModelLoadError(ValueError):
    """The model path is missing, corrupt, or of an unsupported architecture."""


# Family files, imported on first lookup so that each registers itself.
FAMILY_MODULES = ("llama", "qwen3", "gemma", "phi3")


@dataclass
class Family:
    name: str
    architectures: tuple            # HF config `model_type` values
    model_class: type
    config_from_hf: Callable        # (config.json dict) -> ModelConfig
    hf_weight_map: Callable         # (cfg) -> {our parameter: [HF tensors, concatenated on dim 0]}
    gguf_architectures: tuple = ()  # GGUF `general.architecture` values
    config_from_gguf: Optional[Callable] = None  # (GGUFMeta, arch) -> ModelConfig
    gguf_names: dict = field(default_factory=dict)  # llama.cpp tensor name -> HF name (per block after blk.N.)
    gguf_fixup: Optional[Callable] = None  # (cfg, HF name, array) -> array: undo the converter's changes


_FAMILIES: dict[str, Family] = {}
_GGUF: dict[str, Family] = {}


def register(family: Family) -> Family:
    for a in family.architectures:
        _FAMILIES[a] = family
    for a in family.gguf_architectures:
        _GGUF[a] = family
    return family


def _load_all() -> None:
    import importlib

    for name in FAMILY_MODULES:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise


def native_family(model_type: str) -> Optional[Family]:
    _load_all()
    return _FAMILIES.get(model_type)


def gguf_family(arch: str) -> Optional[Family]:
    _load_all()
    return _GGUF.get(arch)


def native_architectures() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)


def gguf_architectures() -> list[str]:
    _load_all()
    return sorted(_GGUF)


# ---------------------------------------------------------------- config helpers shared by families

def hf_rope(d: dict, default_theta: float = 10000.0) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling): transformers >= 5 writes rope settings as
    `rope_parameters`; older configs as `rope_theta` + `rope_scaling`."""
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    theta = d.get("rope_theta") or rope.get("rope_theta", default_theta)
    kind = rope.get("rope_type", rope.get("type"))
    return theta, (rope if kind not in (None, "default") else None)


def hf_eos(d: dict) -> list[int]:
    eos = d.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])
