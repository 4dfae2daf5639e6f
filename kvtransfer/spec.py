"""The shape of a KV cache, shared by every process that reads or writes it.

Nothing here imports torch, so the router can check specs at registration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}

# KV transports, in the order a worker prefers them, and what ``--kv-transport`` accepts.
TRANSPORTS = ("zmq", "shm", "nixl")
TRANSPORT_CHOICES = ("auto", *TRANSPORTS)
# Per-transport fields a decode rank's registration and a destination's rank entry must carry.
TRANSPORT_EXTRAS: dict[str, tuple[str, ...]] = {"shm": ("shm_path", "owners_path"),
                                                "nixl": ("nixl_agent",)}


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens (ceiling division): the one rounding rule."""
    return -(-num_tokens // block_size)


def reservation_blocks(num_context: int, max_tokens: int, output_index: int, max_model_len: int,
                       block_size: int) -> int:
    """KV blocks a decode worker reserves for a request's whole life, so a running sequence never
    needs another: the context plus every token still to come, less the last one (whose K/V is
    never computed), capped by the max model length. The router sizes its placement with the same
    rule, so the two agree block for block.
    """
    remaining = max(1, max_tokens - output_index)
    final_len = min(num_context + remaining, max_model_len)
    return num_blocks_for(max(final_len - 1, num_context), block_size)


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """Global kv heads ``[start, stop)`` held by ``rank`` of a TP group of ``tp_size``.

    With at least as many kv heads as ranks, each rank holds ``num_kv_heads // tp_size``
    consecutive heads. With fewer (MQA, small GQA), each head is replicated on
    ``tp_size // num_kv_heads`` consecutive ranks and a rank holds exactly one head.
    """
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside a TP group of {tp_size}")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(
                f"{num_kv_heads} kv heads cannot be split over TP={tp_size}; "
                "choose a TP degree that divides the number of kv heads")
        per_rank = num_kv_heads // tp_size
        return rank * per_rank, (rank + 1) * per_rank
    if tp_size % num_kv_heads:
        raise ValueError(
            f"TP={tp_size} is not a multiple of the {num_kv_heads} kv heads; "
            "choose a TP degree that is a multiple or a divisor of the kv heads")
    head = rank // (tp_size // num_kv_heads)
    return head, head + 1


@dataclass(frozen=True)
class KVSpec:
    """Layout of one worker's paged KV cache (the whole model, before TP sharding).

    A block holds ``block_size`` consecutive tokens of one sequence, for every layer, K and V.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVSpec.{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(
                f"KVSpec.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_SIZES)}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def num_local_kv_heads(self, tp_size: int) -> int:
        start, stop = kv_head_range(self.num_kv_heads, tp_size, 0)
        return stop - start

    def block_bytes(self, tp_size: int = 1) -> int:
        """Bytes of one block on one rank: all layers, K and V."""
        return (2 * self.num_layers * self.block_size * self.num_local_kv_heads(tp_size)
                * self.head_dim * self.itemsize)

    def num_blocks_for(self, num_tokens: int) -> int:
        return num_blocks_for(num_tokens, self.block_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KVSpec":
        if not isinstance(data, dict):
            raise ValueError(f"a KV spec must be a mapping, got {type(data).__name__}")
        fields = {"num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"}
        missing, extra = fields - data.keys(), data.keys() - fields
        if missing or extra:
            raise ValueError(f"bad KV spec: missing {sorted(missing)}, unexpected {sorted(extra)}")
        return cls(**data)

    def mismatch(self, other: "KVSpec") -> str | None:
        """A sentence naming the first field that differs from ``other``, or None if compatible."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV spec {name} differs: {mine!r} here, {theirs!r} there"
        return None
