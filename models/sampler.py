"""Token sampling: greedy, temperature, top-k, top-p, with reproducible seeded draws.

Random rows use the Gumbel-max trick: the token is ``argmax(x - log(-log(u)))`` over the
filtered, temperature-scaled logits ``x`` with one uniform ``u`` per vocabulary entry, which
draws exactly from ``softmax(x)``. For a seeded request the uniforms come from a Philox
counter-based generator on the CPU, keyed by the seed with the output index as the counter
block, so a draw depends only on ``(seed, output_index, logits row)``: not on the other rows
of the batch, the process, the device or the TP degree. A request resumed elsewhere (decode
failover) therefore reproduces its tokens exactly. Unseeded rows draw from a generator seeded
from the OS at construction, so they differ between processes and runs.

The reported logprob is the log-softmax of the *raw* logits (before temperature, top-k and
top-p) at the chosen token: the model's own probability of the token, comparable across
sampling settings, as vLLM reports by default.
"""
from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from models.request_options import check_num_top_logprobs, check_sampling, is_int


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token of one request.

    temperature: 0 is greedy (argmax); otherwise logits are divided by it. In [0, 1000].
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p; in (0, 1].
    top_k: keep the k most likely tokens; 0 turns it off. Applied before top_p.
    seed: None for fresh randomness, or an int in [0, 2**63) for a reproducible draw.
    num_top_logprobs: how many of the most likely tokens to report with their logprobs
    (``Sampler.top_logprobs``), in [0, 20]; they never change which token is drawn.
    The ranges are ``models.request_options``'s (one definition).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    num_top_logprobs: int = 0

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.seed)
        check_num_top_logprobs(self.num_top_logprobs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """Build from a mapping such as ``to_dict()`` produced; absent keys take defaults.

        Raises ValueError on a non-mapping, an unknown key or an invalid value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"sampling parameters must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data.keys() - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)



def seeded_uniforms(seed: int, output_index: int, vocab_size: int) -> torch.Tensor:
    """The ``[vocab_size]`` float32 uniforms in [0, 1) of one seeded draw, computed on the CPU.

    Philox4x64 keyed by ``seed``; the output index selects the counter block (word 1), and
    word 0 counts within the draw, so draws for different indices never overlap.
    """
    bit_generator = np.random.Philox(key=seed, counter=output_index << 64)
    return torch.from_numpy(np.random.Generator(bit_generator).random(vocab_size, dtype=np.float32))


class Sampler:
    """Picks one token per logits row. Stateless apart from the generator of unseeded rows."""

    def __init__(self) -> None:
        self._seed = secrets.randbits(63)
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               output_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a token for each row.

        logits: ``[N, V]`` (float32; other float dtypes are upcast). params and output_indices
        have N entries; output_indices[i] is how many tokens row i's request has generated
        before this one (0 for the first token).
        Returns ``(token_ids [N] int64, logprobs [N] float32)`` on the logits' device.
        Raises ValueError if the shapes or lengths disagree.
        """
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(f"logits must be a 2-D float tensor [N, V], got {tuple(logits.shape)} "
                             f"{logits.dtype}")
        num_rows = logits.shape[0]
        if len(params) != num_rows or len(output_indices) != num_rows:
            raise ValueError(f"{num_rows} logits rows need as many sampling params and output "
                             f"indices, got {len(params)} and {len(output_indices)}")
        if any(not is_int(i) or i < 0 for i in output_indices):
            raise ValueError(f"output indices must be integers >= 0, got {list(output_indices)}")
        logits = logits.float()
        token_ids = logits.argmax(dim=-1)  # [N]; first maximum on ties
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            token_ids[rows] = self._sample_random(
                logits[rows], [params[i] for i in random_rows], [output_indices[i] for i in random_rows])
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, token_ids[:, None]).squeeze(1)
        return token_ids, logprobs

    @staticmethod
    def top_logprobs(logits: torch.Tensor, counts: list[int]) -> list[list | None]:
        """The ``counts[i]`` most likely tokens of row i as ``[[token_id, logprob], ...]``, most
        likely first (log-softmax of the raw logits, like ``sample``'s logprobs); None for a
        row whose count is 0. logits: ``[N, V]``."""
        k = min(max(counts, default=0), logits.shape[1])
        if k == 0:
            return [None] * len(counts)
        values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # [N, k]
        values, ids = values.tolist(), ids.tolist()
        return [[[t, v] for t, v in zip(ids[i][:n], values[i][:n])] if n else None
                for i, n in enumerate(counts)]

    def _sample_random(self, logits: torch.Tensor, params: list[SamplingParams],
                       output_indices: list[int]) -> torch.Tensor:
        num_rows, vocab_size = logits.shape
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
        # Shift the max to 0 before dividing, so a tiny temperature cannot overflow to inf.
        x = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # [M, V]
        x = self._filter(x, params)
        u = torch.empty_like(x)
        seeded = [i for i, p in enumerate(params) if p.seed is not None]
        fresh = [i for i, p in enumerate(params) if p.seed is None]
        if seeded:
            noise = torch.stack([seeded_uniforms(params[i].seed, output_indices[i], vocab_size)
                                 for i in seeded])
            u[torch.tensor(seeded, device=device)] = noise.to(device)
        if fresh:
            u[torch.tensor(fresh, device=device)] = torch.rand(
                (len(fresh), vocab_size), generator=self._generator(device), device=device)
        # u in [tiny, 1) keeps -log(u) in (0, 88], so the Gumbel noise is finite.
        gumbel = -torch.log(-torch.log(u.clamp_min_(torch.finfo(torch.float32).tiny)))
        return (x + gumbel).argmax(dim=-1)

    @staticmethod
    def _filter(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf."""
        vocab_size = x.shape[1]
        use_top_k = any(0 < p.top_k < vocab_size for p in params)
        use_top_p = any(p.top_p < 1 for p in params)
        if not (use_top_k or use_top_p):
            return x
        device = x.device
        # A stable sort ranks tied logits by token id, like argmax, so top_k=1 is greedy.
        sorted_x, order = x.sort(dim=-1, descending=True, stable=True)  # [M, V]
        rank = torch.arange(vocab_size, device=device)[None, :]
        if use_top_k:
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params],
                                 device=device)[:, None]
            sorted_x = sorted_x.masked_fill(rank >= top_k, float("-inf"))
        if use_top_p:
            probs = sorted_x.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # [M, V]; 0 at rank 0: one token always kept
            top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
            drop = (mass_before >= top_p) & (top_p < 1)
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator
