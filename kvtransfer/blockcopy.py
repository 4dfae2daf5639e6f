"""Gathering and scattering scattered blocks of one layer's K (or V) in one operation each.

A fragmented pool turns a request into many one-block runs; a copy per run costs far more in
call overhead than in bytes. On CPU these go through numpy fancy indexing over an integer view
of the same memory (bit-exact, and about twice as fast as torch's index ops); on CUDA through
torch index ops.
"""
from __future__ import annotations

import numpy as np
import torch

_BITS = {2: torch.int16, 4: torch.int32}


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(_BITS[t.element_size()]).numpy()


def gather_blocks(part: torch.Tensor, block_ids: list[int], heads: tuple[int, int]) -> torch.Tensor:
    """A new contiguous ``[..., len(block_ids), block_size, h, head_dim]`` tensor of the heads
    ``[start, stop)`` of the listed blocks of ``part`` (``[..., num_blocks, block_size, heads,
    head_dim]``: one layer's K or V, or a range of layers with K and V)."""
    h0, h1 = heads
    if part.device.type != "cpu":
        index = torch.tensor(block_ids, device=part.device)
        return part.narrow(-2, h0, h1 - h0).index_select(-4, index)
    gathered = np.ascontiguousarray(_numpy(part)[..., block_ids, :, h0:h1, :])
    return torch.from_numpy(gathered).view(part.dtype)


def scatter_blocks(part: torch.Tensor, block_ids: list[int], heads: tuple[int, int],
                   values: torch.Tensor) -> None:
    """Write ``values`` (``[..., len(block_ids), block_size, h, head_dim]``) into the heads
    ``[start, stop)`` of the listed blocks of ``part`` (shaped as for ``gather_blocks``)."""
    h0, h1 = heads
    if part.device.type != "cpu":
        index = torch.tensor(block_ids, device=part.device)
        part.narrow(-2, h0, h1 - h0).index_copy_(-4, index, values.to(part.device))
        return
    _numpy(part)[..., block_ids, :, h0:h1, :] = _numpy(values.cpu())
