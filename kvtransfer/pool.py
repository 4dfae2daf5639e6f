"""The paged KV pool of one TP rank: one tensor, layer-major, in heap, shared or CUDA memory.

Layout: ``[num_layers, 2 (K, V), num_blocks, block_size, num_local_kv_heads, head_dim]``.
Layer-major keeps each layer's K (and V) for a run of consecutive blocks contiguous, so a
layer can be shipped as soon as it is computed and block runs coalesce into single copies.
"""
from __future__ import annotations

import os
import uuid

import torch

from kvtransfer.spec import KVSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHM_DIR = "/dev/shm"


def sweep_orphaned_pools(shm_dir: str = SHM_DIR) -> int:
    """Remove shared-memory pools (and their owner tags) whose creating process is gone.

    A decode worker killed with SIGKILL cannot unlink its pool; the next pool created on the
    host cleans up after it. Pools of live processes are kept; processes in another PID
    namespace that share this /dev/shm are not supported (their pids are not visible here).
    Returns how many files were removed.
    """
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        parts = name.split("-")
        if not name.startswith("pdserve-kv-") or len(parts) < 4 or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        try:
            os.kill(pid, 0)
            continue            # still alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed += 1
        except OSError:
            pass
    return removed


class KVPool:
    """KV cache memory for one rank. ``backend`` is ``heap``, ``shm`` or ``cuda``.

    A ``shm`` pool is a file under /dev/shm that other processes on the host can map with
    ``KVPool.attach``; the creating process owns it and unlinks it in ``close``.
    """

    def __init__(self, spec: KVSpec, num_blocks: int, *, tp_size: int = 1, backend: str = "heap",
                 device: str | torch.device | None = None, shm_path: str | None = None,
                 _attach: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.tp_size = tp_size
        self.backend = backend
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.shape = (spec.num_layers, 2, num_blocks, spec.block_size,
                      spec.num_local_kv_heads(tp_size), spec.head_dim)
        numel = 1
        for dim in self.shape:
            numel *= dim
        self.shm_path: str | None = None
        self._owner = not _attach
        if backend == "heap":
            self.kv = torch.zeros(self.shape, dtype=self.dtype, device="cpu")
        elif backend == "cuda":
            self.kv = torch.zeros(self.shape, dtype=self.dtype, device=device or "cuda")
        elif backend == "shm":
            if shm_path is None:
                sweep_orphaned_pools()
                shm_path = os.path.join(SHM_DIR, f"pdserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            if _attach:
                size = os.path.getsize(shm_path)
                expected = numel * self.dtype.itemsize
                if size != expected:
                    raise ValueError(f"shared KV pool {shm_path} has {size} bytes, expected {expected}: "
                                     "the two workers disagree on the KV spec or block count")
            else:
                # Zero-filled by the kernel; from_file creates the file with shared=True.
                with open(shm_path, "xb") as f:
                    f.truncate(numel * self.dtype.itemsize)
            self.shm_path = shm_path
            flat = torch.from_file(shm_path, shared=True, size=numel, dtype=self.dtype)
            self.kv = flat.view(self.shape)
        else:
            raise ValueError(f"unknown KV pool backend {backend!r}; use heap, shm or cuda")

    @classmethod
    def attach(cls, spec: KVSpec, num_blocks: int, shm_path: str, *, tp_size: int = 1) -> "KVPool":
        """Map another process's shared-memory pool (for writing into its blocks)."""
        return cls(spec, num_blocks, tp_size=tp_size, backend="shm", shm_path=shm_path, _attach=True)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each ``[num_blocks, block_size, num_local_kv_heads, head_dim]``."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def close(self) -> None:
        """Release the memory; the owner of a shared pool also removes its file."""
        if self.shm_path is not None and self._owner:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
            self.shm_path = None
        self.kv = torch.empty(0, dtype=self.dtype)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def num_blocks_for_budget(spec: KVSpec, budget_bytes: int, tp_size: int = 1) -> int:
    """How many blocks fit in ``budget_bytes`` of memory on one rank."""
    num_blocks = budget_bytes // spec.block_bytes(tp_size)
    if num_blocks < 1:
        raise ValueError(f"a KV memory budget of {budget_bytes} bytes holds no block of "
                         f"{spec.block_bytes(tp_size)} bytes; raise the budget")
    return int(num_blocks)
