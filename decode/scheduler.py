"""Continuous batching on a decode worker.

Sequences are reserved on ``Allocate`` (blocks for the longest they can get, so a running
sequence never runs out), join the running batch when their KV has landed, run one token
per step, and leave as soon as a stop rule fires or the router frees them.
"""
from __future__ import annotations

from decode.sequence import DecodeSequence
from kvtransfer.allocator import BlockAllocator
from kvtransfer.spec import reservation_blocks
from models.batch import SampleResult, SequenceChunk
from models.request_options import RequestOptions, StopRules
from models.sampler import SamplingParams
from router.payloads import TokenItem


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
    def num_blocks_needed(self, num_context: int, options: RequestOptions, output_index: int) -> int:
        """Blocks for the whole life of a sequence (``kvtransfer.spec.reservation_blocks``)."""
        return reservation_blocks(num_context, options.max_tokens, output_index, self.max_model_len,
                                  self.block_size)

    def make_sequence(self, rid: str, transfer_id: str, token_ids: list[int], options: RequestOptions,
                      output_index: int, block_ids: list[int]) -> DecodeSequence:
        """Register a sequence whose blocks the caller reserved. Raises ValueError."""
        if rid in self.by_rid:
            raise ValueError(f"request {rid} is already on this decode worker")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"{len(token_ids)} tokens leave no room under max model length "
                             f"{self.max_model_len}")
        stop = StopRules.of(options, eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len)
        seq = DecodeSequence(rid=rid, transfer_id=transfer_id, token_ids=list(token_ids),
                             block_ids=block_ids, sampling=SamplingParams(**options.sampling_fields),
                             stop=stop,
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
               ) -> list[TokenItem]:
        """Append each sequence's sampled token; finished sequences leave the batch.

        A sequence freed while its step ran (abort) is skipped: its token is dropped.
        """
        items = []
        for seq, result in zip(seqs, results):
            if result is None or self.by_rid.get(seq.rid) is not seq:
                continue
            reason = seq.append(result.token_id)
            items.append(TokenItem(seq.rid, result.token_id, result.logprob, reason, result.top_logprobs))
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
