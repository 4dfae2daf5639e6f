"""Continuous batching on a decode worker.

Sequences are reserved on ``Allocate`` (blocks for the longest they can get, so a running
sequence never runs out), join the running batch when their KV has landed, run one token
per step, and leave as soon as a stop rule fires or the router frees them.
"""
from __future__ import annotations

from dataclasses import dataclass

from decode.sequence import DecodeSequence, parse_request_options
from kvtransfer.allocator import BlockAllocator
from models.batch import SampleResult, SequenceChunk


@dataclass(frozen=True)
class StepItem:
    """One sequence's output of a step, as the router's ``Tokens`` item."""
    rid: str
    token_id: int
    logprob: float
    finish_reason: str | None
    top_logprobs: list | None = None

    def to_wire(self) -> list:
        item = [self.rid, self.token_id, self.logprob, self.finish_reason]
        return item if self.top_logprobs is None else item + [self.top_logprobs]


class DecodeScheduler:
    def __init__(self, allocator: BlockAllocator, *, max_model_len: int, eos_token_ids,
                 max_num_seqs: int = 256):
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.by_rid: dict[str, DecodeSequence] = {}
        self.running: list[DecodeSequence] = []   # in join order

    # -- reservation ---------------------------------------------------------------------
    def num_blocks_needed(self, num_context: int, options: dict, output_index: int) -> int:
        """Blocks for the whole life of a sequence: context plus every token still to come.

        The last token's K/V is never computed, so ``num_context + remaining - 1`` tokens.
        """
        remaining = max(1, options.get("max_tokens", 16) - output_index)
        final_len = min(num_context + remaining, self.max_model_len)
        return -(-max(final_len - 1, num_context) // self.block_size)

    def make_sequence(self, rid: str, transfer_id: str, token_ids: list[int], options: dict,
                      output_index: int, block_ids: list[int]) -> DecodeSequence:
        """Register a sequence whose blocks the caller reserved. Raises ValueError."""
        if rid in self.by_rid:
            raise ValueError(f"request {rid} is already on this decode worker")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"{len(token_ids)} tokens leave no room under max model length "
                             f"{self.max_model_len}")
        sampling, stop = parse_request_options(options, eos_token_ids=self.eos_token_ids,
                                               max_model_len=self.max_model_len)
        seq = DecodeSequence(rid=rid, transfer_id=transfer_id, token_ids=list(token_ids),
                             block_ids=block_ids, sampling=sampling, stop=stop,
                             output_index=output_index, num_generated=output_index)
        self.by_rid[rid] = seq
        return seq

    def can_run_more(self) -> bool:
        return len(self.running) < self.max_num_seqs

    # -- running -------------------------------------------------------------------------
    def start(self, seq: DecodeSequence, first_token: int) -> str | None:
        """The KV of ``seq.token_ids`` landed and prefill sampled ``first_token``.

        Returns the finish reason if the first token already ends the request (the sequence
        then never joins the batch); otherwise the sequence runs from the next step.
        """
        reason = seq.append(first_token)
        seq.started = True
        if reason is None:
            self.running.append(seq)
        return reason

    def schedule(self) -> tuple[list[DecodeSequence], list[SequenceChunk]]:
        seqs = list(self.running)
        chunks = [SequenceChunk(token_ids=[s.token_ids[-1]], num_cached=len(s.token_ids) - 1,
                                block_table=s.block_ids, sampling=s.sampling,
                                output_index=s.num_generated) for s in seqs]
        return seqs, chunks

    def update(self, seqs: list[DecodeSequence], results: list[SampleResult | None]
               ) -> list[StepItem]:
        """Append each sequence's sampled token; finished sequences leave the batch.

        A sequence freed while its step ran (abort) is skipped: its token is dropped.
        """
        items = []
        for seq, result in zip(seqs, results):
            if result is None or self.by_rid.get(seq.rid) is not seq:
                continue
            reason = seq.append(result.token_id)
            items.append(StepItem(seq.rid, result.token_id, result.logprob, reason, result.top_logprobs))
        if any(item.finish_reason for item in items):
            self.running = [s for s in self.running if s.finish_reason is None]
        return items

    def remove(self, rid: str) -> DecodeSequence | None:
        """Forget a sequence (finished or aborted); the caller releases its blocks."""
        seq = self.by_rid.pop(rid, None)
        if seq is not None and seq in self.running:
            self.running.remove(seq)
        return seq

    @property
    def num_running(self) -> int:
        return len(self.running)
