"""What a request asks of the model: its sampling and token-level stop options, and the stop
rules a worker enforces from them. torch-free: the router validates user input with it.

``RequestOptions`` is the one definition of these options, their defaults and their ranges.
The router builds it from a client's parameters (``router.validation``), sends it to workers as
``to_wire()`` inside ``Allocate`` / ``Prefill``, and each worker reads it back with
``from_wire`` (which checks every field again: the wire is a trust boundary).
``SamplingParams`` (``models.sampler``) checks its four fields with the same functions.

Stop strings are not here: they need text, so the router alone applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

SEED_LIMIT = 2**63
MAX_TEMPERATURE = 1000.0
MAX_STOP_TOKEN_IDS = 256
MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16

FINISH_STOP = "stop"      # EOS token or a stop token id
FINISH_LENGTH = "length"  # max_tokens or the max model length reached


def is_int(value) -> bool:
    """An int that is not a bool (msgpack and JSON keep the two apart; so do we)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling(temperature, top_p, top_k, seed) -> None:
    """The ranges of the sampling options. Raises ValueError naming the field and its range."""
    # The range alone refuses nan and inf; math.isfinite would overflow on a JSON int past 1e308.
    if not is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                         f"got {temperature!r}")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if seed is not None and (not is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be null or an integer in [0, 2**63), got {seed!r}")


def check_num_top_logprobs(num) -> None:
    """How many most likely tokens to report with each token: 0 to MAX_TOP_LOGPROBS."""
    if not is_int(num) or not 0 <= num <= MAX_TOP_LOGPROBS:
        raise ValueError(f"num_top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {num!r}")


@dataclass(frozen=True)
class RequestOptions:
    """Sampling and token-level stop options of one request, validated at construction.

    max_tokens: output tokens at most (>= 1). temperature/top_p/top_k/seed: see
    ``models.sampler.SamplingParams``. stop_token_ids: token ids that end the request (kept,
    reported with finish reason ``stop``). ignore_eos: keep going past the model's EOS tokens.
    num_top_logprobs: report this many most likely tokens with each output token (0 to 20).
    Raises ValueError saying which field is wrong and what it must be.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    num_top_logprobs: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        check_sampling(self.temperature, self.top_p, self.top_k, self.seed)
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
        for tok in ids:
            if not is_int(tok) or tok < 0:
                raise ValueError(f"stop_token_ids contains {tok!r}, not a token id (integers >= 0)")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        check_num_top_logprobs(self.num_top_logprobs)
        # Canonical form: floats for the float fields, unique stop ids in first-seen order.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(ids)))

    @property
    def sampling_fields(self) -> dict:
        """The fields ``SamplingParams`` takes."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "num_top_logprobs": self.num_top_logprobs}

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a stop token id is outside ``[0, vocab_size)``."""
        for tok in self.stop_token_ids:
            if tok >= vocab_size:
                raise ValueError(f"stop_token_ids contains {tok!r}, not a token id of this model "
                                 f"(integers in [0, {vocab_size}))")

    def to_wire(self) -> dict:
        wire = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed, "stop_token_ids": list(self.stop_token_ids),
                "ignore_eos": self.ignore_eos}
        if self.num_top_logprobs:  # absent unless asked for: the common message stays as it was
            wire["num_top_logprobs"] = self.num_top_logprobs
        return wire

    @classmethod
    def from_wire(cls, data) -> "RequestOptions":
        """Read options off the wire (absent keys take the defaults). Raises ValueError on a
        non-mapping, an unknown key or an invalid value."""
        if not isinstance(data, dict):
            raise ValueError(f"request options must be a mapping, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _FIELDS)
        if unknown:
            raise ValueError(f"unknown sampling options {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
        values = dict(data)
        if values.get("stop_token_ids") is None:
            values.pop("stop_token_ids", None)
        return cls(**values)


_FIELDS = tuple(RequestOptions.__dataclass_fields__)


@dataclass(frozen=True)
class StopRules:
    """The token-level stop rules of one request on one worker: its options plus the model's
    EOS tokens and max length. Prefill (first token) and decode (every later one) apply the
    same rules, so both reach the same verdict on the same token."""

    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    max_model_len: int = 1 << 62

    @classmethod
    def of(cls, options: RequestOptions, *, eos_token_ids, max_model_len: int) -> "StopRules":
        return cls(max_tokens=options.max_tokens, stop_token_ids=frozenset(options.stop_token_ids),
                   eos_token_ids=frozenset(eos_token_ids), ignore_eos=options.ignore_eos,
                   max_model_len=max_model_len)

    def check(self, token_id: int, num_generated: int, context_len: int) -> str | None:
        """Finish reason after ``token_id`` became the ``num_generated``-th output token.

        ``context_len`` counts every token of the sequence including ``token_id``.
        """
        if token_id in self.stop_token_ids or (not self.ignore_eos and token_id in self.eos_token_ids):
            return FINISH_STOP
        if num_generated >= self.max_tokens or context_len >= self.max_model_len:
            return FINISH_LENGTH
        return None
