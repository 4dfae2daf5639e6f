"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split into ``ceil(vocab / TP)`` rows per rank; the last rank's tail is
zero padding, so any vocabulary size works with any TP degree (odd vocabularies included).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.linear import check_shape
from models.parallel import SINGLE, ParallelContext, all_gather, all_reduce


class VocabParallelEmbedding(nn.Module):
    """Rank r embeds token ids in ``[vocab_start, vocab_end)``; the others contribute zeros
    and an all-reduce assembles the full embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext = SINGLE):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_rows_per_rank = -(-vocab_size // ctx.world_size)
        self.vocab_start = min(ctx.rank * self.num_rows_per_rank, vocab_size)
        self.vocab_end = min(self.vocab_start + self.num_rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.empty(self.num_rows_per_rank, hidden_size),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        check_shape(loaded, (self.vocab_size, self.hidden_size))
        num_rows = self.vocab_end - self.vocab_start
        if num_rows:
            param.data[:num_rows].copy_(loaded[self.vocab_start:self.vocab_end])
        param.data[num_rows:].zero_()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids ``[T]`` -> embeddings ``[T, hidden]``."""
        if self.ctx.world_size == 1:
            return F.embedding(token_ids, self.weight)
        in_range = (token_ids >= self.vocab_start) & (token_ids < self.vocab_end)
        local_ids = torch.where(in_range, token_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(~in_range[:, None], 0)
        return all_reduce(self.ctx, out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits projection sharded like the embedding (so tied weights share one parameter):
    each rank computes its vocabulary slice, an all-gather joins them, padding is trimmed."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden]`` -> logits ``[N, vocab]`` (complete on every rank)."""
        logits = F.linear(hidden, self.weight)  # [N, rows_per_rank]
        if self.ctx.world_size == 1:
            return logits
        return all_gather(self.ctx, logits, dim=-1)[:, :self.vocab_size]
