"""A decoding sequence and the token-level stop rules the decode worker enforces itself.

The router handles stop strings (they need text); everything decidable from token ids alone
is decided here, so a finished sequence never runs one step too many.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.sampler import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed", "num_top_logprobs")
_STOP_KEYS = ("max_tokens", "stop_token_ids", "ignore_eos")


@dataclass(frozen=True)
class StopCriteria:
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    max_model_len: int = 1 << 62

    def check(self, token_id: int, num_generated: int, context_len: int) -> str | None:
        """Finish reason after ``token_id`` became the ``num_generated``-th output token.

        ``context_len`` counts every token of the sequence including ``token_id``.
        """
        if token_id in self.stop_token_ids or (not self.ignore_eos and token_id in self.eos_token_ids):
            return FINISH_STOP
        if num_generated >= self.max_tokens or context_len >= self.max_model_len:
            return FINISH_LENGTH
        return None


def parse_request_options(options: dict, *, eos_token_ids, max_model_len: int
                          ) -> tuple[SamplingParams, StopCriteria]:
    """Split the router's sampling dict into SamplingParams and StopCriteria.

    The router has validated user input already; this raises ValueError on anything else.
    """
    unknown = set(options) - set(_SAMPLING_KEYS) - set(_STOP_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling options {sorted(unknown)}")
    params = SamplingParams.from_dict({k: options[k] for k in _SAMPLING_KEYS if k in options})
    max_tokens = options.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    stop = StopCriteria(
        max_tokens=max_tokens,
        stop_token_ids=frozenset(options.get("stop_token_ids") or ()),
        eos_token_ids=frozenset(eos_token_ids),
        ignore_eos=bool(options.get("ignore_eos", False)),
        max_model_len=max_model_len,
    )
    return params, stop


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
    stop: StopCriteria
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
