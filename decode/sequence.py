"""A decoding sequence: one request on a decode worker, from reservation to finish.

Token-level stop rules (``models.request_options.StopRules``) are enforced here, so a finished
sequence never runs one step too many; stop strings need text and stay with the router.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.request_options import StopRules
from models.sampler import SamplingParams


@dataclass
class DecodeSequence:
    """One request on a decode worker, from reservation to finish.

    ``token_ids`` is the whole context (prompt, then every generated token). The KV of all
    but the last token is in ``block_ids``; each step feeds the last token and appends one.
    Blocks are reserved up front for the longest the sequence can get, so a running
    sequence never needs a block it does not have.
    """

    rid: str
    transfer_id: str
    token_ids: list[int]
    block_ids: list[int]
    sampling: SamplingParams
    stop: StopRules
    output_index: int            # output tokens produced before this sequence's KV arrived
    num_generated: int = 0       # output tokens in total (output_index + produced here)
    finish_reason: str | None = None
    started: bool = False
    num_prefix_hit: int = 0      # colocated: context tokens found in the prefix cache

    def append(self, token_id: int) -> str | None:
        """Add a sampled token; returns the finish reason if it ends the sequence."""
        self.token_ids.append(token_id)
        self.num_generated += 1
        self.finish_reason = self.stop.check(token_id, self.num_generated, len(self.token_ids))
        return self.finish_reason
