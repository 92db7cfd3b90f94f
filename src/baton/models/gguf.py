"""One parse of a GGUF file: metadata, tensors (dequantized, or Q4_1's raw parts),
and what the tokenizer needs, so nothing reads the file twice."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch


class GGUFError(ValueError):
    pass


def looks_like_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFFile:
    def __init__(self, path):
        import gguf

        self.path = Path(path)
        if not looks_like_gguf(self.path):
            raise GGUFError(f"{self.path} is not a GGUF file (bad magic)")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # truncated or corrupt files fail deep inside numpy
            raise GGUFError(f"corrupt GGUF file {self.path}: {e}") from e
        self._tensors = {t.name: t for t in self.reader.tensors}

    @property
    def architecture(self) -> Optional[str]:
        return self.meta("general.architecture")

    def meta(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """In PyTorch order (GGUF lists dims innermost-first)."""
        return tuple(int(s) for s in reversed(self._tensors[name].shape))

    def tensor(self, name: str) -> torch.Tensor:
        """Dequantized to float32, [out, in] for a matrix."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(name))
        return torch.from_numpy(np.ascontiguousarray(arr))

    def q4_1_parts(self, name: str) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """A Q4_1 matrix as (q [N, K] ints 0..15, d and m [N, K/32], float32) with
        w = d*q + m; None for any other type. Block layout (ggml): fp16 d, fp16 m,
        then 16 bytes whose low nibbles hold elements 0..15 and high nibbles 16..31."""
        from gguf import GGMLQuantizationType

        t = self._tensors[name]
        shape = self.shape(name)
        if t.tensor_type != GGMLQuantizationType.Q4_1 or len(shape) != 2:
            return None
        N, K = shape
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(N, K // 32, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K)
        return q, d, m
