"""One client request inside the router, and the states of its life.

    QUEUED ──Allocate──▶ ALLOCATING ──Allocated(dest)──▶ PREFILLING ──FirstToken──▶ DECODING ──▶ done
       ▲                     │ Allocated(error): back to the queue front, not a failure
       └── failover: a worker died or failed the request; Free what is left, queue again with
           token_ids = prompt + output so far and output_index = len(output)

Towards its client a request is keyed by (client routing id, ``client_rid``). Each attempt has
its own ``transfer_id`` (``<rid>.<attempt>``), which is also the rid the workers see: a worker
never meets a request id twice, and late messages of an earlier attempt match nothing.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router import protocol as P
from router.output import OutputProcessor
from router.validation import RequestSpec

if TYPE_CHECKING:
    import asyncio

    from router.workers import WorkerRecord


class State(enum.Enum):
    QUEUED = "queued"
    ALLOCATING = "allocating"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    DONE = "done"


@dataclass(eq=False)
class Request:
    rid: str
    client: bytes
    client_rid: str
    spec: RequestSpec
    output: OutputProcessor
    stop_ids: frozenset[int]          # stop_token_ids, plus EOS unless ignore_eos
    arrival: float
    queued_at: float
    prompt_hashes: list[int] = field(default_factory=list)
    state: State = State.QUEUED
    output_ids: list[int] = field(default_factory=list)
    attempt: int = 0
    transfer_id: str = ""
    decode: "WorkerRecord | None" = None
    prefill: "WorkerRecord | None" = None
    decode_holds: bool = False        # the decode worker has state for this rid (needs Free)
    prefill_holds: bool = False       # the prefill worker has state for this rid (needs Free)
    num_blocks: int = 0               # blocks counted against ``decode``
    prefill_tokens: int = 0           # tokens counted against ``prefill``
    started: bool = False             # the decode worker runs this attempt (its Tokens count)
    handoff_since: float | None = None  # when the current hand-off began (None: none pending)
    got_first: bool = False           # this attempt's first token arrived
    early: list = field(default_factory=list)  # decode tokens that overtook the first token
    text: list[str] = field(default_factory=list)  # non-streaming: text so far
    deadline: "asyncio.TimerHandle | None" = None
    logprobs: list | None = None      # (logprob, top alternatives) per output token, when asked for
    num_cached_tokens: int = 0        # prompt tokens the prefill worker found in its prefix cache
    first_token_at: float | None = None  # monotonic times, for metrics
    last_token_at: float = 0.0
    prefill_sent_at: float = 0.0

    def accept_token(self, token_id: int, reason: str | None) -> tuple[str, str | None]:
        """Append one output token. Returns (text to stream, finish reason or None).

        ``reason`` is the worker's verdict; stop strings, stop token ids / EOS and max_tokens
        are checked here too, so the router never streams past a stop whatever the workers do.
        """
        self.output_ids.append(token_id)
        text, stopped = self.output.push(token_id)
        if stopped:
            return text, P.FINISH_STOP
        if reason is None:
            if token_id in self.stop_ids:
                reason = P.FINISH_STOP
            elif len(self.output_ids) >= self.spec.max_tokens:
                reason = P.FINISH_LENGTH
            else:
                return text, None
        tail, stopped = self.output.finish()
        return text + tail, P.FINISH_STOP if stopped else reason

    @property
    def context_ids(self) -> list[int]:
        """What a new attempt prefills: the prompt and every token produced so far."""
        return self.spec.prompt_ids + self.output_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.spec.prompt_ids)
