"""GGUF tensors as lazily dequantized slices that the layers' ``weight_loader``s read.

A ``GGUFSlice`` behaves like a safetensors slice (``get_shape()``, ``[a:b]``, ``[:, a:b]``):
indexing dequantizes only what is asked for, with ``gguf.quants.dequantize``. The rows of a
quantized matrix are independent runs of blocks, so a column-parallel rank (rows ``a:b``)
dequantizes only its rows; a row-parallel rank (columns ``a:b``) dequantizes only its column
blocks when ``a`` and ``b`` fall on block boundaries, and whole rows otherwise.

llama.cpp stores the rows of each q and k head interleaved for its rotary kernel
(``permute`` in its convert script); ``GGUFSlice`` undoes that per head, so a rank that
reads whole heads undoes it on its own heads only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from models.gguf_file import GGUFIndex, hf_tensor_name, import_gguf, open_tensors, permuted_heads


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: its convert script interleaved the two halves of
    each head's rows (row ``i * d/2 + j`` of a head, ``i`` in 0, 1, went to row ``2j + i``)
    for its rotary kernel; this puts them back."""
    head_dim = w.shape[0] // num_heads
    return (w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face -> GGUF row order), the inverse of ``unpermute_rows``."""
    head_dim = w.shape[0] // num_heads
    return (w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


class GGUFSlice:
    """One GGUF tensor, dequantized on indexing into float32 torch tensors.

    ``data`` is the numpy view ``open_tensors`` gives; ``shape`` the logical shape (rows
    first); ``num_heads`` the head count of a permuted q/k tensor (None: not permuted).
    """

    def __init__(self, name: str, data: np.ndarray, type_name: str, shape: tuple[int, ...],
                 num_heads: int | None = None):
        self.name = name
        self.data = data
        self.type_name = type_name
        self.shape = tuple(shape)
        self.num_heads = num_heads
        if num_heads is not None and (self.shape[0] % num_heads or (self.shape[0] // num_heads) % 2):
            raise ValueError(f"{name}: {self.shape[0]} rows do not split into {num_heads} heads "
                             "of even size")

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, key) -> torch.Tensor:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > len(self.shape):
            raise ValueError(f"{self.name} has {len(self.shape)} dimension(s), indexed with {key!r}")
        rows, cols = key[0], key[1] if len(key) > 1 else slice(None)
        if len(self.shape) == 1:
            if cols != slice(None):
                raise ValueError(f"{self.name} is 1-D; it has no columns to slice")
            return self.full()[rows]  # a permuted q/k bias is undone whole
        r0, r1 = _bounds(rows, self.shape[0])
        c0, c1 = _bounds(cols, self.shape[1])
        head_rows = self.shape[0] // self.num_heads if self.num_heads else 1
        if r0 % head_rows or r1 % head_rows:  # a slice across a permuted head: undo it on all rows
            return self.full()[r0:r1, c0:c1]
        out = self._columns(self.data[r0:r1], c0, c1)
        if self.num_heads:
            out = unpermute_rows(out, (r1 - r0) // head_rows)
        return _to_torch(out)

    def full(self) -> torch.Tensor:
        """The whole tensor (what ``[:]`` returns)."""
        out = self._dequantize(self.data)
        if self.num_heads:
            out = unpermute_rows(out, self.num_heads)
        return _to_torch(out)

    def _columns(self, rows: np.ndarray, c0: int, c1: int) -> np.ndarray:
        if self.type_name in ("F32", "F16"):  # plain arrays: any columns
            return self._dequantize(rows[:, c0:c1])
        if (c0, c1) == (0, self.shape[1]):
            return self._dequantize(rows)
        gguf = import_gguf()
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.type_name]]
        if c0 % block or c1 % block:
            return self._dequantize(rows)[:, c0:c1]
        return self._dequantize(rows[:, c0 // block * nbytes:c1 // block * nbytes])

    def _dequantize(self, data: np.ndarray) -> np.ndarray:
        if self.type_name == "F32":
            return data
        gguf = import_gguf()
        qtype = gguf.GGMLQuantizationType[self.type_name]
        return gguf.quants.dequantize(np.ascontiguousarray(data), qtype)


def _bounds(index, size: int) -> tuple[int, int]:
    if not isinstance(index, slice) or index.step not in (None, 1):
        raise ValueError(f"GGUF tensors are read in contiguous slices, got {index!r}")
    start, stop, _ = index.indices(size)
    return start, max(start, stop)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    # A copy: views of the read-only mapped file must not reach torch.
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def gguf_tensors(model_dir: str | Path, num_heads: int,
                 num_kv_heads: int) -> Iterator[tuple[str, str | None, GGUFSlice | None]]:
    """(GGUF name, Hugging Face name, lazy slice) for every tensor of the converted GGUF model
    in ``model_dir``; the last two are None for a tensor name pdserve does not know."""
    index = GGUFIndex.load(model_dir)
    views = open_tensors(model_dir, index)
    for info in index.tensors:
        hf_name = hf_tensor_name(info.name)
        if hf_name is None:
            yield info.name, None, None
            continue
        heads = permuted_heads(info.name, index.architecture, num_heads, num_kv_heads)
        yield info.name, hf_name, GGUFSlice(info.name, views[info.name], info.type_name,
                                            info.shape, heads)
