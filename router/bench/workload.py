"""What the load test sends: random token-id prompts (optionally behind a shared prefix) or a JSONL
dataset, each with the number of tokens to generate.

Random workload, as vLLM's random dataset: each prompt is ``prefix_len`` shared tokens followed by
``L_in`` random tokens, ``L_in`` uniform over the integers in
``[floor(input_len * (1 - r)), ceil(input_len * (1 + r))]`` and the output length likewise
around ``output_len`` (``r = range_ratio``; lengths never go below 1). The shared prefix is the
same random tokens for every prompt, which is what a prefix cache can reuse.

Dataset: one JSON object per line, ``{"prompt": "text"}`` or ``{"prompt_token_ids": [ids]}``,
with ``"output_len": n`` (``--output-len`` when the key is absent); other keys are ignored and
blank lines skipped. A run takes the first ``num_prompts`` entries, wrapping around when the file
has fewer.

Every prompt is built before the run starts, so the load generator only sends.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Used when the server does not report its vocabulary size and --vocab-size is not given: every
# byte-level or larger vocabulary holds these ids.
DEFAULT_VOCAB_SIZE = 256
WORKLOAD_STREAM = 0  # random stream of --seed used for prompts (arrivals use another)


class DatasetError(ValueError):
    """A dataset file that cannot be used; the text names the file, the line and what to fix."""


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: exactly one of ``prompt`` (text) / ``prompt_token_ids``."""

    prompt: str | None
    prompt_token_ids: list[int] | None
    output_len: int


@dataclass(frozen=True)
class WorkloadConfig:
    """The random workload (``dataset`` None) or a dataset file."""

    input_len: int = 128
    output_len: int = 32
    range_ratio: float = 0.0
    prefix_len: int = 0
    dataset: str | None = None

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(self.prefix_len, bool) or not isinstance(self.prefix_len, int) or self.prefix_len < 0:
            raise ValueError(f"--prefix-len must be an integer >= 0, got {self.prefix_len!r}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.dataset is not None and self.prefix_len:
            raise ValueError("--prefix-len applies to the random workload; drop it when using --dataset")


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive ``(low, high)`` bounds of the lengths drawn around ``length``; low >= 1."""
    return max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio)))


def random_requests(config: WorkloadConfig, num_requests: int, vocab_size: int,
                    seed: int) -> list[BenchRequest]:
    """``num_requests`` random token-id prompts (see the module docstring)."""
    if vocab_size < 1:
        raise ValueError(f"the vocabulary size must be positive, got {vocab_size}")
    rng = np.random.default_rng([seed, WORKLOAD_STREAM])
    in_low, in_high = length_range(config.input_len, config.range_ratio)
    out_low, out_high = length_range(config.output_len, config.range_ratio)
    input_lens = rng.integers(in_low, in_high + 1, size=num_requests)
    output_lens = rng.integers(out_low, out_high + 1, size=num_requests)
    prefix = rng.integers(0, vocab_size, size=config.prefix_len).tolist()
    tokens = rng.integers(0, vocab_size, size=int(input_lens.sum())).tolist()
    requests = []
    start = 0
    for input_len, output_len in zip(input_lens.tolist(), output_lens.tolist()):
        requests.append(BenchRequest(None, prefix + tokens[start:start + input_len], output_len))
        start += input_len
    return requests


def _parse_line(line: str, where: str, default_output_len: int, vocab_size: int | None) -> BenchRequest:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    prompt, token_ids = entry.get("prompt"), entry.get("prompt_token_ids")
    if (prompt is None) == (token_ids is None):
        raise DatasetError(f"{where}: give exactly one of \"prompt\" (text) or \"prompt_token_ids\"")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise DatasetError(f"{where}: \"prompt\" must be a non-empty string")
    if token_ids is not None:
        if not isinstance(token_ids, list) or not token_ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
            raise DatasetError(f"{where}: \"prompt_token_ids\" must be a non-empty list of integers >= 0")
        if vocab_size is not None and max(token_ids) >= vocab_size:
            raise DatasetError(f"{where}: token id {max(token_ids)} is outside the model's "
                               f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1})")
    output_len = entry.get("output_len", default_output_len)
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
        raise DatasetError(f"{where}: \"output_len\" must be a positive integer, got {output_len!r}")
    return BenchRequest(prompt, token_ids, output_len)


def load_dataset(path: str | Path, default_output_len: int,
                 vocab_size: int | None = None) -> list[BenchRequest]:
    """Parse a JSONL dataset; token ids must be below ``vocab_size`` when it is known.
    Raises DatasetError naming the file and line of the first bad entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from None
    requests = [_parse_line(line, f"{path} line {number}", default_output_len, vocab_size)
                for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not requests:
        raise DatasetError(f"dataset {path} has no prompts; write one JSON object per line")
    return requests


def build_workload(config: WorkloadConfig, num_requests: int, vocab_size: int | None,
                   seed: int) -> list[BenchRequest]:
    """The prompts of a run. ``vocab_size`` None: the server did not say and the user did not
    either, so random prompts use the DEFAULT_VOCAB_SIZE ids. Raises ValueError / DatasetError."""
    if config.dataset is not None:
        entries = load_dataset(config.dataset, config.output_len, vocab_size)
        return [entries[i % len(entries)] for i in range(num_requests)]
    return random_requests(config, num_requests, vocab_size or DEFAULT_VOCAB_SIZE, seed)
