"""Step plans: what rank 0 broadcasts to every TP rank for one model step.

A plan is a ``StepPlan`` of ``PlanChunk``s (the tokens each sequence runs, the decode chunk
included) and, on a prefill worker, ``KVSend``s (which KV each chunk pushes where) and the
transfers to abort first. ``to_wire`` gives plain msgpack-able lists; ``from_wire`` checks every
field like ``router.protocol.decode`` does and raises ``PlanError`` naming the bad one. Ranks
1..K-1 only ever see the wire form (``models.parallel.broadcast_plan``), so a rank reads exactly
what rank 0 checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from models.request_options import is_int


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed", "num_top_logprobs")


class PlanError(ValueError):
    """A step plan (or one of its parts) that does not decode; the text names the field."""


def _check_ints(name: str, value, *, min_value: int = 0) -> list[int]:
    if not isinstance(value, list) or not all(is_int(v) and v >= min_value for v in value):
        raise PlanError(f"{name} must be a list of integers >= {min_value}")
    return value


def _check_int(name: str, value, *, min_value: int = 0) -> int:
    if not is_int(value) or value < min_value:
        raise PlanError(f"{name} must be an integer >= {min_value}, got {value!r}")
    return value


def _check_list(name: str, value, size: int | None = None) -> list:
    if not isinstance(value, list) or (size is not None and len(value) != size):
        raise PlanError(f"{name} must be a list" + (f" of {size} fields" if size is not None else ""))
    return value


class PlanChunk(NamedTuple):
    """Tokens of one sequence in one step (a prompt chunk, or a decode step's single token).

    ``sampling``: the ``SamplingParams`` fields (``SAMPLING_KEYS``) when this
    chunk samples a token, None for a middle chunk of a chunked prefill.
    """
    token_ids: list[int]
    num_cached: int
    block_table: list[int]
    sampling: dict | None
    output_index: int

    def to_wire(self) -> list:
        return list(self)

    @classmethod
    def from_wire(cls, data) -> "PlanChunk":
        token_ids, num_cached, block_table, sampling, output_index = _check_list("a plan chunk", data, 5)
        _check_ints("chunk token_ids", token_ids)
        if not token_ids:
            raise PlanError("chunk token_ids must not be empty")
        _check_int("chunk num_cached", num_cached)
        _check_ints("chunk block_table", block_table)
        if sampling is not None and (not isinstance(sampling, dict) or set(sampling) != set(SAMPLING_KEYS)):
            raise PlanError(f"chunk sampling must be null or a mapping of {SAMPLING_KEYS}")
        _check_int("chunk output_index", output_index)
        return cls(token_ids, num_cached, block_table, sampling, output_index)

    @classmethod
    def of(cls, chunk) -> "PlanChunk":
        """From a ``models.batch.SequenceChunk``."""
        sampling = chunk.sampling.to_dict() if chunk.sampling is not None else None
        return cls(list(chunk.token_ids), chunk.num_cached, list(chunk.block_table), sampling,
                   chunk.output_index)

    def to_sequence_chunk(self):
        """The ``models.batch.SequenceChunk`` the runner takes (SamplingParams checks the values)."""
        from models.batch import SequenceChunk
        from models.sampler import SamplingParams

        sampling = SamplingParams(**self.sampling) if self.sampling is not None else None
        return SequenceChunk(self.token_ids, self.num_cached, self.block_table, sampling, self.output_index)


class KVSend(NamedTuple):
    """What one prefill chunk pushes: tokens ``[start, stop)`` of ``transfer_id``'s KV.

    ``begin``: the transfer starts with this chunk (``dest``, ``src`` and ``num_tokens`` set:
    the decode worker's destination, the local source blocks, the prompt length).
    ``last``: the prompt ends with this chunk; the transfer finishes with its first token.
    """
    transfer_id: str
    begin: bool
    last: bool
    start: int
    stop: int
    dest: dict | None = None
    src: list[int] | None = None
    num_tokens: int | None = None

    def to_wire(self) -> list:
        return list(self)

    @classmethod
    def from_wire(cls, data) -> "KVSend":
        transfer_id, begin, last, start, stop, dest, src, num_tokens = _check_list("a KV send", data, 8)
        if not isinstance(transfer_id, str) or not transfer_id:
            raise PlanError("send transfer_id must be a non-empty string")
        if not isinstance(begin, bool) or not isinstance(last, bool):
            raise PlanError("send begin and last must be booleans")
        _check_int("send start", start)
        _check_int("send stop", stop, min_value=start + 1)
        if begin:
            if not isinstance(dest, dict):
                raise PlanError("a beginning send needs dest, a mapping")
            _check_ints("send src", src)
            _check_int("send num_tokens", num_tokens, min_value=1)
        elif (dest, src, num_tokens) != (None, None, None):
            raise PlanError("only a beginning send carries dest, src and num_tokens")
        return cls(transfer_id, begin, last, start, stop, dest, src, num_tokens)


@dataclass(frozen=True)
class StepPlan:
    """One step for every rank. ``stop``: no step; the ranks exit (``TPGroup.stop``).

    ``sends[i]`` belongs to ``chunks[i]`` (a prefill worker sends one per chunk; a decode
    worker none). ``aborts``: transfer ids every rank aborts before the step runs.
    """
    chunks: tuple[PlanChunk, ...] = ()
    sends: tuple[KVSend, ...] = ()
    aborts: tuple[str, ...] = ()
    stop: bool = False

    def to_wire(self) -> list:
        return [[c.to_wire() for c in self.chunks], [s.to_wire() for s in self.sends],
                list(self.aborts), self.stop]

    @classmethod
    def from_wire(cls, data) -> "StepPlan":
        chunks, sends, aborts, stop = _check_list("a step plan", data, 4)
        chunks = tuple(PlanChunk.from_wire(c) for c in _check_list("plan chunks", chunks))
        sends = tuple(KVSend.from_wire(s) for s in _check_list("plan sends", sends))
        if sends and len(sends) != len(chunks):
            raise PlanError(f"a plan with sends needs one per chunk: {len(sends)} sends, "
                            f"{len(chunks)} chunks")
        aborts = tuple(_check_list("plan aborts", aborts))
        if not all(isinstance(a, str) and a for a in aborts):
            raise PlanError("plan aborts must be non-empty transfer id strings")
        if not isinstance(stop, bool):
            raise PlanError("plan stop must be a boolean")
        return cls(chunks, sends, aborts, stop)

    def sequence_chunks(self) -> list:
        return [c.to_sequence_chunk() for c in self.chunks]


STOP_PLAN = StepPlan(stop=True)
