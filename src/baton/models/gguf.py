"""One parse of a GGUF file: metadata, tensors (dequantized, or their raw blocks),
and what the tokenizer needs, so nothing reads the file twice.

The header is parsed here, not by `gguf.GGUFReader`: that reader builds a numpy
memmap view for every value of every metadata field, and a 49k-token vocabulary
with its merges took it 7-11 s on a 2-core host (this parser: ~0.1 s). Tensor data
is memory-mapped and read only when a tensor is asked for. The `gguf` package
still supplies the block sizes, and dequantizes the types not vectorised here.

Format (all little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count,
u64 metadata count; metadata as (string key, u32 value type, value); tensor infos
as (string name, u32 n_dims, n_dims x u64 dims innermost-first, u32 ggml type, u64
offset); then padding to `general.alignment` (default 32) and the tensor data.
A string is a u64 byte length and UTF-8 bytes; an array a u32 element type, a u64
count and the elements.
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch


class GGUFError(ValueError):
    pass


def looks_like_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------- header

GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# Fixed-size value types: struct code (little-endian), and numpy dtype for arrays.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_TYPES = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
             12: "<f8"}
_U32, _U64, _U32U64 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<IQ")
_SCALAR_STRUCTS = {t: struct.Struct("<" + c) for t, c in _SCALARS.items()}

# ggml tensor types dequantized here (vectorised numpy); others go to gguf.quants.
F32, F16, Q4_1, Q8_0, BF16 = 0, 1, 3, 8, 30


class TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch order."""
        return tuple(reversed(self.dims))


