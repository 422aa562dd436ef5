"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split in contiguous ranges across ranks (the last range may be
short). The embedding looks up the ids in its range and the partial results are
summed; the LM head computes the logits of its range and gathers them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tgi_core.model.layers import cpu_gemm
from tgi_core.model.parallel import ParallelContext, current_parallel_context
from tgi_core.model.weights import LazyTensor


class VocabParallelEmbedding(nn.Module):
    """``num_embeddings x embedding_dim`` table, rows split across ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp or current_parallel_context()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.rows_per_rank = math.ceil(num_embeddings / self.tp.world_size)
        self.vocab_start = min(self.tp.rank * self.rows_per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(
            torch.zeros(
                self.rows_per_rank, embedding_dim, dtype=dtype or torch.get_default_dtype()
            ),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded: LazyTensor, shard_id: object = None
    ) -> None:
        if loaded.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"{loaded.name}: checkpoint shape {loaded.shape} does not match the model's "
                f"{(self.num_embeddings, self.embedding_dim)}"
            )
        rows = self.vocab_end - self.vocab_start
        loaded.narrow(0, self.vocab_start, rows).copy_into(param.data[:rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; may share its weight with the embedding."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, tp=tp)
        if bias:
            raise NotImplementedError("an LM head bias is not supported yet")
        #: a oneDNN-packed copy of the weight (``cpu_gemm``), made on first use and
        #: remade if the weight's storage changes; the embedding keeps the plain weight
        self._packed: tuple[int, torch.Tensor] | None = None

    def _packed_weight(self) -> torch.Tensor | None:
        if not cpu_gemm.can_pack(self.weight):
            return None
        key = self.weight.data_ptr()
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, cpu_gemm.pack(self.weight))
        return self._packed[1]

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share ``embedding``'s weight (``tie_word_embeddings``)."""
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, vocab]`` (every rank returns the whole vocabulary)."""
        packed = self._packed_weight()
        if packed is not None:
            logits = cpu_gemm.packed_linear(hidden_states, packed)
        else:
            logits = F.linear(hidden_states, self.weight)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather_last_dim(logits)[..., : self.num_embeddings]