def _type_sizes(ggml_type: int, name: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None


class _Parser:
    """Walks the header bytes; every read is bounds-checked (a corrupt count or
    length must give an error, not a 2^64-element loop or a slice past the end)."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"header runs past the end of the file (needs {n} bytes at offset {self.pos}, "
                            f"file is {self.size} bytes; truncated?)")

    def u32(self) -> int:
        self.need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return _decode(s)

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: the tokenizer's ~100k entries, one tight loop."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        if count * 8 > size - pos:
            raise GGUFError(f"string array of {count} entries at offset {pos} cannot fit in the file")
        raw = [b""] * count
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8)
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                self.pos = pos
                self.need(n)
            raw[i] = buf[pos:end]
            pos = end
        self.pos = pos
        try:
            return [s.decode("utf-8") for s in raw]
        except UnicodeDecodeError:
            return [_decode(s) for s in raw]

    def value(self, vtype: int, depth: int = 0):
        st = _SCALAR_STRUCTS.get(vtype)
        if st is not None:
            self.need(st.size)
            (v,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
            return v
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            if depth > 8:
                raise GGUFError("metadata arrays nested too deep")
            self.need(12)
            etype, count = _U32U64.unpack_from(self.buf, self.pos)
            self.pos += 12
            if etype in _NP_TYPES:
                dt = np.dtype(_NP_TYPES[etype])
                if count > (self.size - self.pos) // dt.itemsize:
                    raise GGUFError(f"array of {count} values at offset {self.pos} cannot fit in the file")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            if etype == STRING:
                return self.strings(count)
            if etype == ARRAY:
                if count > self.size - self.pos:
                    raise GGUFError(f"array of {count} arrays at offset {self.pos} cannot fit in the file")
                flat = []  # flattened, as gguf's reader gives them (ReaderField.contents)
                for _ in range(count):
                    flat.extend(self.value(ARRAY, depth + 1))
                return flat
            raise GGUFError(f"unknown metadata array element type {etype} at offset {self.pos}")
        raise GGUFError(f"unknown metadata value type {vtype} at offset {self.pos}")


def _decode(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:  # gguf's reader would fail only when the value is read: keep the file usable
        return b.decode("utf-8", errors="replace")


class GGUFHeader(NamedTuple):
    """Everything but the tensor data: plain Python objects, no file handle."""

    path: str
    version: int
    metadata: dict  # key -> value (str, int, float, bool, or a list of them)
    tensors: dict  # name -> TensorInfo, in file order
    data_offset: int
    file_size: int

    @classmethod
    def parse(cls, buf, size: int, path: str) -> "GGUFHeader":
        r = _Parser(buf, size)
        r.need(24)
        if bytes(buf[0:4]) != b"GGUF":
            raise GGUFError("bad magic")
        r.pos = 4
        version = r.u32()
        if version not in GGUF_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) & 0xFFFF:
                raise GGUFError("big-endian GGUF files are not supported")
            raise GGUFError(f"unsupported GGUF version {version} (supported: {', '.join(map(str, GGUF_VERSIONS))})")
        tensor_count, kv_count = r.u64(), r.u64()
        # Each metadata entry takes at least 12 bytes and each tensor info 24.
        if kv_count > size // 12 or tensor_count > size // 24:
            raise GGUFError(f"implausible counts ({kv_count} metadata entries, {tensor_count} tensors) "
                            f"for a {size}-byte file")
        metadata = {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
        for _ in range(kv_count):
            key = r.string()
            vtype = r.u32()
            if key in metadata:
                raise GGUFError(f"duplicate metadata key {key!r}")
            metadata[key] = r.value(vtype)
        raw_infos = []
        for _ in range(tensor_count):
            name = r.string()
            n_dims = r.u32()
            if n_dims > 8:
                raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(r.u64() for _ in range(n_dims))
            ggml_type, offset = r.u32(), r.u64()
            raw_infos.append((name, dims, ggml_type, offset))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or \
                alignment & (alignment - 1):
            raise GGUFError(f"invalid general.alignment {alignment!r}: must be a power of two")
        data_offset = -(-r.pos // alignment) * alignment
        tensors = {}
        for name, dims, ggml_type, offset in raw_infos:
            if name in tensors:
                raise GGUFError(f"duplicate tensor {name!r}")
            block, type_size = _type_sizes(ggml_type, name)
            n = 1
            for d in dims:
                n *= d
            if dims and dims[0] % block:
                raise GGUFError(f"tensor {name!r}: row of {dims[0]} is not a multiple of its block size {block}")
            nbytes = n // block * type_size
            start = data_offset + offset
            if start + nbytes > size:
                raise GGUFError(f"tensor {name!r} ({nbytes} bytes at offset {start}) extends past the end of the "
                                f"file ({size} bytes; truncated?)")
            tensors[name] = TensorInfo(name, dims, ggml_type, start, nbytes)
        return cls(path, version, metadata, tensors, data_offset, size)


def _file_key(path) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


# The last header parsed by a model load, kept for the tokenizer load that follows
# it (LLMEngine loads the model, then the tokenizer of the same file): one entry,
# metadata only (no file mapping, no tensor data), taken by the tokenizer.
_cache_lock = threading.Lock()
_cached: Optional[tuple[tuple, GGUFHeader]] = None


def _remember(key: tuple, header: GGUFHeader):
    global _cached
    with _cache_lock:
        _cached = (key, header)


def take_header(path) -> GGUFHeader:
    """The header of `path`: the one a model load just parsed if the file is
    unchanged since (removed from the cache), else parsed now."""
    global _cached
    key = _file_key(path)
    with _cache_lock:
        if _cached is not None and _cached[0] == key:
            header, _cached = _cached[1], None
            return header
    with GGUFFile(path, remember=False) as f:
        return f.header


# ---------------------------------------------------------------- file

class GGUFFile:
    """An open GGUF: the parsed header and the file memory-mapped (copy-on-write,
    so arrays over it are writable for torch, though nothing writes)."""

    def __init__(self, path, remember: bool = True):
        self.path = Path(path)
        if not looks_like_gguf(self.path):
            raise GGUFError(f"{self.path} is not a GGUF file (bad magic)")
        key = _file_key(self.path)
        with open(self.path, "rb") as fh:
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        try:
            self.header = GGUFHeader.parse(self._mm, len(self._mm), str(self.path))
        except (GGUFError, struct.error, ValueError, OverflowError, MemoryError) as e:
            self.close()
            raise GGUFError(f"corrupt GGUF file {self.path}: {e}") from e
        self._tensors = self.header.tensors
        if remember:
            _remember(key, self.header)

    def close(self):
        """Drops the mapping (arrays handed out keep their pages alive until freed)."""
        self._buf = None
        self._tensors = {}
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a tensor still views it: the mapping goes when that does
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def metadata(self) -> dict:
        return self.header.metadata

    @property
    def architecture(self) -> Optional[str]:
        return self.meta("general.architecture")

    def meta(self, key: str, default=None):
        return self.header.metadata.get(key, default)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """In PyTorch order (GGUF lists dims innermost-first)."""
        return self._tensors[name].shape

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a view of the mapping)."""
        t = self._tensors[name]
        return self._buf[t.offset:t.offset + t.nbytes]

    def tensor(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dequantized to float32, [out, in] for a matrix; into `out` (float32,
        contiguous, same number of elements) if given."""
        return self.dequantize(name, out)

    def dequantize(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor dequantized to float32 (into `out` if given). Bit-identical to
        gguf.quants.dequantize: Q4_1 is d * q + m and Q8_0 d * q, each operation
        rounded to float32 (no fused multiply-add). A GGUF's quantized blocks as
        they are: platform/quant.py from_gguf_blocks."""
        t = self._tensors[name]
        shape = t.shape
        n = 1
        for s in shape:
            n *= s
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != n:
            raise ValueError(f"out for {name!r} must be a contiguous float32 tensor of {n} elements")
        w = out.numpy().reshape(-1)  # shares out's memory
        raw = self.raw(name)
        # numpy, not torch, for the arithmetic: it is single-threaded, and torch's
        # two OpenMP threads ran these ops 10-20x slower whenever the other core
        # was busy (a shared 2-core host); numpy is also what gguf's reference runs.
        if t.ggml_type == F32:
            np.copyto(w, raw.view(np.float32))
        elif t.ggml_type == F16:
            np.copyto(w, raw.view(np.float16))
        elif t.ggml_type == BF16:
            np.left_shift(raw.view("<u2"), 16, out=w.view(np.uint32), dtype=np.uint32)
        elif t.ggml_type == Q8_0:
            blocks = raw.reshape(-1, 34)
            d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
            np.multiply(blocks[:, 2:].view(np.int8), d, out=w.reshape(-1, 32))
        elif t.ggml_type == Q4_1:
            blocks = raw.reshape(-1, 20)
            dm = blocks[:, :4].copy().view(np.float16).astype(np.float32)  # [blocks, 2]: d, m
            qs = blocks[:, 4:]
            q = np.empty((blocks.shape[0], 32), dtype=np.uint8)
            np.bitwise_and(qs, 15, out=q[:, :16])
            np.right_shift(qs, 4, out=q[:, 16:])
            wb = w.reshape(-1, 32)
            np.multiply(q, dm[:, :1], out=wb)
            np.add(wb, dm[:, 1:], out=wb)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            arr = dequantize(raw, GGMLQuantizationType(t.ggml_type))
            np.copyto(w, np.asarray(arr, dtype=np.float32).reshape(-1))
        return out

